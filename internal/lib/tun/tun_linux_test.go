//go:build linux

package tun

import (
	"strings"
	"testing"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// Without CAP_NET_ADMIN in the network namespace's owner (here: in a user
// namespace of its own, unshare -r, which keeps the host's network
// namespace), Open says what is missing and how to grant it.
func TestOpenWithoutCapNetAdminSaysSo(t *testing.T) {
	if !testnet.InUserns(t) {
		return
	}
	_, err := Open("tpnocap%d")
	if err == nil || !strings.Contains(err.Error(), "needs CAP_NET_ADMIN") {
		t.Fatalf("Open without CAP_NET_ADMIN: %v; want an error that names CAP_NET_ADMIN", err)
	}
}
