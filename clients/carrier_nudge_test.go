package clients_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// silence is how long a client that received nothing is taken to be silent
// by the rebinder: half the wait before a nudge, and many times the delay of
// a QUIC acknowledgement (25 ms), so that a client's last acknowledgements
// come before it and a nudge after it.
const silence = clients.NudgeAfter / 2

// rebinder relays UDP between one client and the server like a NAT, and
// counts what passes. moveAfter makes it a NAT that rebinds during a
// silence: after delivering n more of the server's packets it loses the rest
// (they go to the client's old outside address), and the client's first
// packet after a silence goes out from a new outside address, to which the
// server's packets are delivered again. A rebinding at any moment of a
// silence is the same to both ends as one at its end: nothing passes between.
type rebinder struct {
	pc     *net.UDPConn
	server *net.UDPAddr
	client atomic.Pointer[net.UDPAddr]

	mu       sync.Mutex
	up       *net.UDPConn  // the client's current outside socket
	pass     int           // moving: server packets still delivered before the loss
	lost     bool          // moving: the server's packets are lost until the client speaks
	moved    chan struct{} // closed when the client spoke from its new outside address
	received time.Time     // when the client was last given a packet
	passed   time.Time     // when a packet last passed, either way
	sent     int           // client → server packets
	got      int           // server → client packets delivered
	spoke    int           // silences the client broke (nudges, when it has nothing else to send)
	speaking bool          // the client broke a silence, and was given nothing since
	gotSpoke int           // got when the client last broke a silence
}

func startRebinder(t *testing.T, server string) *rebinder {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	saddr, err := net.ResolveUDPAddr("udp", server)
	if err != nil {
		t.Fatal(err)
	}
	r := &rebinder{pc: pc, server: saddr, received: time.Now(), moved: make(chan struct{})}
	t.Cleanup(func() {
		_ = pc.Close()
		r.mu.Lock()
		_ = r.up.Close()
		r.mu.Unlock()
	})
	r.mu.Lock()
	r.rebindLocked()
	r.mu.Unlock()
	go func() { // client → server, from the current outside socket
		b := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFromUDP(b)
			if err != nil {
				return
			}
			r.client.Store(from)
			r.mu.Lock()
			r.sent++
			r.passed = time.Now()
			if !r.speaking && time.Since(r.received) >= silence {
				r.speaking = true
				r.spoke++
				r.gotSpoke = r.got
				if r.lost {
					r.lost = false
					r.rebindLocked()
					close(r.moved)
				}
			}
			up := r.up
			r.mu.Unlock()
			_, _ = up.WriteToUDP(b[:n], saddr)
		}
	}()
	return r
}

// rebindLocked opens a new outside socket and closes the old one: what the
// server still sends there is lost.
func (r *rebinder) rebindLocked() {
	up, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		panic(err)
	}
	if r.up != nil {
		_ = r.up.Close()
	}
	r.up = up
	go func() { // server → client
		b := make([]byte, 2048)
		for {
			n, _, err := up.ReadFromUDP(b)
			if err != nil {
				return
			}
			r.mu.Lock()
			deliver := !r.lost
			if deliver {
				r.got++
				r.received = time.Now()
				r.passed = r.received
				r.speaking = false
				if r.pass > 0 {
					r.pass--
					r.lost = r.pass == 0
				}
			}
			r.mu.Unlock()
			if c := r.client.Load(); c != nil && deliver {
				_, _ = r.pc.WriteToUDP(b[:n], c)
			}
		}
	}()
}

// moveAfter rebinds the client during its next silence: n more of the
// server's packets are delivered, the rest lost until the client speaks
// again (moved).
func (r *rebinder) moveAfter(n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pass = n
}

// counts returns the packets sent and delivered, the silences the client
// broke, and the packets delivered when it last broke one.
func (r *rebinder) counts() (sent, got, spoke, gotSpoke int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sent, r.got, r.spoke, r.gotSpoke
}

// quiet reports whether nothing passed, either way, for d.
func (r *rebinder) quiet(d time.Duration) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return time.Since(r.passed) >= d
}

