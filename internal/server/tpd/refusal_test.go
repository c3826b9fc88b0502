package tpd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// rawRequest sends hello with c's certificate on a new TLS connection or a new
// stream of a new QUIC connection to the daemon, and returns the stream with the
// server's answer (or why none could be read), for tests that need to see the
// protocol itself (codes, ids).
func rawRequest(t *testing.T, c *clients.Client, transport string, hello wire.ClientHello) (net.Conn, wire.ServerHello, error) {
	t.Helper()
	d, err := c.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	cfg := d.TLSConfig.Clone()
	cfg.NextProtos, cfg.ServerName = []string{wire.ALPN}, "localhost"
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var conn net.Conn
	switch transport {
	case clients.TransportTLS:
		tc, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", d.Server)
		if err != nil {
			t.Fatal(err)
		}
		conn = tc
	default:
		qc, err := quic.DialAddr(ctx, d.Server, cfg, &quic.Config{EnableDatagrams: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = qc.CloseWithError(0, "") })
		str, err := qc.OpenStreamSync(ctx)
		if err != nil {
			t.Fatal(err)
		}
		conn = wire.NewQUICStream(qc, str)
	}
	t.Cleanup(func() { _ = conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	if err := wire.WriteClientHello(conn, hello); err != nil {
		t.Fatal(err)
	}
	sh, err := wire.ReadServerHello(conn)
	return conn, sh, err
}

// resetErr says what is wrong unless err, a dialer's read error, is the reset
// the server passes on from an agent: RESET_STREAM peer_reset (0x7) over QUIC, a
// TCP reset over TLS.
func resetErr(transport string, err error) error {
	switch code, reset := wire.StreamResetCode(err); {
	case err == nil || errors.Is(err, io.EOF):
		return fmt.Errorf("the dialer saw a clean end (%v): the agent's refusal passed for an empty, complete session", err)
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("the dialer heard nothing within its deadline: %v", err)
	case transport == clients.TransportQUIC && (!reset || code != wire.QUICPeerReset):
		return fmt.Errorf("the dialer saw %v; want RESET_STREAM peer_reset (0x7)", err)
	case transport == clients.TransportTLS && !errors.Is(err, syscall.ECONNRESET):
		return fmt.Errorf("the dialer saw %v; want a TCP reset", err)
	}
	return nil
}

// dialRefused dials hello as c until one session's ok arrived before its reset
// (an abort can overtake the ok: a reset discards what the dialer had not read
// yet, and then there is no session id to ask about), checks that every attempt
// ended in a reset, and that "why" names the agent for the one that got its ok.
func dialRefused(t *testing.T, c *clients.Client, transport string, hello wire.ClientHello) {
	t.Helper()
	for range 20 {
		conn, sh, err := rawRequest(t, c, transport, hello)
		if err != nil {
			if e := resetErr(transport, err); e != nil {
				t.Fatalf("before the ok: %v", e)
			}
			continue
		}
		if !sh.OK || sh.Session == "" {
			t.Fatalf("dial of %s: %+v; want an ok with a session id", hello.Host, sh)
		}
		_, err = io.Copy(io.Discard, conn)
		if e := resetErr(transport, err); e != nil {
			t.Fatal(e)
		}
		_, sh, err = rawRequest(t, c, clients.TransportTLS, wire.ClientHello{V: wire.Version, Op: wire.OpWhy, Session: sh.Session})
		if err != nil || !sh.OK || sh.End == nil || sh.End.Code != wire.EndPeerReset || sh.End.By != "agent" {
			t.Fatalf("why: %+v (end %+v) %v; want peer_reset by agent", sh, sh.End, err)
		}
		return
	}
	t.Fatal("in 20 dials the agent's reset always overtook the ok: no session to ask why about")
}

// An agent that cannot start a public UDP session (its local service cannot be
// reached) aborts it, so a TP dialer sees a reset and "why" names the agent,
// over QUIC and TLS. Bad input: the agent's local service is the link-local
// address fe80::1 without a zone, which connect(2) refuses before anything is sent.
func TestAgentRefusalIsAbort(t *testing.T) {
	t.Parallel()
	port := testnet.FreePort(t, "udp")
	d, url := startDaemonCfg(t, fmt.Sprintf(udpPolicy, port), func(c *config.Server) { c.PublicPorts = fmt.Sprintf("%d/udp", port) })
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	bob, _, _ := enrollClient(t, d, url, "bob", "phone")
	for _, transport := range []string{clients.TransportQUIC, clients.TransportTLS} {
		t.Run(transport, func(t *testing.T) {
			stop, err := runAgent(t, alice, transport, []clients.Exposed{{Name: "game", Local: "[fe80::1]:9", UDP: true, PublicPort: port}}, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer stop()
			dialRefused(t, bob, transport, wire.ClientHello{V: wire.Version, Op: wire.OpDial, Net: "udp", Host: "game.rev.tp.internal", Port: port})
		})
	}
}
