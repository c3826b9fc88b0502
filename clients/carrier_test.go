package clients_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// roundTrip sends msg on a new TCP dial to an upper-casing server and checks the reply.
func carrierRoundTrip(t *testing.T, d *clients.Dialer, dst, msg string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", dst)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatal(err)
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != strings.ToUpper(msg) {
		t.Fatalf("reply %q, want %q", got, strings.ToUpper(msg))
	}
}

// TestCarrierMatrix: a TCP dial and a UDP flow through the proxy work the same
// over every carrier (the QUIC connection rides UDP, a TLS stream, a WebSocket).
func TestCarrierMatrix(t *testing.T) {
	t.Parallel()
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	tcpDst := testnet.Upper(t)
	udpDst := testnet.UpperUDP(t)
	for _, carrier := range []string{wire.CarrierUDP, wire.CarrierTLS, wire.CarrierWS, wire.CarrierHTTP} {
		t.Run(carrier, func(t *testing.T) {
			d := srv.Dialer(t, carrier)
			carrierRoundTrip(t, d, tcpDst, "hello over "+carrier)
			big := strings.Repeat("0123456789abcdef", 64<<10) // 1 MiB
			carrierRoundTrip(t, d, tcpDst, big)

			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			u, err := d.DialContext(ctx, "udp", udpDst)
			if err != nil {
				t.Fatal(err)
			}
			defer u.Close()
			_ = u.SetDeadline(time.Now().Add(30 * time.Second))
			buf := make([]byte, 2048)
			// UDP may lose a datagram: ask again until one answer comes.
			for i := 0; ; i++ {
				if _, err := u.Write([]byte("datagram " + carrier)); err != nil {
					t.Fatal(err)
				}
				_ = u.SetReadDeadline(time.Now().Add(time.Second))
				n, err := u.Read(buf)
				if err == nil {
					if got := string(buf[:n]); got != strings.ToUpper("datagram "+carrier) {
						t.Fatalf("UDP reply %q", got)
					}
					break
				}
				if i == 20 {
					t.Fatalf("no UDP answer over %s: %v", carrier, err)
				}
			}
			if carrier != wire.CarrierUDP && srv.Srv.CarrierSessions() == 0 {
				t.Fatalf("the server has no %s carrier session", carrier)
			}
		})
	}
}

// TestCarrierLinkBreaks: a proxy that cuts the carrier's TCP connection does
// not end the QUIC connection: the client opens another link, the server sees
// the client at a new address and QUIC migrates; a transfer in flight completes.
func TestCarrierLinkBreaks(t *testing.T) {
	t.Parallel()
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	for _, carrier := range []string{wire.CarrierTLS, wire.CarrierWS, wire.CarrierHTTP} {
		t.Run(carrier, func(t *testing.T) {
			d := srv.Dialer(t, carrier)
			dst := testnet.Echo(t)
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			c, err := d.DialContext(ctx, "tcp", dst)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(60 * time.Second))
			payload := bytes.Repeat([]byte("carrier-break "), 300_000) // 4.2 MB
			go func() {
				half := len(payload) / 2
				_, _ = c.Write(payload[:half])
				d.BreakCarrierLink()
				_, _ = c.Write(payload[half:])
				if cw, ok := c.(interface{ CloseWrite() error }); ok {
					_ = cw.CloseWrite()
				}
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("the stream failed after the carrier link broke: %v", err)
			}
			if !bytes.Equal(got, payload) {
				t.Fatalf("echoed %d bytes, want %d identical ones", len(got), len(payload))
			}
			if n := d.CarrierLinks(); n < 2 {
				t.Fatalf("carrier links opened: %d, want a second one after the break", n)
			}
		})
	}
}

// udpGate relays UDP between one client and the server until it is shut,
// then drops every datagram both ways: a network that starts blocking UDP.
type udpGate struct {
	pc     *net.UDPConn
	shut   atomic.Bool
	seen   atomic.Int64 // datagrams from clients
	server *net.UDPAddr
}

