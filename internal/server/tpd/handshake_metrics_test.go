package tpd

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy/wire"
)

// Bad input, each kind once: TLS handshakes to the proxy with an expired
// certificate, one from another CA, one signed by tpd's root instead of its
// issuing intermediate, a deny-listed one, one for a device never enrolled;
// then connections that never start a handshake, more of them at once than
// max-handshakes-per-ip allows. tp_handshake_failures_total counts each under
// its reason, exactly once. (QUIC handshakes that fail are not seen by tpd:
// quic-go hands over only established connections.)
func TestHandshakeFailureReasons(t *testing.T) {
	t.Parallel()
	r, admin := adminDaemon(t, allowAlice, "127.0.0.1:0", func(cfg *config.Server) {
		cfg.HandshakeTimeout = time.Second
		cfg.MaxHandshakesPerIP = 3
	})
	d := r.d
	enrollClient(t, d, r.url, "alice", "laptop")
	echo := testnet.Echo(t)
	root, inter := tpdSigners(t, d)
	const dev = "alice@laptop"
	revoked := testpki.DeviceCert(t, inter, dev, nil)
	d.DenyList().Add(authz.DenySerial, revoked.Leaf.SerialNumber.Text(16))
	for _, c := range []struct {
		name, reason string
		mint         func(t *testing.T) tls.Certificate
		raw          bool // present it although the server does not name its CA (Go's client would not)
	}{
		{"expired", "expired", func(t *testing.T) tls.Certificate {
			return testpki.DeviceCert(t, inter, dev, func(c *x509.Certificate) {
				c.NotBefore, c.NotAfter = time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour)
			})
		}, false},
		{"from another CA", "unknown_ca", func(t *testing.T) tls.Certificate {
			return testpki.New(t).ClientCert(t, dev, testpki.LeafOptions{})
		}, true},
		{"from another CA, as Go's client does it", "no_cert", func(t *testing.T) tls.Certificate {
			return testpki.New(t).ClientCert(t, dev, testpki.LeafOptions{})
		}, false},
		{"signed by tpd's root", "unknown_ca", func(t *testing.T) tls.Certificate { return testpki.DeviceCert(t, root, dev, nil) }, false},
		{"deny-listed", "revoked", func(*testing.T) tls.Certificate { return revoked }, false},
		{"device never enrolled", "unknown_device", func(t *testing.T) tls.Certificate {
			return testpki.DeviceCert(t, inter, "mallory@box", nil)
		}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			key := `tp_handshake_failures_total{reason="` + c.reason + `"}`
			before := scrapeMetrics(t, admin).get(t, key)
			var err error
			if c.raw {
				err = dialPresenting(r.addr, rootPool(r.d), c.mint(t))
			} else {
				err = dialWithCert(r.url, d.pki.Root, c.mint(t), clients.TransportTLS, echo)
			}
			if err == nil {
				t.Fatal("the handshake succeeded")
			}
			pollMetric(t, admin, key, before+1)
		})
	}

	// Four connections that send nothing: the server accepts them in order; the
	// first three wait for their handshake until handshake-timeout (1s), the
	// fourth is over max-handshakes-per-ip (3) and closed at once.
	s0 := scrapeMetrics(t, admin)
	var conns []net.Conn
	for range 4 {
		c, err := net.Dial("tcp", r.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	for _, c := range conns {
		_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
		_, err := io.ReadAll(c)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("an idle connection was not closed within 30s")
		}
	}
	// tpd counts a failure just after it closes the connection, so the last
	// count may trail the close the client saw: wait for it.
	for reason, want := range map[string]float64{"per_ip_cap": 1, "timeout": 3} {
		key := `tp_handshake_failures_total{reason="` + reason + `"}`
		pollMetric(t, admin, key, s0.get(t, key)+want)
	}
}

// dialPresenting runs a proxy handshake that presents cert whatever CAs the
// server names, verifying the server against roots, and returns how it ended.
func dialPresenting(addr string, roots *x509.CertPool, cert tls.Certificate) error {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, &tls.Config{
		RootCAs:    roots,
		NextProtos: []string{wire.ALPN},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &cert, nil
		},
	})
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = c.Read(make([]byte, 1)) // TLS 1.3: the server's verdict arrives after the client's Finished
	return err
}

// rootPool holds d's root, which the server's certificate chains to.
func rootPool(d *Daemon) *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(d.pki.Root)
	return p
}