// TestDownloadResumesAfterSilentRebinding: a download over QUIC on UDP whose
// client's outside address changes (a NAT rebinding) while the server's
// packets are lost on their way to it, after the client acknowledged all it
// had received: only receiving, it has nothing to send. The client's
// keepalive is off and nothing of its own awaits an acknowledgement, so only
// the nudge after a silence (an empty DATAGRAM frame) can tell the server the
// new address. The client must speak after its silence, from its new address;
// the download then completes, on the same stream, with a matching checksum.
func TestDownloadResumesAfterSilentRebinding(t *testing.T) {
	t.Parallel()
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	nat := startRebinder(t, srv.UDP)
	d := srv.Dialer(t, wire.CarrierUDP)
	d.QUICServer = nat.pc.LocalAddr().String()
	d.KeepAlive = -1 // no keepalive: the nudge alone must move the server

	// The service sends a first part, then the rest once the client says go.
	// The client's "go" is its last packet that awaits an acknowledgement,
	// which comes with the rest's first packets: the rebinder delivers a few
	// of them, fewer than make the client add a PING to its acknowledgements
	// (quic-go does at the 20th in a row), so nothing of the client's is
	// unacknowledged when the server's packets start to be lost. Else that
	// retransmission, not the nudge, could tell the server the new address.
	const first, size = 256 << 10, 4 << 20 // within a quarter of the receive window: no window update
	payload := make([]byte, size)
	_, _ = rand.Read(payload)
	want := sha256.Sum256(payload)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		if _, err := c.Write(payload[:first]); err != nil {
			return
		}
		if _, err := io.ReadFull(c, make([]byte, 2)); err != nil {
			return
		}
		_, _ = c.Write(payload[first:])
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(45 * time.Second))
	h := sha256.New()
	if _, err := io.CopyN(h, c, first); err != nil {
		t.Fatalf("the download's first part: %v", err)
	}
	nat.moveAfter(8)
	if _, err := c.Write([]byte("go")); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	var got atomic.Int64
	go func() {
		n, err := io.Copy(h, c)
		got.Store(n)
		done <- err
	}()
	select {
	case <-nat.moved:
	case err := <-done:
		t.Fatalf("the download ended before the rebinding: %v", err)
	case <-time.After(20 * time.Second):
		sent, _, _, _ := nat.counts()
		t.Fatalf("the client, silent while the server's packets were lost, never spoke again (no nudge): the server cannot follow it to its new address (%d packets sent in all)", sent)
	}
	if err := <-done; err != nil {
		t.Fatalf("the download did not resume after the client spoke from its new address (read %d of %d bytes after the first part): %v", got.Load(), size-first, err)
	}
	if sum := h.Sum(nil); first+got.Load() != size || !bytes.Equal(sum, want[:]) {
		t.Fatalf("downloaded %d bytes with sha256 %x, want %d with %x", first+got.Load(), sum, size, want)
	}
}

// TestIdleConnectionNudgesOnce: a QUIC connection without keepalive that
// falls idle nudges its server once after its last exchange; once the nudge
// was answered (and the client's probes after it, if its PTO ran out first)
// it sends nothing more: answers start no silence of their own, so an idle
// connection does not nudge for ever.
func TestIdleConnectionNudgesOnce(t *testing.T) {
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	nat := startRebinder(t, srv.UDP)
	d := srv.Dialer(t, wire.CarrierUDP)
	d.QUICServer = nat.pc.LocalAddr().String()
	d.KeepAlive = -1
	c, err := d.DialContext(context.Background(), "tcp", testnet.Echo(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	_ = c.Close()
	_, _, before, _ := nat.counts() // the client may have broken silences of its own making (the dial)
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, got, spoke, gotSpoke := nat.counts()
		if spoke -= before; spoke > 1 {
			t.Fatalf("the idle connection broke %d silences; want one, by a nudge", spoke)
		}
		if spoke == 1 && got > gotSpoke && nat.quiet(silence) {
			break // nudged, answered, and all quiet since
		}
		if time.Now().After(deadline) {
			t.Fatalf("the idle connection did not nudge its server, or the exchange did not end (%d silences broken)", spoke)
		}
		time.Sleep(10 * time.Millisecond)
	}
	sent, _, _, _ := nat.counts()
	// Two nudges' time (a nudge waits up to 1.25 NudgeAfter): a connection
	// that took the answer for traffic would nudge again within it.
	for end := time.Now().Add(3 * clients.NudgeAfter); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if now, _, _, _ := nat.counts(); now != sent {
			t.Fatalf("the idle connection sent %d more packets after its nudge was answered; want none", now-sent)
		}
	}
}
