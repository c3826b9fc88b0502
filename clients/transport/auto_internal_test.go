package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// tlsAttempt is what the test's relay in front of the TP server saw when a TLS
// attempt arrived: whether the test had ended the head start by then, and
// whether the Client's QUIC connect was still under way.
type tlsAttempt struct{ headStartOver, quicDialing bool }

// autoEnv is a Client with transport auto whose TLS attempts pass through a
// relay that reports each, whose QUIC peer is a UDP socket the test controls,
// and whose head start ends when the test says so.
type autoEnv struct {
	d             *Client
	echo          string
	udp           *net.UDPConn
	headStartOver atomic.Bool
	headStart     chan time.Duration // the head start race asked for
	fire          chan time.Time     // the test ends the head start
	tlsAttempts   chan tlsAttempt
}

func newAutoEnv(t *testing.T) *autoEnv {
	t.Helper()
	d, echo := spareEnv(t)
	e := &autoEnv{d: d, echo: echo, headStart: make(chan time.Duration, 1), fire: make(chan time.Time, 1),
		tlsAttempts: make(chan tlsAttempt, 8)}
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = udp.Close() })
	e.udp = udp
	relay, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = relay.Close() })
	server := d.Server
	go func() {
		for {
			c, err := relay.Accept()
			if err != nil {
				return
			}
			d.quic.mu.Lock()
			dialing := d.quic.dialing != nil
			d.quic.mu.Unlock()
			e.tlsAttempts <- tlsAttempt{headStartOver: e.headStartOver.Load(), quicDialing: dialing}
			up, err := net.Dial("tcp", server)
			if err != nil {
				_ = c.Close()
				continue
			}
			go func() { _, _ = io.Copy(up, c); _ = up.Close() }()
			go func() { _, _ = io.Copy(c, up); _ = c.Close() }()
		}
	}()
	// The discovery document (which this server does not have) is asked for
	// past the relay, which counts only the race's TLS attempts.
	d.DiscoveryURL = "https://" + server + wire.DiscoveryPath
	// Carrier udp forced: the race of QUIC over UDP against TP's plain TLS
	// transport, without the stream carriers (carrier_auto_test.go has those).
	d.Server, d.QUICServer, d.Transport, d.Carrier = relay.Addr().String(), udp.LocalAddr().String(), Auto, wire.CarrierUDP
	d.quic.headStartTimer = func(head time.Duration) <-chan time.Time {
		e.headStart <- head
		return e.fire
	}
	return e
}

// dial starts a dial of the echo service and returns where its result arrives.
func (e *autoEnv) dial() <-chan net.Conn {
	res := make(chan net.Conn, 1)
	go func() {
		c, err := dialEcho(context.Background(), e.d, e.echo)
		if err != nil {
			res <- nil
			return
		}
		res <- c
	}()
	return res
}

// readQUIC returns the next packet the Client sent to the QUIC address.
func (e *autoEnv) readQUIC(t *testing.T) ([]byte, *net.UDPAddr) {
	t.Helper()
	buf := make([]byte, 2048)
	_ = e.udp.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, from, err := e.udp.ReadFromUDP(buf)
	if err != nil {
		t.Fatalf("no QUIC packet from the dialer: %v", err)
	}
	return buf[:n], from
}

