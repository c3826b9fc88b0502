package clients

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// A connection to the server that failed every way it was tried is one
// sentence: the server and the most telling cause. Bad input: the joined
// failures of the attempts (a carrier each, and TLS), as tp forward and tp
// expose once printed them whole on every retry ("…over udp: context
// canceled\nover tls: … dial tcp …: connect: connection refused\nover ws: …").
func TestUnreachableNamesTheTellingCause(t *testing.T) {
	t.Parallel()
	_, refused := net.Dial("tcp", testnet.Refusing(t)) // nothing listens
	if !errors.Is(refused, syscall.ECONNREFUSED) {
		t.Fatalf("a dial to a free port: %v; want connection refused", refused)
	}
	canceled := fmt.Errorf("over udp: %w", context.Canceled)
	tcp := func(err error) error {
		return fmt.Errorf("over tls: connecting to TP server for the tls carrier: %w", err)
	}
	for _, tt := range []struct {
		what    string
		err     error
		udpOnly bool
		want    string
	}{
		{"nothing listens", errors.Join(canceled, tcp(refused), tcp(refused)), false,
			"nothing listens there (TCP connection refused); is tpd running, and is this its address?"},
		{"silence", errors.Join(fmt.Errorf("over udp: %w", context.DeadlineExceeded), fmt.Errorf("dial tcp: %w", context.DeadlineExceeded)), false,
			"no answer within 30s: is it reachable from this network, and is this its address?"},
		{"silence over UDP alone", fmt.Errorf("over udp: %w", &quic.HandshakeTimeoutError{}), true,
			"no answer over UDP within 30s: is tpd running there, and does this network let UDP through (--transport tls avoids UDP)?"},
		{"the device's certificate refused", errors.Join(canceled, &transport.RejectedError{Err: errors.New("remote error: tls: bad certificate")}, tcp(refused)), false,
			"it refused this device's certificate (tp whoami asks it why; dlogin gets a new certificate, unless the device was revoked)"},
		{"a server TP's CA did not certify", errors.Join(canceled, tcp(&tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}})), false,
			"its certificate is not one this device trusts for it (x509: certificate signed by unknown authority): is this the TP server"},
		{"a server that stops", errors.Join(&quic.TransportError{Remote: true, ErrorCode: quic.ConnectionRefused}, tcp(refused)), false,
			"it refused the connection (it is stopping, or has too many handshakes under way)"},
		{"a server that shuts down", &quic.ApplicationError{Remote: true, ErrorCode: wire.QUICShutdown}, false,
			"it is shutting down or restarting"},
		{"a name that does not resolve", tcp(&net.DNSError{Err: "no such host", Name: "tp.example.invalid", IsNotFound: true}), false,
			"its name does not resolve (lookup tp.example.invalid: no such host)"},
		{"anything else", errors.Join(errors.New("first"), errors.New("second")), false, "first; second"},
	} {
		got := transport.ReachCause(tt.err, 30*time.Second, tt.udpOnly, (*Dialer)(nil).expiredAdvice())
		if !strings.HasPrefix(got, tt.want) {
			t.Errorf("%s: %q\n  want %q", tt.what, got, tt.want)
		}
		if strings.Contains(got, "dial tcp") || strings.Contains(got, "over udp") || strings.Contains(got, "\n") {
			t.Errorf("%s: the cause repeats the raw errors: %q", tt.what, got)
		}
	}

	d := &Dialer{Server: "127.0.0.1:4433"}
	err := d.transport().Unreachable(errors.Join(canceled, tcp(refused)))
	if !errors.Is(err, syscall.ECONNREFUSED) || !errors.Is(err, context.Canceled) {
		t.Errorf("the attempts' errors are not kept for the debug log: %v", errors.Unwrap(err))
	}
	if got, want := retryLine(err, 1500*time.Millisecond), "cannot reach the TP server at 127.0.0.1:4433: nothing listens there (TCP connection refused); is tpd running, and is this its address? Next attempt in 1.5s."; got != want {
		t.Errorf("retry line:\n  %s\nwant\n  %s", got, want)
	}
	shut := d.transport().Unreachable(&quic.ApplicationError{Remote: true, ErrorCode: wire.QUICShutdown})
	if got, want := retryLine(shut, time.Second), "cannot reach the TP server at 127.0.0.1:4433: it is shutting down or restarting. Next attempt in 1s."; got != want {
		t.Errorf("retry line:\n  %s\nwant\n  %s", got, want)
	}
}

// A dial with --transport quic to a server that never answers over UDP says so
// in the same sentence as auto's, after the dial's Timeout. Bad input: a UDP
// port that takes the packets and answers none. tp once said "connecting to
// TP server ADDR over QUIC: the TP server stopped answering (network down, or
// the server is gone): timeout: no recent network activity", of a server that
// had never answered.
func TestQUICOnlyUnreachable(t *testing.T) {
	t.Parallel()
	silent, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	addr := silent.LocalAddr().String()
	d := &Dialer{Server: addr, Transport: TransportQUIC, Timeout: 2 * time.Second, TLSConfig: &tls.Config{}}
	defer d.Close()
	_, err = d.DialContext(context.Background(), "tcp", "db.internal:5432")
	if ue := (*UnreachableError)(nil); !errors.As(err, &ue) {
		t.Fatalf("a QUIC dial to %s, which never answers, failed with %v (%T); want an *UnreachableError", addr, err, err)
	}
	want := "cannot reach the TP server at " + addr + ": no answer over UDP within 2s: is tpd running there, and does this network let UDP through (--transport tls avoids UDP)?"
	if err.Error() != want {
		t.Errorf("a QUIC dial to a silent server says\n\t%s\nwant\n\t%s", err, want)
	}
}
