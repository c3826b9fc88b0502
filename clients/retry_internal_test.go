package clients

import (
	"io"
	"testing"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy/wire"
)

// Which failures on a spare connection are retried on a new one. Bad input: a
// spare that failed without an answer after its attach carried the dial's first
// bytes (they may have reached the service): not retried, so the service never
// gets a request twice.
func TestSpareRetryDecision(t *testing.T) {
	t.Parallel()
	lost := &exchangeError{io.ErrUnexpectedEOF}
	for _, tc := range []struct {
		what  string
		err   error
		early *earlyDial
		want  bool
	}{
		{"connection lost before any answer", lost, nil, true},
		{"lost, first bytes still waiting for the ok", lost, &earlyDial{first: []byte("x")}, true},
		{"lost after first bytes went sealed in an attach", lost, &earlyDial{first: []byte("x"), sealed: true}, false},
		{"hello_timeout: the server read nothing", &RefusedError{Code: wire.CodeHelloTimeout}, &earlyDial{sealed: true}, true},
		{"a refusal about the request", &RefusedError{Code: wire.CodePolicyDenied}, nil, false},
		{"the agent's failure after the ok", io.ErrUnexpectedEOF, nil, false},
	} {
		if got := tc.early.RetryOnNew(tc.err); got != tc.want {
			t.Errorf("%s: retry %v; want %v", tc.what, got, tc.want)
		}
	}
}

// A dial over QUIC goes again on a new connection after the old one was lost
// only when its first bytes cannot have reached the service. Bad input: a lost
// connection after first bytes went sealed in an attach; a stateless reset
// (the server held nothing of it) is still retried.
func TestResendAfterLostConnection(t *testing.T) {
	t.Parallel()
	sealed := &earlyDial{first: []byte("x"), sealed: true}
	for _, tc := range []struct {
		what  string
		err   error
		early *earlyDial
		want  bool
	}{
		{"no first bytes", io.ErrUnexpectedEOF, nil, true},
		{"first bytes not sealed", io.ErrUnexpectedEOF, &earlyDial{first: []byte("x")}, true},
		{"first bytes sealed, connection lost", io.ErrUnexpectedEOF, sealed, false},
		{"first bytes sealed, stateless reset", &quic.StatelessResetError{}, sealed, true},
	} {
		if got := mayResend(tc.err, tc.early); got != tc.want {
			t.Errorf("%s: resend %v; want %v", tc.what, got, tc.want)
		}
	}
}
