package clients

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy/wire"
)

// relayEnd runs a.serve for hdr on the agent's end of a real loopback stream (a
// QUIC stream, or a TLS connection as an accept would give it) and returns the
// error that ended the relay's end: it plays a TP server that sends a session
// header TP's own server never sends.
func relayEnd(t *testing.T, mode string, a *Agent, hdr wire.SessionHeader) error {
	t.Helper()
	ca := testpki.New(t)
	srvCfg := &tls.Config{Certificates: []tls.Certificate{ca.ServerCert(t, "localhost")}, NextProtos: []string{wire.ALPN}, MinVersion: tls.VersionTLS13}
	cliCfg := &tls.Config{RootCAs: ca.Pool, ServerName: "localhost", NextProtos: []string{wire.ALPN}, MinVersion: tls.VersionTLS13}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var relay net.Conn
	served := make(chan struct{})
	switch mode {
	case TransportQUIC:
		ln, err := quic.ListenAddr("127.0.0.1:0", srvCfg, &quic.Config{EnableDatagrams: true})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		agentConn, err := quic.DialAddr(ctx, ln.Addr().String(), cliCfg, &quic.Config{EnableDatagrams: true})
		if err != nil {
			t.Fatal(err)
		}
		defer agentConn.CloseWithError(0, "")
		relayConn, err := ln.Accept(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer relayConn.CloseWithError(0, "")
		str, err := relayConn.OpenStreamSync(ctx)
		if err != nil {
			t.Fatal(err)
		}
		relay = wire.NewQUICStream(relayConn, str)
		if _, err := relay.Write([]byte{0}); err != nil { // stands for the header: a stream shows once it carries data
			t.Fatal(err)
		}
		go func() {
			defer close(served)
			str, err := agentConn.AcceptStream(ctx)
			if err != nil {
				t.Error(err)
				return
			}
			st := transport.NewStream(agentConn, str)
			if _, err := io.ReadFull(st, make([]byte, 1)); err != nil {
				t.Error(err)
				return
			}
			a.serve(ctx, st, hdr, nil)
		}()
	default:
		ln, err := tls.Listen("tcp", "127.0.0.1:0", srvCfg)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			defer close(served)
			tc, err := (&tls.Dialer{Config: cliCfg}).DialContext(ctx, "tcp", ln.Addr().String())
			if err != nil {
				t.Error(err)
				return
			}
			a.serve(ctx, tc.(*tls.Conn), hdr, nil)
		}()
		if relay, err = ln.Accept(); err != nil {
			t.Fatal(err)
		}
	}
	defer relay.Close()
	_ = relay.SetReadDeadline(time.Now().Add(20 * time.Second))
	_, err := io.Copy(io.Discard, relay)
	<-served
	return err
}

// An agent refuses a session it cannot serve with an abort, never a clean close
// (docs/PROTOCOL.md, section 11.8), over QUIC (RESET_STREAM 0x1) and TLS (a TCP
// reset). Bad input: session headers for a name the agent does not expose, with
// a net that differs from the service's, and with a flow id that is not the
// stream's (over TLS: any flow id).
func TestAgentAbortsSessionItCannotServe(t *testing.T) {
	t.Parallel()
	seven := uint64(7) // the relay's stream is the first server-initiated one: its flow id is 0
	for _, tc := range []struct {
		what string
		hdr  wire.SessionHeader
	}{
		{"a name the agent does not expose", wire.SessionHeader{V: 1, Session: "01", Name: "other", PeerID: "bob@phone"}},
		{"net udp for a TCP service", wire.SessionHeader{V: 1, Session: "02", Name: "svc", Net: "udp", PeerID: "bob@phone"}},
		{"no net for a UDP service", wire.SessionHeader{V: 1, Session: "03", Name: "dns", PeerID: "bob@phone"}},
		{"a wrong flow id", wire.SessionHeader{V: 1, Session: "04", Name: "game", Net: "udp", Public: "udp/27015", PeerAddr: "192.0.2.1:9", Flow: &seven}},
	} {
		for _, transport := range []string{TransportQUIC, TransportTLS} {
			t.Run(transport+"/"+tc.what, func(t *testing.T) {
				a := &Agent{
					Exposed: []Exposed{{Name: "svc", Local: "127.0.0.1:1"}, {Name: "dns", Local: "127.0.0.1:1", UDP: true},
						{Name: "game", Local: "127.0.0.1:1", UDP: true, PublicPort: 27015}},
					full:   map[string]string{"svc": "svc.rev.test", "dns": "dns.rev.test", "game": "game.rev.test"},
					Dialer: &Dialer{},
				}
				err := relayEnd(t, transport, a, tc.hdr)
				code, reset := wire.StreamResetCode(err)
				switch {
				case err == nil:
					t.Fatal("the relay saw a clean end: the refusal would reach the dialer as an empty, complete session")
				case transport == TransportQUIC && (!reset || code != wire.QUICInternal):
					t.Fatalf("the relay saw %v; want RESET_STREAM 0x1 (a protocol error)", err)
				case transport == TransportTLS && !errors.Is(err, syscall.ECONNRESET):
					t.Fatalf("the relay saw %v; want a TCP reset", err)
				}
			})
		}
	}
}

