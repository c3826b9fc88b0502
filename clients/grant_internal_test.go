package clients

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
)

// Bad input: a grant asked for without the server or its fingerprint is
// refused with the flags to give, before anything is made or fetched.
func TestRequestGrantNeedsServerAndFingerprint(t *testing.T) {
	home := Home{Dir: filepath.Join(t.TempDir(), "app")}
	for _, req := range []GrantRequest{{Name: "ci"}, {Name: "ci", Server: "https://127.0.0.1:1"}, {Name: "ci", Fingerprint: "SHA256:00"}} {
		_, err := RequestGrant(context.Background(), home, req)
		if err == nil || !strings.Contains(err.Error(), "asking for a grant needs --server and --fingerprint") {
			t.Errorf("RequestGrant(server %q, fingerprint %q): %v", req.Server, req.Fingerprint, err)
		}
	}
}
