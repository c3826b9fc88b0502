package proxy_test

import (
	"testing"

	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// SetLimits changes the bounds of a running server: bad input is a device
// opening a third session after max-sessions-per-identity was lowered from 4
// to 2 while two of its sessions run. The two keep running; the third is
// refused with too_many_sessions naming the new bound, over TLS and QUIC; a
// negative bound is refused and changes nothing.
func TestSetLimitsLive(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, func(c *proxy.Config) { c.MaxSessionsPerIdentity = 4 }, proxy.QUICOptions{})
	open := func(tr string) (wire.Stream, wire.ServerHello) {
		st := q.streamAs(t, &q.cert, tr, nil)
		return st, mustHello(t, st, dialHello(t, q.echo))
	}
	var live []wire.Stream
	for _, tr := range bothTransports {
		st, sh := open(tr)
		if !sh.OK {
			t.Fatalf("%s: %+v", tr, sh)
		}
		quicEcho(t, st, "open")
		live = append(live, st)
	}
	l := q.srv.Limits()
	l.MaxSessionsPerIdentity = 2
	if err := q.srv.SetLimits(l); err != nil {
		t.Fatal(err)
	}
	for _, tr := range bothTransports {
		_, sh := open(tr)
		wantRefusal(t, sh, proxy.CodeTooManySessions, "2 sessions")
	}
	for _, st := range live {
		quicEcho(t, st, "admitted before the change, still served")
	}
	bad := l
	bad.MaxConns = -1
	if err := q.srv.SetLimits(bad); err == nil {
		t.Fatal("a negative MaxConns was accepted")
	}
	if got := q.srv.Limits(); got != l {
		t.Fatalf("a refused SetLimits changed the limits to %+v", got)
	}
}