func startUDPGate(t testing.TB, server string) *udpGate {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	up, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	saddr, err := net.ResolveUDPAddr("udp", server)
	if err != nil {
		t.Fatal(err)
	}
	g := &udpGate{pc: pc, server: saddr}
	t.Cleanup(func() { _ = pc.Close(); _ = up.Close() })
	var client atomic.Pointer[net.UDPAddr]
	go func() { // client → server
		b := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFromUDP(b)
			if err != nil {
				return
			}
			client.Store(from)
			g.seen.Add(1)
			if !g.shut.Load() {
				_, _ = up.WriteToUDP(b[:n], saddr)
			}
		}
	}()
	go func() { // server → client
		b := make([]byte, 2048)
		for {
			n, _, err := up.ReadFromUDP(b)
			if err != nil {
				return
			}
			if c := client.Load(); c != nil && !g.shut.Load() {
				_, _ = pc.WriteToUDP(b[:n], c)
			}
		}
	}()
	return g
}

// TestCarrierSwitchMidTransfer: a transfer that starts over UDP loses UDP (a
// relay that starts dropping every datagram both ways) half-way and completes
// over the ws carrier, the same QUIC connection and stream, with a matching
// checksum: the stream is never reset. A UDP flow opened before the move
// (its datagrams in QUIC DATAGRAM frames) carries datagrams after it, the
// same flow.
func TestCarrierSwitchMidTransfer(t *testing.T) {
	t.Parallel()
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	for _, next := range []string{wire.CarrierWS, wire.CarrierTLS, wire.CarrierHTTP} {
		t.Run("udp to "+next, func(t *testing.T) {
			gate := startUDPGate(t, srv.UDP)
			var moved atomic.Value
			d := srv.Dialer(t, wire.CarrierUDP)
			d.QUICServer = gate.pc.LocalAddr().String()
			d.FallbackCarriers = []string{next}
			d.CarrierStall = time.Second
			d.Logf = func(f string, a ...any) { moved.Store(fmt.Sprintf(f, a...)); t.Logf(f, a...) }
			dst := testnet.Echo(t)
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			c, err := d.DialContext(ctx, "tcp", dst)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(90 * time.Second))
			flow, err := d.DialContext(ctx, "udp", testnet.UpperUDP(t))
			if err != nil {
				t.Fatal(err)
			}
			defer flow.Close()
			if uf, ok := flow.(*wire.UDPFlow); !ok {
				t.Fatalf("a UDP dial gave a %T, want a *wire.UDPFlow", flow)
			} else if _, ok := uf.FlowID(); !ok {
				t.Fatal("the UDP flow has no flow id: its datagrams would not travel in DATAGRAM frames")
			}
			udpRoundTrip(t, flow, "before the move")
			payload := make([]byte, 8<<20)
			_, _ = rand.Read(payload)
			want := sha256.Sum256(payload)
			go func() {
				half := len(payload) / 2
				_, _ = c.Write(payload[:half])
				gate.shut.Store(true) // UDP is blocked from now on
				_, _ = c.Write(payload[half:])
				if cw, ok := c.(interface{ CloseWrite() error }); ok {
					_ = cw.CloseWrite()
				}
			}()
			h := sha256.New()
			n, err := io.Copy(h, c)
			if err != nil {
				t.Fatalf("the stream failed after UDP was blocked (read %d of %d bytes): %v", n, len(payload), err)
			}
			if got := h.Sum(nil); n != int64(len(payload)) || !bytes.Equal(got, want[:]) {
				t.Fatalf("echoed %d bytes with sha256 %x, want %d with %x", n, got, len(payload), want)
			}
			if got := d.CurrentCarrier(); got != next {
				t.Fatalf("the connection is on %q, want %q (log: %v)", got, next, moved.Load())
			}
			// The same connection serves new requests over the new carrier, and
			// the flow opened before the move carries datagrams on.
			carrierRoundTrip(t, d, testnet.Upper(t), "after the move")
			udpRoundTrip(t, flow, "after the move")
		})
	}
}