func expectTLSEcho(t *testing.T, res <-chan net.Conn) {
	t.Helper()
	var c net.Conn
	select {
	case c = <-res:
	case <-time.After(20 * time.Second):
		t.Fatal("the dial did not complete")
	}
	if c == nil {
		t.Fatal("the dial failed")
	}
	defer c.Close()
	inner := c
	for {
		u, ok := inner.(interface{ Unwrap() net.Conn })
		if !ok {
			break
		}
		inner = u.Unwrap()
	}
	if _, ok := inner.(*tls.Conn); !ok {
		t.Fatalf("auto returned %T on %T, want a TLS connection", c, inner)
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	if _, err := io.ReadFull(c, b); err != nil || b[0] != 'x' {
		t.Fatalf("echo over the TLS fallback: %q, %v", b, err)
	}
}

// With QUIC unanswered, auto tries TLS when the head start (150 ms) is over,
// while QUIC is still connecting, and not before: the head start is a timer the
// test ends by hand, and the relay in front of the server sees when TLS comes.
// Bad input: a QUIC address where nothing answers.
func TestAutoStartsTLSWhenHeadStartEnds(t *testing.T) {
	t.Parallel()
	e := newAutoEnv(t)
	res := e.dial()
	select {
	case head := <-e.headStart:
		if head != 150*time.Millisecond {
			t.Fatalf("head start %s, want 150ms", head)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("auto did not start a race")
	}
	// The QUIC attempt is under way and unanswered: its ClientHello (two
	// Initial packets), then a retransmission when its probe timer fires, a
	// loss-recovery interval later (about 200 ms here).
	for range 3 {
		_ = e.udp.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, _, err := e.udp.ReadFromUDP(make([]byte, 2048)); err != nil {
			break // the QUIC attempt stopped: a TLS attempt below says why
		}
	}
	select {
	case a := <-e.tlsAttempts:
		t.Fatalf("TLS was tried before the head start was over (%+v)", a)
	default:
	}
	e.readQUIC(t) // still trying QUIC
	e.headStartOver.Store(true)
	e.fire <- time.Now()
	select {
	case a := <-e.tlsAttempts:
		if !a.headStartOver || !a.quicDialing {
			t.Fatalf("TLS attempt %+v; want it after the head start, with QUIC still connecting", a)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no TLS attempt after the head start was over")
	}
	expectTLSEcho(t, res)
}

// versionNegotiation answers a QUIC Initial with a Version Negotiation packet
// offering only a version nobody speaks (RFC 9000, 17.2.1; RFC 8999): the
// client's connect fails at once.
func versionNegotiation(initial []byte) []byte {
	if len(initial) < 7 || initial[0]&0x80 == 0 {
		return nil
	}
	dcidLen := int(initial[5])
	if len(initial) < 6+dcidLen+1 {
		return nil
	}
	dcid := initial[6 : 6+dcidLen]
	scidLen := int(initial[6+dcidLen])
	if len(initial) < 7+dcidLen+scidLen {
		return nil
	}
	scid := initial[7+dcidLen : 7+dcidLen+scidLen]
	p := []byte{0x80, 0, 0, 0, 0, byte(len(scid))}
	p = append(p, scid...)
	p = append(p, byte(len(dcid)))
	p = append(p, dcid...)
	return append(p, 0x1a, 0x2a, 0x3a, 0x4a) // a reserved (greased) version only
}

// When QUIC fails outright, auto tries TLS at once, without waiting for the head
// start (which the test never ends). Bad input: a QUIC server that speaks no
// version the client does.
func TestAutoTriesTLSWhenQUICFails(t *testing.T) {
	t.Parallel()
	e := newAutoEnv(t)
	res := e.dial()
	<-e.headStart
	initial, from := e.readQUIC(t)
	vn := versionNegotiation(initial)
	if vn == nil {
		t.Fatalf("first QUIC packet is no long-header Initial: %x", initial[:min(len(initial), 16)])
	}
	if _, err := e.udp.WriteToUDP(vn, from); err != nil {
		t.Fatal(err)
	}
	select {
	case a := <-e.tlsAttempts:
		if a.headStartOver {
			t.Fatalf("TLS attempt %+v: the head start was ended", a)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no TLS attempt after QUIC failed; auto waited for the head start")
	}
	expectTLSEcho(t, res)
}

// A UDP flow whose race TLS won remembers the fallback as a TCP dial does:
// for DefaultFallbackTTL, after which QUIC is raced again, not for the cache's
// whole TTL. Bad input: a QUIC server that speaks no version the client does.
func TestAutoUDPRemembersFallbackBriefly(t *testing.T) {
	t.Parallel()
	e := newAutoEnv(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		// The flow's own fate (the test server may refuse it) does not
		// matter: the race's winner is remembered before the request runs.
		_, _ = e.d.RoundTrip(context.Background(), Trip{Kind: TripUDP, What: "a UDP flow",
			Run: func(_ context.Context, s *Stream) (net.Conn, error) {
				if s.Stream != nil {
					_ = s.Close()
				}
				return nil, errors.New("not run")
			}})
	}()
	<-e.headStart
	initial, from := e.readQUIC(t)
	vn := versionNegotiation(initial)
	if vn == nil {
		t.Fatalf("first QUIC packet is no long-header Initial: %x", initial[:min(len(initial), 16)])
	}
	if _, err := e.udp.WriteToUDP(vn, from); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.tlsAttempts:
	case <-time.After(10 * time.Second):
		t.Fatal("no TLS attempt after QUIC failed")
	}
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("the UDP dial did not end")
	}
	e.d.quic.mu.Lock()
	until := e.d.quic.tlsUntil
	e.d.quic.mu.Unlock()
	if until.IsZero() {
		t.Fatal("TLS won the race, but the Client does not remember it")
	}
	if left := time.Until(until); left > DefaultFallbackTTL {
		t.Fatalf("the TLS fallback is remembered for %s more; want at most DefaultFallbackTTL (%s)", left.Round(time.Second), DefaultFallbackTTL)
	}
}
