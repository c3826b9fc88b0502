package web

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"os"
	"os/exec"
	"testing"

	"github.com/tp-proxy/tp/acme/login"
)

// TP.js's own tests (tp.test.mjs) run in Node.js, against fakes of
// WebTransport's streams; the grant code they check is login.GrantCode's.
func TestTPJS(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		if testing.Short() {
			t.Skip("node is not installed (apt-get install nodejs; deploy/test.sh does, run as root)")
		}
		t.Fatal("node is not installed: apt-get install nodejs (deploy/test.sh does, run as root)")
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	spki, err := x509.MarshalPKIXPublicKey(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(node, "--test", "--test-reporter=spec", "tp.test.mjs")
	cmd.Env = append(os.Environ(), "TP_TEST_SPKI="+base64.StdEncoding.EncodeToString(spki), "TP_TEST_CODE="+login.GrantCode(spki))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("node --test tp.test.mjs: %v\n%s", err, out)
	}
	t.Logf("%s", out)
}

// tpd serves what the embedded files hold: TP.js, its types and the
// terminal page.
func TestFS(t *testing.T) {
	for _, f := range []string{"tp.js", "tp.d.ts", "ssh.html", "echo.html", "dist/README.md"} {
		if _, err := FS.Open(f); err != nil {
			t.Errorf("%s is not embedded: %v", f, err)
		}
	}
}
