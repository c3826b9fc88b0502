package tpd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy/wire"
)

// tpdSigners returns the real root and issuing intermediate of a running tpd,
// with their keys, to mint certificates its CA would never issue.
func tpdSigners(t *testing.T, d *Daemon) (root, inter testpki.Signer) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(d.cfg.CADir(), "root.key"))
	if err != nil {
		t.Fatal(err)
	}
	rootKey, err := login.ParseKeyPEM(b)
	if err != nil {
		t.Fatal(err)
	}
	return testpki.Signer{Cert: d.pki.Root, Key: rootKey}, testpki.Signer{Cert: d.pki.Intermediate, Key: d.pki.IntermediateKey}
}

// certCase is a device certificate and whether TP's rule accepts it.
type certCase struct {
	name string
	cert tls.Certificate
	ok   bool
}

// deviceCertShapes mints certificates for dev with the running tpd's real root
// and intermediate: one TP's CA would issue, and each shape its rule refuses
// (signed by the root, by a second intermediate, CA:TRUE, no extended key usage).
func deviceCertShapes(t *testing.T, d *Daemon, dev string) []certCase {
	t.Helper()
	root, inter := tpdSigners(t, d)
	second := testpki.NewIntermediate(t, root, "Second Intermediate under tpd's root")
	return []certCase{
		{"good: issued by tpd's intermediate", testpki.DeviceCert(t, inter, dev, nil), true},
		{"bad: signed directly by tpd's root", testpki.DeviceCert(t, root, dev, nil), false},
		{"bad: signed by a second intermediate under tpd's root", testpki.DeviceCert(t, second, dev, nil), false},
		{"bad: CA:TRUE leaf from tpd's intermediate", testpki.DeviceCert(t, inter, dev, func(c *x509.Certificate) {
			c.BasicConstraintsValid, c.IsCA = true, true
		}), false},
		// Decision: a missing EKU is not "any usage" (as x509.Verify reads it) but
		// a refusal; TP requires clientAuth by name.
		{"bad: no extended key usage", testpki.DeviceCert(t, inter, dev, func(c *x509.Certificate) { c.ExtKeyUsage = nil }), false},
	}
}

// dialWithCert dials addr through tpd over transport, presenting cert, and checks
// one round trip.
func dialWithCert(url string, root *x509.Certificate, cert tls.Certificate, transport, addr string) error {
	server, err := clients.ServerAddr(url)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AddCert(root)
	d := &clients.Dialer{Server: server, Transport: transport, Timeout: 10 * time.Second,
		TLSConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write([]byte("x")); err != nil {
		return err
	}
	_, err = io.ReadFull(conn, make([]byte, 1))
	return err
}

// The proxy's TLS and QUIC listeners accept a device certificate only from tpd's
// issuing intermediate, only as an end-entity certificate and only with the
// clientAuth extended key usage named. Each bad certificate is minted with the
// real root and intermediate of the running tpd, for an enrolled device that the
// policy allows, so nothing but the certificate's shape can refuse it.
func TestProxyAcceptsOnlyIssuingIntermediateLeaves(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, allowAlice)
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop") // alice@laptop is enrolled and allowed
	devKey, err := alice.Home.DeviceKey()
	if err != nil {
		t.Fatal(err)
	}
	echo := testnet.Echo(t)
	_, inter := tpdSigners(t, d)
	cases := append(deviceCertShapes(t, d, "alice@laptop"),
		certCase{"bad: anyExtendedKeyUsage only", testpki.DeviceCert(t, inter, "alice@laptop", func(c *x509.Certificate) {
			c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageAny}
		}), false})
	for _, transport := range []string{clients.TransportTLS, clients.TransportQUIC} {
		for _, tc := range cases {
			t.Run(transport+"/"+tc.name, func(t *testing.T) {
				err := dialWithCert(url, d.pki.Root, tc.cert, transport, echo)
				switch {
				case tc.ok && err != nil:
					t.Fatalf("refused: %v", err)
				case !tc.ok && err == nil:
					t.Fatal("the listener accepted it")
				case !tc.ok && !strings.Contains(strings.ToLower(err.Error()), "certificate"):
					t.Fatalf("refused, but not for its certificate: %v", err)
				}
			})
		}
	}
	// tp whoami asks the server about its certificate; the answer is the
	// listeners' own verdict, so it never calls a refused certificate valid.
	for _, tc := range cases {
		who, err := login.Whoami(context.Background(), login.HTTPClient(d.pki.Root), url, "alice@laptop", devKey, tc.cert.Certificate...)
		switch {
		case err != nil:
			t.Errorf("whoami with %s: %v", tc.name, err)
		case who.Certificate == nil:
			t.Errorf("whoami with %s: no verdict on the certificate", tc.name)
		case who.Certificate.Accepted != tc.ok:
			t.Errorf("whoami with %s: accepted %v (%s); the listeners say %v", tc.name, who.Certificate.Accepted, who.Certificate.Reason, tc.ok)
		}
	}
}