// udpRoundTrip sends msg on a UDP flow to an upper-casing server until an
// answer comes (UDP may lose a datagram), and checks it. A late answer to a
// datagram sent again after a timeout, this call's or an earlier one's, is
// skipped.
func udpRoundTrip(t *testing.T, u net.Conn, msg string) {
	t.Helper()
	v, _ := udpAsked.LoadOrStore(u, &[]string{})
	asked := v.(*[]string)
	*asked = append(*asked, strings.ToUpper(msg))
	buf := make([]byte, 2048)
	for i := 0; ; i++ {
		if _, err := u.Write([]byte(msg)); err != nil {
			t.Fatalf("UDP flow, sending %q: %v", msg, err)
		}
		_ = u.SetReadDeadline(time.Now().Add(time.Second))
		for {
			n, err := u.Read(buf)
			if err != nil {
				if i == 20 {
					t.Fatalf("no UDP answer to %q in 20 tries: %v", msg, err)
				}
				break
			}
			got := string(buf[:n])
			if got == strings.ToUpper(msg) {
				return
			}
			if !slices.Contains(*asked, got) {
				t.Fatalf("UDP reply %q, want %q", got, strings.ToUpper(msg))
			}
		}
	}
}

// udpAsked is the answers udpRoundTrip waited for on each flow (one test's
// goroutine each).
var udpAsked sync.Map // net.Conn → *[]string

// TestCarrierAutoFallsBack: with carrier auto on a network that drops all UDP
// from the start, the Dialer connects over the tls carrier after the UDP try.
func TestCarrierAutoFallsBack(t *testing.T) {
	t.Parallel()
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	gate := startUDPGate(t, srv.UDP)
	gate.shut.Store(true)
	d := srv.Dialer(t, clients.CarrierAuto)
	d.QUICServer = gate.pc.LocalAddr().String()
	carrierRoundTrip(t, d, testnet.Upper(t), "auto")
	if got := d.CurrentCarrier(); got != wire.CarrierTLS {
		t.Fatalf("auto connected over %q, want tls", got)
	}
}

// startConnectProxy runs a minimal HTTP CONNECT proxy on loopback and returns
// its URL and a counter of the tunnels it opened.
func startConnectProxy(t *testing.T) (*url.URL, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	var tunnels atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				req, err := http.ReadRequest(br)
				if err != nil || req.Method != http.MethodConnect {
					_, _ = io.WriteString(c, "HTTP/1.1 405 Method Not Allowed\r\n\r\n")
					return
				}
				up, err := net.Dial("tcp", req.Host)
				if err != nil {
					_, _ = io.WriteString(c, "HTTP/1.1 502 Bad Gateway\r\n\r\n")
					return
				}
				defer up.Close()
				tunnels.Add(1)
				_, _ = io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n")
				go func() { _, _ = io.Copy(up, br); _ = up.(*net.TCPConn).CloseWrite() }()
				_, _ = io.Copy(c, up)
			}()
		}
	}()
	return &url.URL{Scheme: "http", Host: ln.Addr().String()}, &tunnels
}

// TestCarrierThroughConnectProxy: the tls and ws carriers reach the server
// through an HTTP proxy that speaks CONNECT, as HTTPS_PROXY would name it.
func TestCarrierThroughConnectProxy(t *testing.T) {
	t.Parallel()
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	for _, carrier := range []string{wire.CarrierTLS, wire.CarrierWS} {
		t.Run(carrier, func(t *testing.T) {
			proxyURL, tunnels := startConnectProxy(t)
			d := srv.Dialer(t, carrier)
			d.CarrierProxy = func(*url.URL) (*url.URL, error) { return proxyURL, nil }
			carrierRoundTrip(t, d, testnet.Upper(t), "through a CONNECT proxy")
			if n := tunnels.Load(); n < 1 {
				t.Fatalf("the proxy opened %d tunnels", n)
			}
		})
	}
}

