// Package xconnect turns on HTTP/2 extended CONNECT (RFC 8441) in Go's
// net/http server and client. net/http reads GODEBUG=http2xconnect=1 once, in
// its init; this package's init appends that setting to GODEBUG first. Go
// initialises the packages that are ready in import-path order, and
// "github.com/…" sorts before "net/http", so a blank import of this package
// from a main package (or a test) runs before net/http reads the variable.
//
// It imports nothing but os and strings, so that nothing it imports pulls
// net/http in before its init has run.
package xconnect

import (
	"os"
	"strings"
)

// setting is the GODEBUG entry net/http looks for.
const setting = "http2xconnect=1"

func init() {
	cur := os.Getenv("GODEBUG")
	if strings.Contains(cur, setting) {
		return
	}
	if cur != "" {
		cur += ","
	}
	_ = os.Setenv("GODEBUG", cur+setting)
}
