package clients_test

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testnet"
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
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	tcpDst := testnet.Upper(t)
	udpDst := testnet.UpperUDP(t)
	for _, carrier := range []string{wire.CarrierUDP, wire.CarrierTLS, wire.CarrierWS} {
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
	srv := clients.StartCarrierTestServer(t, nil, proxy.CarrierOptions{})
	for _, carrier := range []string{wire.CarrierTLS, wire.CarrierWS} {
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
