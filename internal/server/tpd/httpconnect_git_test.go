package tpd

import (
	"bytes"
	"encoding/pem"
	"net/http/cgi"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// git clones a repository from a real HTTPS git server (git http-backend) through
// TP's CONNECT on the proxy name, presenting the device certificate with
// http.proxySSLCert and http.proxySSLKey, as docs/HTTP.md tells users to.
func TestConnectGitClone(t *testing.T) {
	t.Parallel()
	gitBin := needTool(t, "git", "git")
	r := newConnectRig(t, allowAlice)
	home := t.TempDir()
	env := append(os.Environ(), "HOME="+home, "GIT_CONFIG_NOSYSTEM=1", "GIT_TERMINAL_PROMPT=0",
		"http_proxy=", "https_proxy=", "HTTPS_PROXY=", "ALL_PROXY=", "all_proxy=", "NO_PROXY=", "no_proxy=")
	run := func(dir string, args ...string) string {
		t.Helper()
		cmd := exec.Command(gitBin, args...)
		cmd.Dir, cmd.Env = dir, env
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			t.Fatalf("git %s: %v\n%s", strings.Join(args, " "), err, errb.String())
		}
		return strings.TrimSpace(out.String())
	}

	// A bare repository with one commit, served by git's own smart HTTP backend.
	root := t.TempDir()
	work := filepath.Join(root, "work")
	run(root, "init", "-q", "-b", "main", work)
	if err := os.WriteFile(filepath.Join(work, "README"), []byte("cloned through TP\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	run(work, "add", "README")
	run(work, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "-m", "one")
	want := run(work, "rev-parse", "HEAD")
	run(root, "clone", "-q", "--bare", work, filepath.Join(root, "repo.git"))
	srv := httptest.NewTLSServer(&cgi.Handler{
		Path: gitBin, Args: []string{"http-backend"},
		Env: []string{"GIT_PROJECT_ROOT=" + root, "GIT_HTTP_EXPORT_ALL=1", "HOME=" + home},
	})
	t.Cleanup(srv.Close)
	srvPEM := filepath.Join(t.TempDir(), "srv.pem")
	writePEM(t, srvPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}))

	// The destination's certificate is trusted through GIT_SSL_CAINFO: Debian's git
	// (libcurl-gnutls) did not apply -c http.sslCAInfo to the server behind the tunnel.
	env = append(env, "GIT_SSL_CAINFO="+srvPEM)
	dst := filepath.Join(t.TempDir(), "clone")
	run(home, "-c", "http.proxy=https://"+proxyName+":"+r.port,
		"-c", "http.proxySSLCert="+r.certFile, "-c", "http.proxySSLKey="+r.keyFile,
		"-c", "http.proxySSLCAInfo="+r.rootF,
		"clone", "-q", srv.URL+"/repo.git", dst)
	if got := run(dst, "rev-parse", "HEAD"); got != want {
		t.Fatalf("the clone's HEAD is %s, the repository's %s", got, want)
	}
	b, err := os.ReadFile(filepath.Join(dst, "README"))
	if err != nil || string(b) != "cloned through TP\n" {
		t.Fatalf("the clone's README: %q, %v", b, err)
	}

	// The same clone without the device certificate fails at the proxy's handshake.
	cmd := exec.Command(gitBin, "-c", "http.proxy=https://"+proxyName+":"+r.port,
		"-c", "http.proxySSLCAInfo="+r.rootF,
		"clone", "-q", srv.URL+"/repo.git", filepath.Join(t.TempDir(), "refused"))
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("git cloned through the proxy name without a device certificate:\n%s", out)
	}
	t.Logf("without a device certificate git says: %s", bytes.TrimSpace(out))
	// GnuTLS reports the proxy's certificate_required alert as a received fatal
	// alert; but git sends its CONNECT right behind its Finished, and when the
	// server has already closed after its alert, that send fails first
	// ("Broken pipe", or a reset). Each is the handshake's refusal, never an
	// HTTP answer from the proxy.
	if s := string(out); !strings.Contains(s, "alert") && !strings.Contains(s, "Broken pipe") && !strings.Contains(s, "reset") ||
		strings.Contains(s, "CONNECT tunnel failed") || strings.Contains(s, "returned error") {
		t.Errorf("git failed, but not on the proxy's TLS alert:\n%s", out)
	}
}
