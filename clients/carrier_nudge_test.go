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
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// rebinder relays UDP between one client and the server like a NAT: hold
// stops delivering the server's packets to the client, rebind gives the
// client a new outside address (a new socket towards the server; the old
// one is closed, so what the server still sends there is lost) and delivers
// again.
type rebinder struct {
	pc     *net.UDPConn
	server *net.UDPAddr
	client atomic.Pointer[net.UDPAddr]
	held   atomic.Bool

	mu sync.Mutex
	up *net.UDPConn
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
	r := &rebinder{pc: pc, server: saddr}
	t.Cleanup(func() {
		_ = pc.Close()
		r.mu.Lock()
		_ = r.up.Close()
		r.mu.Unlock()
	})
	r.rebind()
	go func() { // client → server, from the current outside socket
		b := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFromUDP(b)
			if err != nil {
				return
			}
			r.client.Store(from)
			r.mu.Lock()
			up := r.up
			r.mu.Unlock()
			_, _ = up.WriteToUDP(b[:n], saddr)
		}
	}()
	return r
}

// rebind opens a new outside socket, closes the old one and delivers the
// server's packets again.
func (r *rebinder) rebind() {
	up, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		panic(err)
	}
	r.mu.Lock()
	old := r.up
	r.up = up
	r.mu.Unlock()
	if old != nil {
		_ = old.Close()
	}
	r.held.Store(false)
	go func() { // server → client
		b := make([]byte, 2048)
		for {
			n, _, err := up.ReadFromUDP(b)
			if err != nil {
				return
			}
			if c := r.client.Load(); c != nil && !r.held.Load() {
				_, _ = r.pc.WriteToUDP(b[:n], c)
			}
		}
	}()
}

// TestDownloadResumesAfterSilentRebinding: a download over QUIC on UDP whose
// client's outside address changes (a NAT rebinding) right after the client
// acknowledged all it had received, so that the server's next packets go to
// the old address and are lost and the client, only receiving, has nothing
// to send. The client's keepalive is off, so only the nudge after a silence
// (an empty DATAGRAM frame) can tell the server the new address: without it
// the download never resumes (the read deadline, 45 s, ends the test). It
// completes, on the same stream, with a matching checksum. The pause is
// logged as a figure, against the longest pause before the rebinding.
func TestDownloadResumesAfterSilentRebinding(t *testing.T) {
	t.Parallel()
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	nat := startRebinder(t, srv.UDP)
	d := srv.Dialer(t, wire.CarrierUDP)
	d.QUICServer = nat.pc.LocalAddr().String()
	d.KeepAlive = -1 // no keepalive: the nudge alone must move the server

	payload := make([]byte, 8<<20)
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
		_, _ = c.Write(payload)
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
	var got, lastRead atomic.Int64 // bytes, and when the last ones came (unix ns)
	var rebound atomic.Int64       // when the address changed (unix ns)
	resumed := make(chan time.Duration, 1)
	done := make(chan error, 1)
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				now := time.Now()
				if r := rebound.Load(); r != 0 && len(resumed) == 0 && cap(resumed) > 0 {
					select {
					case resumed <- now.Sub(time.Unix(0, r)):
					default:
					}
				}
				h.Write(buf[:n])
				got.Add(int64(n))
				lastRead.Store(now.UnixNano())
			}
			if err == io.EOF {
				done <- nil
				return
			}
			if err != nil {
				done <- err
				return
			}
		}
	}()
	deadline := time.Now().Add(30 * time.Second)
	for got.Load() < 2<<20 {
		if time.Now().After(deadline) {
			t.Fatalf("the first 2 MiB of the download did not arrive within 30s (%d bytes)", got.Load())
		}
		time.Sleep(time.Millisecond) // polling the reader, bounded by the deadline
	}
	// The server's packets stop arriving; the client reads what it holds,
	// acknowledges it and falls silent (nothing read for half a second);
	// then its outside address changes.
	nat.held.Store(true)
	for time.Since(time.Unix(0, lastRead.Load())) < 500*time.Millisecond {
		if time.Now().After(deadline) {
			t.Fatal("the client kept reading for 30s with the server's packets held")
		}
		time.Sleep(10 * time.Millisecond) // polling the reader, bounded by the deadline
	}
	atHold := got.Load()

	rebound.Store(time.Now().UnixNano())
	nat.rebind()
	if err := <-done; err != nil {
		t.Fatalf("the download did not resume after the rebinding (read %d of %d bytes, %d when the address changed): %v", got.Load(), len(payload), atHold, err)
	}
	var after time.Duration
	select {
	case after = <-resumed:
	default:
	}
	if sum := h.Sum(nil); got.Load() != int64(len(payload)) || !bytes.Equal(sum, want[:]) {
		t.Fatalf("downloaded %d bytes with sha256 %x, want %d with %x", got.Load(), sum, len(payload), want)
	}
	t.Logf("FIGURE udp rebinding after a silence, keepalive off: the download resumed %s after the rebinding (at %d of %d bytes)", after.Round(time.Millisecond), atHold, len(payload))
}
