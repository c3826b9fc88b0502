package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"testing"

	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

// The raw quic-go relay is tpbench's baseline for TP over QUIC (its helper
// roles quic-relay-server and quic-relay-client): one QUIC connection, each TCP
// connection a stream of it, with TP's flow-control windows and nothing else of
// TP's (no hello, no policy, no session records). Between C and T it is the
// floor a round trip over quic-go has in BenchmarkIPTunnel's namespaces.

// relayComm is the name tpbench is built under for the relay's halves, so
// that their CPU time is told apart from any other process's (commCPU).
const relayComm = "tpbench-relay"

var (
	tpbenchOnce sync.Once
	tpbenchErr  error
)

// tpbenchBinary builds tpbench once, as the harness builds the release
// binaries, for the benchmarks that run its helpers.
func tpbenchBinary(b *testing.B) string {
	b.Helper()
	tpbenchOnce.Do(func() {
		cmd := exec.Command("go", "build", "-trimpath", "-o", binary(relayComm), "github.com/tp-proxy/tp/cmd/tpbench")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			tpbenchErr = fmt.Errorf("building tpbench: %v\n%s", err, out)
		}
	})
	if tpbenchErr != nil {
		b.Fatal(tpbenchErr)
	}
	return binary(relayComm)
}

// rawQUICFiles are the PEM files the relay's halves are given: a server
// certificate for 127.0.0.1 (the name the client half verifies), a client
// certificate, and the root that signed both.
type rawQUICFiles struct{ serverCert, serverKey, clientCert, clientKey, root string }

func newRawQUICFiles(b *testing.B) rawQUICFiles {
	b.Helper()
	dir := b.TempDir()
	ca := testpki.New(b)
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			b.Fatal(err)
		}
		return p
	}
	pair := func(name string, c tls.Certificate) (string, string) {
		var chain []byte
		for _, der := range c.Certificate {
			chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
		}
		key, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
		if err != nil {
			b.Fatal(err)
		}
		return write(name+".pem", chain), write(name+".key", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}))
	}
	var f rawQUICFiles
	f.serverCert, f.serverKey = pair("server", ca.ServerCert(b, "127.0.0.1"))
	f.clientCert, f.clientKey = pair("client", ca.ClientCert(b, "raw-quic-go", testpki.LeafOptions{}))
	f.root = write("root.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Root.Raw}))
	return f
}

// startRawQUICRelay runs the relay's server half in T (on tpd's address, any
// port) toward target and its client half in C, and returns the client half's
// TCP address in C.
func startRawQUICRelay(b *testing.B, n *ipNet, f rawQUICFiles, target string) string {
	b.Helper()
	srv := startHelperIn(b, n.T, "quic-relay-server", "-listen", "10.201.1.1:0",
		"-cert", f.serverCert, "-key", f.serverKey, "-client-ca", f.root, "-target", target)
	return startHelperIn(b, n.C, "quic-relay-client", "-cert", f.clientCert, "-key", f.clientKey, "-root", f.root, "-server", srv)
}

// startHelperIn runs one of tpbench's helper roles in ns until the benchmark
// ends and returns the address it printed.
func startHelperIn(b *testing.B, ns, role string, args ...string) string {
	b.Helper()
	cmd := command("ip", append([]string{"netns", "exec", ns, tpbenchBinary(b), "__helper", role}, args...)...)
	return startListening(b, cmd, "tpbench's "+role+" in "+ns, regexp.MustCompile(`^ADDR (\S+)$`))
}
