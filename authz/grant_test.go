package authz_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

// grantDir is a Directory of live devices, two of them granted.
type grantDir map[string]string // device ID → its approver, "" when not granted

func (g grantDir) Lookup(id string) ([]string, error) {
	if _, ok := g[id]; !ok {
		return nil, fmt.Errorf("device %s is not enrolled: %w", id, authz.ErrUnknownDevice)
	}
	return []string{"dev"}, nil
}

func (g grantDir) GrantedBy(id string) string { return g[id] }

// A grant is revoked with its approver: Verify refuses a granted device once
// the device that approved it is on the deny list, naming it, and nothing
// else. Bad input: the approver deny-listed; a grant of another approver
// beside it; the approver's certificate serial deny-listed (which ends that
// certificate only, not the device, so not its grants).
func TestVerifyGrantWithItsApprover(t *testing.T) {
	ca := testpki.New(t)
	dir := grantDir{"alice@laptop": "", "alice@phone": "", "alice@grant-aaaa": "alice@laptop", "alice@grant-bbbb": "alice@phone"}
	deny := &authz.DenyList{}
	deny.Add(authz.DenyDevice, "alice@laptop")
	deny.Add(authz.DenySerial, "abc")
	for _, tc := range []struct{ id, err string }{
		{"alice@grant-aaaa", "device alice@grant-aaaa was granted by alice@laptop, which has been revoked, and the grant ended with it"},
		{"alice@grant-bbbb", ""},
		{"alice@phone", ""},
	} {
		_, err := authz.Verify(ca.ClientCert(t, tc.id, testpki.LeafOptions{}).Leaf, deny, dir)
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%s: %v", tc.id, err)
		case tc.err != "" && (err == nil || !errors.Is(err, authz.ErrRevoked) || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%s: %v; want ErrRevoked saying %q", tc.id, err, tc.err)
		}
	}
}
