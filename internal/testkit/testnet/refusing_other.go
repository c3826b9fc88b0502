//go:build !linux

package testnet

import "testing"

// Refusing returns a loopback address where nothing listens. Off Linux it is
// a port that was free a moment ago (FreePort): the tests that need a port
// held for their whole life run on Linux.
func Refusing(t testing.TB) string {
	t.Helper()
	return FreeAddr(t, "tcp").String()
}
