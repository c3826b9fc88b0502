package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/mux"
	"github.com/tp-proxy/tp/proxy/wire"
)

// silentResolver is Go's DNS client sent to a UDP socket that reads every
// query and never answers: a lookup lasts until its context ends, so a
// request's set-up is under way, and cancellable, for as long as a test needs.
// asked counts the queries it read.
func silentResolver(t *testing.T) (r *net.Resolver, asked *atomic.Int64) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	asked = new(atomic.Int64)
	go func() {
		buf := make([]byte, 1500)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
			asked.Add(1)
		}
	}()
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "udp", pc.LocalAddr().String())
	}}, asked
}

// setUpStarted waits until the server's lookup for a request opened after
// asked counted before has reached the resolver, or until over says the
// connection takes no more requests: the request's set-up is under way, so
// that its cancel is one before its answer. (A request reset before the
// server read its hello costs the server nothing and is not counted.)
func setUpStarted(t *testing.T, asked *atomic.Int64, before int64, over func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for asked.Load() == before && !over() {
		if time.Now().After(deadline) {
			t.Fatal("the server started no lookup for an opened request within 20s")
		}
		time.Sleep(time.Millisecond) // polling, bounded by the deadline
	}
}

// rapidResets is how many requests a test opens and cancels: past the
// server's bound (100) with a margin, and fewer than a QUIC connection's or
// a tp-mux connection's streams at once.
const rapidResets = 300

// Bad input, over QUIC: a client opens request after request (a dial of a
// name whose lookup never ends) and cancels each at once, a rapid reset
// (CVE-2023-44487's pattern). Before, every request's set-up ran to its end:
// 20,000 such pairs made tpd dial 3,698 times. Now a cancelled request's
// set-up is cancelled with it, and once cancelled requests pass the bound and
// outnumber the answered ones, the server closes the connection.
func TestRapidResetQUIC(t *testing.T) {
	resolver, asked := silentResolver(t)
	q := newQUICEnv(t, func(c *proxy.Config) { c.Resolver = resolver }, proxy.QUICOptions{})
	conn, err := q.quicConn(t, &q.cert)
	if err != nil {
		t.Fatal(err)
	}
	// One request answered first: the bound compares with those.
	quicEcho(t, rawRequest(t, conn, q.echo), "answered")
	for i := range rapidResets {
		before := asked.Load()
		str, err := conn.OpenStream()
		if err != nil {
			break // the server closed the connection: what is under test, checked below
		}
		// A name of its own: Go's resolver joins a lookup of a name already
		// under way (which a cancel does not end) instead of asking again.
		host := fmt.Sprintf("slow-%d.test", i)
		if err := wire.WriteClientHello(str, wire.ClientHello{V: 1, Op: "dial", Net: "tcp", Host: host, Port: 80}); err != nil {
			break
		}
		setUpStarted(t, asked, before, func() bool { return conn.Context().Err() != nil })
		str.CancelRead(quic.StreamErrorCode(wire.QUICPeerReset))
		str.CancelWrite(quic.StreamErrorCode(wire.QUICPeerReset))
	}
	select {
	case <-conn.Context().Done():
	case <-time.After(20 * time.Second):
		t.Fatalf("the connection stayed open after %d requests cancelled before their answer", rapidResets)
	}
	var ae *quic.ApplicationError
	if err := context.Cause(conn.Context()); !errors.As(err, &ae) || !ae.Remote || ae.ErrorCode != wire.QUICInternal || !strings.Contains(ae.ErrorMessage, "cancelled before their answer") {
		t.Fatalf("the connection ended with %v; want the server's close for cancelled requests (internal, 0x1)", err)
	}
	waitUntil(t, 10*time.Second, "the cancelled requests' sessions to end", func() bool { return q.srv.Live() == 0 })
	q.mustEcho(t) // others are served as before
}

// The same over tp-mux/1: the server answers the flood with GOAWAY and takes
// no further stream on the connection.
func TestRapidResetTLSMux(t *testing.T) {
	resolver, asked := silentResolver(t)
	e := newEnv(t, func(c *proxy.Config) { c.Resolver = resolver })
	m, _ := e.muxConn(t)
	st, sh := muxDial(t, m, e.echo) // one answered first
	if !sh.OK {
		t.Fatalf("the first dial: %+v", sh)
	}
	st.Abort(0)
	for i := range rapidResets {
		var hb bytes.Buffer // a name of its own, as above
		if err := wire.WriteClientHello(&hb, wire.ClientHello{V: 1, Op: "dial", Net: "tcp", Host: fmt.Sprintf("slow-%d.test", i), Port: 80}); err != nil {
			t.Fatal(err)
		}
		before := asked.Load()
		st, err := m.Open(hb.Bytes())
		if err != nil {
			// Refused after the GOAWAY (ErrFull), or, when the server had
			// already ended the connection with its last stream, a failed write.
			if !errors.Is(err, mux.ErrFull) && m.Usable(time.Now()) {
				t.Fatalf("opening request %d: %v; want it refused by the server's GOAWAY (ErrFull)", i+1, err)
			}
			break
		}
		setUpStarted(t, asked, before, func() bool { return !m.Usable(time.Now()) })
		st.Abort(wire.QUICPeerReset)
	}
	waitUntil(t, 20*time.Second, "the server's GOAWAY after the cancelled requests", func() bool { return !m.Usable(time.Now()) })
	waitUntil(t, 10*time.Second, "the cancelled requests' sessions to end", func() bool { return e.srv.Live() == 0 })
	e.mustEcho(t)
}