// innerCertDialer is bob's dialer that presents his real certificate to tpd and
// inner to the agent of a protected reverse name, so that only the agent's
// end-to-end check can refuse it. The TLS 1.3 client verifies the server (and
// learns the ALPN) before it is asked for its certificate, so VerifyConnection
// says which of the two handshakes asks next; dials run one at a time.
func innerCertDialer(t *testing.T, bob *clients.Client, transport string, inner tls.Certificate) *clients.Dialer {
	t.Helper()
	d, err := bob.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	d.Transport = transport
	var mu sync.Mutex
	e2e := false
	d.TLSConfig.ClientSessionCache = nil // every inner handshake is a full one
	d.TLSConfig.VerifyConnection = func(cs tls.ConnectionState) error {
		mu.Lock()
		e2e = strings.HasPrefix(cs.NegotiatedProtocol, "tp-e2e") // any version of the inner session, a carrier (tp-e2e-mux/1) too
		mu.Unlock()
		return nil
	}
	outer := d.TLSConfig.GetClientCertificate
	d.TLSConfig.GetClientCertificate = func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
		mu.Lock()
		toAgent := e2e
		mu.Unlock()
		if toAgent {
			return &inner, nil
		}
		return outer(cri)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// The agent of a protected reverse name holds dialers to the same rule as tpd:
// a device certificate from TP's issuing intermediate, not CA:TRUE, with
// clientAuth. bob passes tpd with his real certificate and shows the agent one
// minted with tpd's real root and intermediate.
func TestAgentAcceptsOnlyIssuingIntermediateLeaves(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, reversePolicy)
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	bob, _, _ := enrollClient(t, d, url, "bob", "phone")
	local := testnet.Upper(t)
	cases := deviceCertShapes(t, d, "bob@phone")
	for _, transport := range []string{clients.TransportQUIC, clients.TransportTLS} {
		t.Run(transport, func(t *testing.T) {
			startAgent(t, alice, transport, local, []string{"bob"}, nil)
			for _, tc := range cases {
				dl := innerCertDialer(t, bob, transport, tc.cert)
				conn, err := dl.DialContext(context.Background(), "tcp", "svc.rev.tp.internal:22")
				if err == nil {
					_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
					_, err = conn.Write([]byte("hi"))
					if err == nil {
						err = conn.(interface{ CloseWrite() error }).CloseWrite()
					}
					var got []byte
					if err == nil {
						got, err = io.ReadAll(conn)
					}
					if err == nil && string(got) != "HI" {
						t.Errorf("%s: got %q", tc.name, got)
					}
					conn.Close()
				}
				var re *clients.RefusedError
				switch {
				case tc.ok && err != nil:
					t.Errorf("%s: refused: %v", tc.name, err)
				case !tc.ok && err == nil:
					t.Errorf("%s: the agent accepted it", tc.name)
				case !tc.ok && (!errors.As(err, &re) || re.Code != wire.CodeUnauthenticated):
					t.Errorf("%s: %v; want the agent's %s refusal", tc.name, err, wire.CodeUnauthenticated)
				}
			}
		})
	}
}