// A client that is told a flow id that is not its stream's, or any flow id over
// TLS, aborts the flow with internal (0x1) rather than closing it: a protocol
// error of the server's (docs/PROTOCOL.md, sections 9.5 and 12.1). Bad input: a
// server (played by the test) that answers a UDP dial with the wrong flow id.
func TestClientAbortsOnWrongFlow(t *testing.T) {
	t.Parallel()
	ca := testpki.New(t)
	srvCfg := &tls.Config{Certificates: []tls.Certificate{ca.ServerCert(t, "localhost", "127.0.0.1")}, NextProtos: []string{wire.ALPN}, MinVersion: tls.VersionTLS13}
	cert := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	for _, transport := range []string{TransportQUIC, TransportTLS} {
		t.Run(transport, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			var addr string
			accepted := make(chan net.Conn, 1)
			if transport == TransportQUIC {
				ln, err := quic.ListenAddr("127.0.0.1:0", srvCfg, &quic.Config{EnableDatagrams: true})
				if err != nil {
					t.Fatal(err)
				}
				defer ln.Close()
				addr = ln.Addr().String()
				go func() {
					c, err := ln.Accept(ctx)
					if err != nil {
						return
					}
					if str, err := c.AcceptStream(ctx); err == nil {
						accepted <- wire.NewQUICStream(c, str)
					}
				}()
			} else {
				ln, err := tls.Listen("tcp", "127.0.0.1:0", srvCfg)
				if err != nil {
					t.Fatal(err)
				}
				defer ln.Close()
				addr = ln.Addr().String()
				go func() {
					if c, err := ln.Accept(); err == nil {
						accepted <- c
					}
				}()
			}
			d := &Dialer{Server: addr, Transport: transport, Timeout: 10 * time.Second,
				TLSConfig: &tls.Config{RootCAs: ca.Pool, Certificates: []tls.Certificate{cert}}}
			defer d.Close()
			dialed := make(chan error, 1)
			go func() {
				c, err := d.DialContext(ctx, "udp", "127.0.0.1:53")
				if err == nil {
					c.Close()
				}
				dialed <- err
			}()
			var relay net.Conn
			select {
			case relay = <-accepted:
			case <-ctx.Done():
				t.Fatal("the client sent no request")
			}
			defer relay.Close()
			_ = relay.SetDeadline(time.Now().Add(20 * time.Second))
			if _, err := wire.ReadClientHello(relay); err != nil {
				t.Fatal(err)
			}
			wrong := uint64(5) // the client's first stream is 0: its flow id is 0
			if err := wire.WriteServerHello(relay, wire.ServerHello{V: 1, OK: true, Flow: &wrong}); err != nil {
				t.Fatal(err)
			}
			if err := <-dialed; err == nil || !errors.As(err, new(*wire.ProtocolError)) {
				t.Fatalf("dial: %v; want the protocol error reported", err)
			}
			_, err := io.Copy(io.Discard, relay)
			code, reset := wire.StreamResetCode(err)
			switch {
			case err == nil:
				t.Fatal("the server saw the flow closed cleanly; want an abort")
			case transport == TransportQUIC && (!reset || code != wire.QUICInternal):
				t.Fatalf("the server saw %v; want RESET_STREAM 0x1", err)
			case transport == TransportTLS && !errors.Is(err, syscall.ECONNRESET):
				t.Fatalf("the server saw %v; want a TCP reset", err)
			}
		})
	}
}

// An agent whose registration meets another protocol version gives up at once
// and says to update tp or the server: retrying cannot change the answer
// (docs/PROTOCOL.md, sections 2.3 and 11.9). Bad input: a server (played by the
// test) that refuses the listen with unsupported_version, and one that answers
// with a version 2 hello.
func TestAgentVersionMismatchIsFinal(t *testing.T) {
	t.Parallel()
	ca := testpki.New(t)
	srvCfg := &tls.Config{Certificates: []tls.Certificate{ca.ServerCert(t, "localhost", "127.0.0.1")}, NextProtos: []string{wire.ALPN}, MinVersion: tls.VersionTLS13}
	cert := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	for _, answer := range []string{
		`{"v":1,"ok":false,"code":"unsupported_version","reason":"protocol version 1 is not supported; this server speaks version 2"}`,
		`{"v":2,"ok":true,"names":["svc.rev.test"]}`,
	} {
		t.Run(answer, func(t *testing.T) {
			ln, err := tls.Listen("tcp", "127.0.0.1:0", srvCfg)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			attempts := make(chan struct{}, 16)
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					attempts <- struct{}{}
					_ = c.SetDeadline(time.Now().Add(10 * time.Second))
					if _, err := wire.ReadClientHello(c); err == nil {
						_, _ = c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(answer))), answer...))
					}
					_ = c.Close()
				}
			}()
			d := &Dialer{Server: ln.Addr().String(), Transport: TransportTLS, Timeout: 10 * time.Second,
				TLSConfig: &tls.Config{RootCAs: ca.Pool, Certificates: []tls.Certificate{cert}}}
			defer d.Close()
			a := &Agent{Dialer: d, Exposed: []Exposed{{Name: "svc", Local: "127.0.0.1:1"}},
				Certificate: func(context.Context, string) (*tls.Certificate, error) { return nil, errors.New("not needed") }}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			ran := make(chan error, 1)
			go func() { ran <- a.Run(ctx) }()
			<-attempts
			select {
			case err := <-ran:
				if err == nil || !strings.Contains(err.Error(), "update tp") {
					t.Fatalf("Run = %v; want a final error that says to update tp or the server", err)
				}
			case <-attempts:
				cancel()
				<-ran
				t.Fatal("the agent tried again after a protocol version mismatch")
			}
		})
	}
}
