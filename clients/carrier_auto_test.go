package clients_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// autoDialer is a Dialer as `tp` makes it by default: transport auto, no
// carrier forced, a transport cache; its QUIC address is a UDP gate.
func autoDialer(t *testing.T, srv *clients.CarrierTestServer, gate string, cache *clients.TransportCache) *clients.Dialer {
	d := srv.Dialer(t, "")
	d.Transport, d.QUICServer, d.Cache = clients.TransportAuto, gate, cache
	return d
}

// TestAutoRacesCarriersWhenUDPBlocked: with transport auto and no carrier
// forced, on a network that drops every UDP datagram, the Dialer connects QUIC
// over the tls carrier (not TP's plain TLS transport: requests are streams of
// one QUIC connection) and remembers the tls carrier for this server on this
// network; a second Dialer on the same cache starts on it without sending a
// datagram. On another network (the cache's network function says so) the
// memory does not apply: the third Dialer tries UDP first. Bad input: UDP
// that never answers.
func TestAutoRacesCarriersWhenUDPBlocked(t *testing.T) {
	t.Parallel()
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	gate := startUDPGate(t, srv.UDP)
	gate.shut.Store(true)
	var network atomic.Value
	network.Store("cafe")
	cache := &clients.TransportCache{Path: filepath.Join(t.TempDir(), "transport-cache.json"),
		Network: func(string) string { return network.Load().(string) }}
	d := autoDialer(t, srv, gate.pc.LocalAddr().String(), cache)
	carrierRoundTrip(t, d, testnet.Upper(t), "first")
	if got := d.CurrentCarrier(); got != wire.CarrierTLS {
		t.Fatalf("auto connected over %q, want tls", got)
	}
	if got := cache.Get("carrier:" + srv.TCP); got != wire.CarrierTLS {
		t.Fatalf("remembered carrier %q on this network, want tls", got)
	}
	if gate.seen.Load() == 0 {
		t.Fatal("auto never tried UDP")
	}
	_ = d.Close()

	before := gate.seen.Load()
	d2 := autoDialer(t, srv, gate.pc.LocalAddr().String(), cache)
	carrierRoundTrip(t, d2, testnet.Upper(t), "second")
	if got := d2.CurrentCarrier(); got != wire.CarrierTLS {
		t.Fatalf("the second Dialer is on %q, want tls", got)
	}
	if n := gate.seen.Load() - before; n != 0 {
		t.Fatalf("the second Dialer sent %d datagrams over UDP first", n)
	}
	_ = d2.Close()

	network.Store("office")
	gate.shut.Store(false) // the office passes UDP
	before = gate.seen.Load()
	d3 := autoDialer(t, srv, gate.pc.LocalAddr().String(), cache)
	carrierRoundTrip(t, d3, testnet.Upper(t), "third")
	if got := d3.CurrentCarrier(); got != wire.CarrierUDP {
		t.Fatalf("on another network the Dialer is on %q, want udp", got)
	}
	if gate.seen.Load() == before {
		t.Fatal("on another network the Dialer did not try UDP")
	}
	if got := cache.Get("carrier:" + srv.TCP); got != wire.CarrierUDP {
		t.Fatalf("remembered carrier %q on the office network, want udp", got)
	}
	network.Store("cafe")
	if got := cache.Get("carrier:" + srv.TCP); got != wire.CarrierTLS {
		t.Fatalf("the café's memory became %q, want it kept as tls", got)
	}
}

// TestAutoPrefersUDP: where UDP answers, the race is won over UDP (the head
// start is made long enough that the carriers cannot start first).
func TestAutoPrefersUDP(t *testing.T) {
	t.Parallel()
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	gate := startUDPGate(t, srv.UDP)
	d := autoDialer(t, srv, gate.pc.LocalAddr().String(), nil)
	d.CarrierHeadStart = 10 * time.Second // the carriers would start only after this
	carrierRoundTrip(t, d, testnet.Upper(t), "over udp")
	if got := d.CurrentCarrier(); got != wire.CarrierUDP {
		t.Fatalf("auto connected over %q, want udp", got)
	}
}

// TestAutoMovesBackToUDP: a connection that auto put on a stream carrier
// because UDP was blocked probes UDP (every UDPReprobe, here 300 ms) and, once
// UDP gets through again, moves back to UDP, with a transfer under way that
// completes with a matching checksum on the same stream. Bad input: UDP that
// is blocked at first.
func TestAutoMovesBackToUDP(t *testing.T) {
	t.Parallel()
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	gate := startUDPGate(t, srv.UDP)
	gate.shut.Store(true)
	cache := &clients.TransportCache{Path: filepath.Join(t.TempDir(), "transport-cache.json")}
	d := autoDialer(t, srv, gate.pc.LocalAddr().String(), cache)
	d.UDPReprobe = 300 * time.Millisecond
	var logs atomic.Value
	d.Logf = func(f string, a ...any) { logs.Store(fmt.Sprintf(f, a...)); t.Logf(f, a...) }
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", testnet.Echo(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := d.CurrentCarrier(); got == wire.CarrierUDP {
		t.Fatal("connected over UDP, which is blocked")
	}
	_ = c.SetDeadline(time.Now().Add(90 * time.Second))
	payload := make([]byte, 4<<20)
	_, _ = rand.Read(payload)
	want := sha256.Sum256(payload)
	go func() {
		half := len(payload) / 2
		_, _ = c.Write(payload[:half])
		gate.shut.Store(false) // UDP gets through again
		for d.CurrentCarrier() != wire.CarrierUDP && ctx.Err() == nil {
			time.Sleep(20 * time.Millisecond) // polling for the move, bounded by ctx
		}
		_, _ = c.Write(payload[half:])
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
	}()
	h := sha256.New()
	n, err := io.Copy(h, c)
	if err != nil {
		t.Fatalf("the stream failed (read %d of %d bytes): %v", n, len(payload), err)
	}
	if got := h.Sum(nil); n != int64(len(payload)) || !bytes.Equal(got, want[:]) {
		t.Fatalf("echoed %d bytes with sha256 %x, want %d with %x", n, got, len(payload), want)
	}
	if got := d.CurrentCarrier(); got != wire.CarrierUDP {
		t.Fatalf("the connection is on %q, want udp (log: %v)", got, logs.Load())
	}
	if got := cache.Get("carrier:" + srv.TCP); got != wire.CarrierUDP {
		t.Fatalf("remembered carrier %q after the move back, want udp", got)
	}
	// The same connection serves new requests over UDP.
	before := gate.seen.Load()
	carrierRoundTrip(t, d, testnet.Upper(t), "after the move back")
	if gate.seen.Load() == before {
		t.Fatal("the request after the move back sent nothing over UDP")
	}
}
