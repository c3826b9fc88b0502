package transport

import (
	"errors"
	"strings"
	"testing"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy/wire"
)

// The reasons a QUIC connection ends are said in the client's words, not
// quic-go's. Bad input: a connection closed by tpd with a reason of its own
// (tp forward once logged "lost the QUIC connection to ADDR: Application
// error 0x1 (remote): too many requests cancelled before their answer"), one
// closed by tpd with none, one this side closed, one that went quiet and one
// the server no longer knew; each also keeps quic-go's error for errors.As.
func TestExplainQUICConnectionEnds(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{&quic.ApplicationError{Remote: true, ErrorCode: wire.QUICInternal, ErrorMessage: "too many requests cancelled before their answer"},
			"the TP server closed the connection: too many requests cancelled before their answer (QUIC code 0x1)"},
		{&quic.ApplicationError{Remote: true, ErrorCode: wire.QUICNoError},
			"the TP server closed the connection: it gave no reason (QUIC code 0x0)"},
		{&quic.ApplicationError{ErrorCode: wire.QUICNoError}, "this client closed the connection"},
		{&quic.IdleTimeoutError{}, "the TP server stopped answering (network down, or the server is gone)"},
		{&quic.StatelessResetError{}, "the TP server no longer knows this connection; it probably restarted"},
	} {
		got := ExplainQUIC(tc.err, nil)
		if got.Error() != tc.want {
			t.Errorf("%v (%T) is said as\n\t%s\nwant\n\t%s", tc.err, tc.err, got, tc.want)
		}
		if !errors.Is(got, tc.err) {
			t.Errorf("%q lost the error it explains", got)
		}
		if strings.Contains(got.Error(), "Application error") || strings.Contains(got.Error(), "no recent network activity") {
			t.Errorf("%q keeps quic-go's words", got)
		}
	}
	// The codes tpd closes with for a reason of TP's keep their sentences.
	shut := ExplainQUIC(&quic.ApplicationError{Remote: true, ErrorCode: wire.QUICShutdown, ErrorMessage: "server shutting down"}, nil)
	if !strings.HasPrefix(shut.Error(), "the TP server is shutting down or restarting") {
		t.Errorf("a shutdown's close is said as %q", shut)
	}
}
