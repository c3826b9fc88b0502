package clients

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy/wire"
)

// A session cut because the client certificate expired says what this device
// can do about it: tp renews the certificate with the device key, or dlogin
// gets a new one. The bad state: TP_HOME lost its device key, so neither can
// work, and the cut must send the person to be enrolled again instead.
func TestExpiredCutAdvice(t *testing.T) {
	t.Parallel()
	ca := testpki.New(t)
	cert := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	h := Home{Dir: t.TempDir()}
	if err := h.Init(); err != nil {
		t.Fatal(err)
	}
	if err := h.SaveProfile(Profile{Server: "https://127.0.0.1:8443", DeviceID: "alice@laptop"}); err != nil {
		t.Fatal(err)
	}
	if err := h.SaveRoot(ca.Root); err != nil {
		t.Fatal(err)
	}
	if err := h.SaveCredentials(&login.Credentials{Chain: []*x509.Certificate{cert.Leaf, ca.Intermediate}, Key: cert.PrivateKey.(*ecdsa.PrivateKey)}); err != nil {
		t.Fatal(err)
	}
	key, err := NewDeviceKey()
	if err != nil {
		t.Fatal(err)
	}
	if err := h.SaveDeviceKey(key); err != nil {
		t.Fatal(err)
	}
	c, err := Open(h)
	if err != nil {
		t.Fatal(err)
	}
	d, err := c.Dialer()
	if err != nil {
		t.Fatal(err)
	}

	withKey := codeEnd(wire.QUICCertExpired, d).Reason
	if !strings.Contains(withKey, "tp renews it on the next connection, or run dlogin") {
		t.Errorf("with the device key, an expired certificate's cut says %q; want it to say that tp renews it, or dlogin", withKey)
	}

	if err := os.Remove(filepath.Join(h.Dir, deviceKeyFile)); err != nil {
		t.Fatal(err)
	}
	noKey := codeEnd(wire.QUICCertExpired, d).Reason
	for _, want := range []string{"the client certificate expired", "device key is missing", "enrolled again", "tpd enroll alice --device laptop"} {
		if !strings.Contains(noKey, want) {
			t.Errorf("without the device key, an expired certificate's cut says %q; want %q in it", noKey, want)
		}
	}
	if strings.Contains(noKey, "tp renews it") || strings.HasSuffix(noKey, "run dlogin") {
		t.Errorf("without the device key, an expired certificate's cut says %q: it offers a renewal or a dlogin that cannot work", noKey)
	}

	// The same advice where QUIC's connection close says it: a dial refused,
	// or a connection lost, for an expired certificate.
	closed := &quic.ApplicationError{Remote: true, ErrorCode: wire.QUICCertExpired}
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"the QUIC connection's close", transport.ExplainQUIC(closed, d.expiredAdvice)},
		{"the hello's answer", explainHelloErr(&wire.QUICConnError{Err: closed}, d.expiredAdvice)},
		// tp forward --udp's flow ended by the connection's close: its line
		// once read "Application error 0x4 (remote): client certificate
		// expired; run dlogin".
		{"a UDP flow's end", errors.New(flowEnd(&net.OpError{Op: "read", Net: "quic", Err: &wire.QUICConnError{Err: &quic.ApplicationError{Remote: true, ErrorCode: wire.QUICCertExpired, ErrorMessage: "client certificate expired; run dlogin"}}}, d))},
	} {
		msg := tc.err.Error()
		if !strings.Contains(msg, "the client certificate expired") || !strings.Contains(msg, "tpd enroll alice --device laptop") || strings.Contains(msg, "tp renews it") {
			t.Errorf("without the device key, %s for an expired certificate says %q; want the advice to enrol again, not a renewal", tc.name, msg)
		}
	}
}

