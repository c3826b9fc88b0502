package carrier

import (
	"bytes"
	"context"
	"crypto/ecdh"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/ipv4"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// newTestCarrierMux returns a carrier mux on a real loopback UDP socket.
func newTestCarrierMux(t *testing.T, network string, ip net.IP) *Mux {
	t.Helper()
	udp, err := net.ListenUDP(network, &net.UDPAddr{IP: ip})
	if err != nil {
		t.Fatal(err)
	}
	m := NewMux(udp, nil, Options{}, slog.New(slog.DiscardHandler))
	t.Cleanup(func() { _ = m.Close() })
	return m
}

// TestCarrierQueuesBounded: a client that sends a flood and reads nothing
// costs at most carrierOutQueue packets queued for it and carrierInQueue
// packets queued for quic-go over all carriers; the rest are dropped and
// counted (QUIC reads a drop as loss), an over-size packet is dropped whole
// rather than cut, and ending the session frees its queue.
func TestCarrierQueuesBounded(t *testing.T) {
	t.Parallel()
	m := newTestCarrierMux(t, "udp4", net.IPv4(127, 0, 0, 1))
	cs, err := m.open(wire.CarrierTLS, "127.0.0.1:1", "alice@laptop")
	if err != nil {
		t.Fatal(err)
	}

	// Server → client: 1,000 packets for a client that reads none.
	pkt := make([]byte, 1200)
	for range 1000 {
		if _, err := m.WriteTo(pkt, cs.addr); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(cs.out); n != carrierOutQueue {
		t.Fatalf("packets queued for a client that reads nothing: %d, want the bound %d", n, carrierOutQueue)
	}
	if d := cs.drops.Load(); d != 1000-carrierOutQueue {
		t.Fatalf("packets dropped for it: %d, want %d", d, 1000-carrierOutQueue)
	}
	// A GSO batch of two packets, one longer than a carrier packet may be
	// (bad input from below): dropped whole, not truncated.
	before := cs.drops.Load()
	m.toCarrier(make([]byte, wire.MaxCarrierPacket+1), 0, cs.addr)
	if d := cs.drops.Load() - before; d != 1 {
		t.Fatalf("an over-size packet: %d drops, want 1", d)
	}

	// Client → server: 3,000 packets while quic-go reads none.
	for range 3000 {
		m.deliver(cs, getCarrierBuf(), 1200)
	}
	m.mu.Lock()
	queued := len(m.queue)
	m.mu.Unlock()
	if queued != carrierInQueue {
		t.Fatalf("packets queued for quic-go: %d, want the bound %d", queued, carrierInQueue)
	}
	if d := m.inDrops.Load(); d != 3000-carrierInQueue {
		t.Fatalf("client packets dropped: %d, want %d", d, 3000-carrierInQueue)
	}

	// Ending the session frees what was queued for it; later packets for its
	// address find no session and cost nothing.
	m.end(cs)
	if n := len(cs.out); n != 0 {
		t.Fatalf("after the end, %d packets still queued for the client", n)
	}
	before = cs.drops.Load()
	if _, err := m.WriteTo(pkt, cs.addr); err != nil {
		t.Fatal(err)
	}
	if len(cs.out) != 0 || cs.drops.Load() != before {
		t.Fatal("a packet for an ended session was queued or counted against it")
	}
}

// TestCarrierHTTPInFlightBound: one http carrier session holds at most
// carrierHTTPConcurrent requests; a further one (a client, or anyone who
// learned the session ID, opening polls without end) gets 429 at once
// instead of one more held request.
func TestCarrierHTTPInFlightBound(t *testing.T) { // not parallel: it sets carrierPollHold, which every http carrier reads
	hold := carrierPollHold
	carrierPollHold = time.Minute // held polls end when the test cancels them
	t.Cleanup(func() { carrierPollHold = hold })

	m := newTestCarrierMux(t, "udp4", net.IPv4(127, 0, 0, 1))
	var h HTTPSessions
	const id = "0123456789abcdef0123456789abcdef"
	c := newCarrierHTTPTestClient(t, id)
	poll := func(ctx context.Context) *httptest.ResponseRecorder {
		r := httptest.NewRequestWithContext(ctx, http.MethodPost, wire.CarrierHTTPPath, strings.NewReader(""))
		c.sign(r, nil)
		w := httptest.NewRecorder()
		h.Serve(m, w, r)
		c.answered(t, w)
		return w
	}
	// The first request opens the session and is answered at once.
	if w := poll(context.Background()); w.Code != http.StatusOK {
		t.Fatalf("opening request: %d %s", w.Code, w.Body)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var held sync.WaitGroup
	codes := make(chan int, carrierHTTPConcurrent)
	for range carrierHTTPConcurrent {
		held.Go(func() { codes <- poll(ctx).Code })
	}
	hs := h.sessions[id]
	deadline := time.Now().Add(30 * time.Second)
	for len(hs.inflight) < carrierHTTPConcurrent {
		if time.Now().After(deadline) {
			t.Fatalf("only %d polls held after 30 s", len(hs.inflight))
		}
		time.Sleep(time.Millisecond)
	}
	w := poll(context.Background())
	if w.Code != http.StatusTooManyRequests || !strings.Contains(w.Body.String(), "too many requests in flight") {
		t.Fatalf("a poll beyond %d in flight: %d %q; want 429 saying why", carrierHTTPConcurrent, w.Code, w.Body)
	}
	cancel()
	held.Wait()
	close(codes)
	for c := range codes {
		if c != http.StatusOK {
			t.Fatalf("a held poll ended with %d, want 200 (empty answer)", c)
		}
	}
	// With the polls gone, the session takes requests again (held for the
	// usual second, as nothing is queued for the client).
	carrierPollHold = hold
	if w := poll(context.Background()); w.Code != http.StatusOK {
		t.Fatalf("a poll after the held ones ended: %d %s", w.Code, w.Body)
	}
}

// TestCarrierSpoofedSourceDropped: a UDP datagram whose source claims a
// carrier session's virtual address (100::/64, RFC 6666) never reaches
// quic-go as a packet from that session: ReadBatch empties it. The sender
// needs that address, so the test runs itself again in a network namespace
// of its own with 100::1 on its loopback.
func TestCarrierSpoofedSourceDropped(t *testing.T) {
	t.Parallel()
	if !testnet.InNetns(t, "100::1/64") {
		return
	}
	m := newTestCarrierMux(t, "udp6", net.IPv6loopback)
	var spoofed, real *net.UDPConn
	for _, p := range []struct {
		c  **net.UDPConn
		ip net.IP
	}{{&spoofed, net.ParseIP("100::1")}, {&real, net.IPv6loopback}} {
		c, err := net.DialUDP("udp6", &net.UDPAddr{IP: p.ip}, m.udp.LocalAddr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		*p.c = c
	}
	if _, err := spoofed.Write([]byte("spoofed")); err != nil {
		t.Fatal(err)
	}
	if _, err := real.Write([]byte("real")); err != nil {
		t.Fatal(err)
	}
	got := map[string]int{}
	deadline := time.Now().Add(10 * time.Second)
	for got["real"] == 0 && time.Now().Before(deadline) {
		ms := make([]ipv4.Message, 4)
		for i := range ms {
			ms[i].Buffers = [][]byte{make([]byte, 1500)}
		}
		_ = m.SetReadDeadline(time.Now().Add(time.Second))
		n, err := m.ReadBatch(ms, 0)
		if err != nil && !os.IsTimeout(err) {
			t.Fatal(err)
		}
		for _, msg := range ms[:n] {
			a := msg.Addr.(*net.UDPAddr)
			switch {
			case isCarrierIP(a.IP) && msg.N > 0:
				t.Fatalf("a datagram from %v (a carrier address) reached quic-go with %d octets", a, msg.N)
			case isCarrierIP(a.IP):
				got["spoofed"]++
			default:
				got[string(msg.Buffers[0][:msg.N])]++
			}
		}
	}
	if got["real"] != 1 || got["spoofed"] != 1 {
		t.Fatalf("read %v; want the real datagram once and the spoofed one emptied once", got)
	}
}

// carrierHTTPTestClient signs requests of one http carrier session as its
// opener: the first carries the key, the later ones their MAC.
type carrierHTTPTestClient struct {
	id   string
	priv *ecdh.PrivateKey
	pub  string
	mu   sync.Mutex
	key  []byte
	seq  uint64
}

func newCarrierHTTPTestClient(t testing.TB, id string) *carrierHTTPTestClient {
	t.Helper()
	priv, pub, err := wire.NewCarrierKey()
	if err != nil {
		t.Fatal(err)
	}
	return &carrierHTTPTestClient{id: id, priv: priv, pub: pub}
}

func (c *carrierHTTPTestClient) sign(r *http.Request, body []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r.Header.Set(wire.CarrierSessionHeader, c.id)
	if c.key == nil {
		r.Header.Set(wire.CarrierKeyHeader, c.pub)
		return
	}
	c.seq++
	r.Header.Set(wire.CarrierAuthHeader, wire.CarrierAuth(c.key, c.id, c.seq, body))
}

// answered takes the session key from the opening request's answer.
func (c *carrierHTTPTestClient) answered(t testing.TB, w *httptest.ResponseRecorder) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.key != nil || w.Code != http.StatusOK {
		return
	}
	key, err := wire.CarrierSessionKey(c.priv, w.Header().Get(wire.CarrierKeyHeader), c.id)
	if err != nil {
		t.Errorf("the opening answer's key: %v", err)
		return
	}
	c.key = key
}

// TestCarrierHTTPSessionIDIsNotAPassword: an http carrier session is its
// opener's. Bad input, from someone who learned the session ID (it travels in
// the clear on a plain-HTTP listener, and a CDN sees it): a poll and a packet
// without Tp-Carrier-Auth, with a made-up MAC, with the MAC of another body,
// a second opening request with a key of its own, and a replay of the owner's
// own signed request. Each is refused (403) before it takes a request slot,
// delivers a packet or takes one of the owner's, and the owner's next poll
// gets the packet queued for it. Before, a client without a certificate that
// knew a live ID read the owner's packets and cut its echo round trips from
// 4,334 to 6 per 6 s.
func TestCarrierHTTPSessionIDIsNotAPassword(t *testing.T) {
	t.Parallel()
	m := newTestCarrierMux(t, "udp4", net.IPv4(127, 0, 0, 1))
	var h HTTPSessions
	const id = "00112233445566778899aabbccddeeff"
	owner := newCarrierHTTPTestClient(t, id)
	request := func(body []byte, set func(*http.Request)) *httptest.ResponseRecorder {
		r := httptest.NewRequest(http.MethodPost, wire.CarrierHTTPPath, bytes.NewReader(body))
		set(r)
		w := httptest.NewRecorder()
		h.Serve(m, w, r)
		return w
	}
	if w := request(nil, func(r *http.Request) { owner.sign(r, nil) }); w.Code != http.StatusOK {
		t.Fatalf("the owner's opening request: %d %s", w.Code, w.Body)
	} else {
		owner.answered(t, w)
	}
	hs := h.lookup(m, id)
	queued := getCarrierBuf()
	n := copy(*queued, "for the owner")
	*queued = (*queued)[:n]
	hs.cs.out <- queued

	// The owner's signed request, kept for the replay below.
	packet := []byte{0, 4, 'q', 'u', 'i', 'c'}
	signed := httptest.NewRequest(http.MethodPost, wire.CarrierHTTPPath, nil)
	owner.sign(signed, packet)
	ownerAuth := signed.Header.Get(wire.CarrierAuthHeader)
	_, other, err := wire.NewCarrierKey()
	if err != nil {
		t.Fatal(err)
	}
	in := hs.cs.in.Load()
	for _, bad := range []struct {
		what string
		body []byte
		set  func(*http.Request)
	}{
		{"a poll without Tp-Carrier-Auth", nil, func(r *http.Request) { r.Header.Set(wire.CarrierSessionHeader, id) }},
		{"a packet without Tp-Carrier-Auth", packet, func(r *http.Request) { r.Header.Set(wire.CarrierSessionHeader, id) }},
		{"a made-up MAC", nil, func(r *http.Request) {
			r.Header.Set(wire.CarrierSessionHeader, id)
			r.Header.Set(wire.CarrierAuthHeader, "7."+strings.Repeat("0", 2*wire.CarrierMACSize))
		}},
		{"the owner's MAC on another body", []byte{0, 1, 'x'}, func(r *http.Request) {
			r.Header.Set(wire.CarrierSessionHeader, id)
			r.Header.Set(wire.CarrierAuthHeader, ownerAuth)
		}},
		{"a second opening request with a key of its own", nil, func(r *http.Request) {
			r.Header.Set(wire.CarrierSessionHeader, id)
			r.Header.Set(wire.CarrierKeyHeader, other)
		}},
	} {
		if w := request(bad.body, bad.set); w.Code != http.StatusForbidden || !strings.Contains(w.Body.String(), "belongs to whoever opened it") {
			t.Errorf("%s: %d %q; want 403 saying whose the session is", bad.what, w.Code, w.Body)
		}
		if len(hs.inflight) != 0 || hs.cs.in.Load() != in || len(hs.cs.out) != 1 {
			t.Fatalf("%s: %d requests in flight, %d packets delivered, %d queued for the owner; want 0, %d, 1", bad.what, len(hs.inflight), hs.cs.in.Load(), len(hs.cs.out), in)
		}
	}
	// The owner's request goes through once; its replay does not.
	replay := func() *httptest.ResponseRecorder {
		return request(packet, func(r *http.Request) {
			r.Header.Set(wire.CarrierSessionHeader, id)
			r.Header.Set(wire.CarrierAuthHeader, ownerAuth)
		})
	}
	w := replay()
	if w.Code != http.StatusOK || !bytes.Contains(w.Body.Bytes(), []byte("for the owner")) {
		t.Fatalf("the owner's signed request: %d %q; want 200 with the packet queued for it", w.Code, w.Body)
	}
	if w := replay(); w.Code != http.StatusForbidden || !strings.Contains(w.Body.String(), "a replay") {
		t.Fatalf("a replay of the owner's request: %d %q; want 403 naming a replay", w.Code, w.Body)
	}
	if hs.cs.in.Load() != in+1 {
		t.Fatalf("packets delivered: %d; want the owner's one", hs.cs.in.Load()-in)
	}
}
