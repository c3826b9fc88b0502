package transport

import (
	"context"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy/wire"
)

// TestLostConnectionNotHandedOutAgain: a request on the Client's QUIC
// connection failed with a connection error (bad input: a stateless reset, as
// a tpd restarted after a crash sends to the connections of the one before
// it) while quic-go has not cancelled the connection's context yet, the state
// that a loaded machine can keep for longer than connLost's wait. The retry
// must get a new connection, not the one the reset ended: handed out again,
// it failed the retry with the same reset (TestForwardQUICAfterCrash, under
// load). The connection here is still up, so its context stays uncancelled
// for as long as the test needs.
func TestLostConnectionNotHandedOutAgain(t *testing.T) {
	t.Parallel()
	d, echo := quicPoolEnv(t, 100)
	_ = openEchoed(t, d, echo).Close()
	old := d.LiveQUIC()
	if old == nil {
		t.Fatal("no QUIC connection after a dial")
	}
	defer old.CloseWithError(wire.QUICNoError, "")
	if !d.connLost(old, &quic.StatelessResetError{}) {
		t.Fatal("a stateless reset did not count as a lost connection")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := d.quicConn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if c == old {
		t.Fatal("the Client handed out again the connection that a stateless reset had ended")
	}
	_ = openEchoed(t, d, echo).Close() // and requests run on the new one
	if d.LiveQUIC() != c {
		t.Fatal("the request did not use the new connection")
	}
}