// A connection to the server that needs a new handshake (tp forward's after
// its QUIC connection was cut, a dial over TLS) while the certificate has
// expired and the device key is missing says that this device must be
// enrolled again. Bad state: the certificate past its end (the Client's
// clock 5 hours on) and device.key gone. Over QUIC tp once said "cannot reach
// the TP server at ADDR: it refused this device's certificate (tp whoami asks
// it why; dlogin gets a new certificate …)": the handshake this side ended
// for want of a certificate read as the server's refusal.
func TestExpiredWithoutKeyHandshake(t *testing.T) {
	t.Parallel()
	ca := testpki.New(t)
	cert := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	h := Home{Dir: t.TempDir()}
	if err := h.Init(); err != nil {
		t.Fatal(err)
	}
	if err := h.SaveProfile(Profile{Server: "https://127.0.0.1:8443", DeviceID: "alice@laptop"}); err != nil {
		t.Fatal(err)
	}
	if err := h.SaveRoot(ca.Root); err != nil {
		t.Fatal(err)
	}
	if err := h.SaveCredentials(&login.Credentials{Chain: []*x509.Certificate{cert.Leaf, ca.Intermediate}, Key: cert.PrivateKey.(*ecdsa.PrivateKey)}); err != nil {
		t.Fatal(err)
	}
	c, err := Open(h) // no device key saved
	if err != nil {
		t.Fatal(err)
	}
	c.Now = func() time.Time { return time.Now().Add(5 * time.Hour) }
	for _, transport := range []string{TransportQUIC, TransportTLS, TransportAuto} {
		srv := StartTestServerQUIC(t, nil) // a real server; only its address and root are used
		d, err := c.Dialer()
		if err != nil {
			t.Fatal(err)
		}
		d.Server, d.QUICServer, d.Transport, d.Cache = srv.Server, srv.QUICServer, transport, nil
		d.TLSConfig.RootCAs = srv.TLSConfig.RootCAs
		_, err = d.DialContext(context.Background(), "tcp", "db.internal:5432")
		_ = d.Close()
		if err == nil {
			t.Fatalf("over %s, a dial without a certificate to show succeeded", transport)
		}
		msg := err.Error()
		for _, want := range []string{"certificate expired at", "cannot be renewed", "the device key is missing", "tpd enroll alice --device laptop"} {
			if !strings.Contains(msg, want) {
				t.Errorf("over %s, the dial says %q; want %q in it", transport, msg, want)
			}
		}
		for _, wrong := range []string{"refused this device's certificate", "rejected", "dlogin gets a new", "CRYPTO_ERROR"} {
			if strings.Contains(msg, wrong) {
				t.Errorf("over %s, the dial says %q: %q is not what happened", transport, msg, wrong)
			}
		}
	}
}

// A UDP flow's end is said in TP's words whichever way the server ended it.
// Bad input, as the flow's stream reports them: its reset for a revocation,
// the connection closed for a shutdown and for a reason of tpd's own; each
// once showed the stream's or quic-go's words ("read quic …: stream reset by
// the peer", "Application error 0x3 (remote): server shutting down").
func TestFlowEndWords(t *testing.T) {
	op := func(err error) error { return &net.OpError{Op: "read", Net: "quic", Err: err} }
	closed := func(code quic.ApplicationErrorCode, msg string) error {
		return op(&wire.QUICConnError{Err: &quic.ApplicationError{Remote: true, ErrorCode: code, ErrorMessage: msg}})
	}
	for _, tc := range []struct {
		err  error
		want string
	}{
		{op(wire.ResetError(wire.QUICRevoked)), "the flow was cut off by the TP server (revoked): this device, its user or its certificate was revoked on the TP server; ask your TP administrator"},
		{closed(wire.QUICShutdown, "server shutting down"), "the flow was cut off by the TP server (shutdown): the TP server is shutting down; reconnect"},
		{closed(wire.QUICInternal, "too many requests cancelled before their answer"), "the TP server closed the connection: too many requests cancelled before their answer (QUIC code 0x1)"},
		{errFlowIdle, "idle"},
		{context.Canceled, "forwarder stopped"},
	} {
		if got := flowEnd(tc.err, nil); got != tc.want {
			t.Errorf("%v ends a flow as\n\t%s\nwant\n\t%s", tc.err, got, tc.want)
		}
	}
}