// TestCarrierHTTPThroughCDN: the http carrier works through an HTTP reverse
// proxy (httputil.ReverseProxy standing in for a CDN that forwards POSTs) and
// through a CONNECT proxy.
func TestCarrierHTTPThroughCDN(t *testing.T) {
	t.Parallel()
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	target, err := url.Parse("https://" + srv.TCP)
	if err != nil {
		t.Fatal(err)
	}
	var posts atomic.Int64
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: srv.TLS.RootCAs, ServerName: "localhost"}}
	cdn := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		posts.Add(1)
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(cdn.Close)
	d := srv.Dialer(t, wire.CarrierHTTP)
	d.CarrierHTTPURL = cdn.URL + wire.CarrierHTTPPath
	carrierRoundTrip(t, d, testnet.Upper(t), "through a CDN")
	if posts.Load() < 2 {
		t.Fatalf("the CDN saw %d requests", posts.Load())
	}

	proxyURL, tunnels := startConnectProxy(t)
	d2 := srv.Dialer(t, wire.CarrierHTTP)
	d2.CarrierProxy = func(*url.URL) (*url.URL, error) { return proxyURL, nil }
	carrierRoundTrip(t, d2, testnet.Upper(t), "through a CONNECT proxy")
	if tunnels.Load() < 1 {
		t.Fatal("the CONNECT proxy carried nothing")
	}
}

// TestCarrierAutoRemembers: a carrier that auto fell back to is remembered per
// server in the transport cache, and the next Dialer starts on it without
// trying UDP first (the blocked UDP relay sees nothing from it).
func TestCarrierAutoRemembers(t *testing.T) {
	t.Parallel()
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	gate := startUDPGate(t, srv.UDP)
	gate.shut.Store(true)
	cache := &clients.TransportCache{Path: filepath.Join(t.TempDir(), "transport-cache.json")}
	d := srv.Dialer(t, clients.CarrierAuto)
	d.QUICServer, d.Cache = gate.pc.LocalAddr().String(), cache
	carrierRoundTrip(t, d, testnet.Upper(t), "first")
	if got := cache.Get("carrier:" + srv.TCP); got != wire.CarrierTLS {
		t.Fatalf("remembered carrier %q, want tls", got)
	}
	_ = d.Close()
	before := gate.seen.Load()
	d2 := srv.Dialer(t, clients.CarrierAuto)
	d2.QUICServer, d2.Cache = gate.pc.LocalAddr().String(), cache
	carrierRoundTrip(t, d2, testnet.Upper(t), "second")
	if got := d2.CurrentCarrier(); got != wire.CarrierTLS {
		t.Fatalf("the second Dialer is on %q, want tls", got)
	}
	if n := gate.seen.Load() - before; n != 0 {
		t.Fatalf("the second Dialer sent %d datagrams over UDP first", n)
	}
}

// TestCarrierNeedsDeviceCert: a carrier moves packets and decides nothing:
// over ws and http (which need no certificate to reach), a client without a
// device certificate still fails at the QUIC handshake, and no request runs.
func TestCarrierNeedsDeviceCert(t *testing.T) {
	t.Parallel()
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	dst := testnet.Upper(t)
	for _, carrier := range []string{wire.CarrierWS, wire.CarrierHTTP} {
		t.Run(carrier, func(t *testing.T) {
			d := srv.Dialer(t, carrier)
			d.TLSConfig = &tls.Config{RootCAs: srv.TLS.RootCAs} // no client certificate
			d.Timeout = 15 * time.Second
			c, err := d.DialContext(context.Background(), "tcp", dst)
			if err == nil {
				_ = c.Close()
				t.Fatalf("a dial over %s without a device certificate succeeded", carrier)
			}
			if !strings.Contains(err.Error(), "certificate") {
				t.Fatalf("err = %v, want a certificate refusal", err)
			}
		})
	}
}
