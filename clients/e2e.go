package clients

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/wire"
)

// E2EALPN is the ALPN of the inner TLS session between a dialer and a protected
// reverse listener's agent.
const E2EALPN = "tp-e2e/1"

// e2eSession opens the end-to-end session of a dial the server answered with
// "e2e": by attaching to the state kept from an earlier session with the same
// agent (e2eattach.go) when there is some, else with a TLS handshake. An agent
// that no longer knows the state says so, and the handshake follows on the same
// stream. early is an attach already sent with the hello, or nil.
func (d *Dialer) e2eSession(ctx context.Context, conn net.Conn, addr string, early *pendingAttach) (net.Conn, error) {
	host, _, _ := net.SplitHostPort(addr)
	if early == nil && !d.NoE2EAttach {
		if st := d.e2e.get(host); st != nil {
			if early = st.prepare(time.Now(), nil); early == nil {
				d.e2e.drop(host, st) // too old to use
			}
		}
	}
	if early != nil {
		c, fallback, err := d.attach(ctx, conn, addr, early)
		if !fallback {
			if err == nil {
				d.e2e.count(true)
			} else if !errors.As(err, new(*RefusedError)) {
				d.e2e.drop(host, early.st) // the agent did not take it: start afresh next time
			}
			return c, err
		}
		d.e2e.drop(host, early.st)
	}
	if claim := muxClaimFrom(ctx); claim != nil && early == nil {
		// This dial may open a carrier for later sessions to the name (e2emux.go).
		return d.innerTLSWith(ctx, conn, addr, true, claim)
	}
	return d.innerTLS(ctx, conn, addr, !d.NoE2EAttach)
}

// hostOf is the host of addr (host:port), or addr when it has no port.
func hostOf(addr string) string {
	if host, _, err := net.SplitHostPort(addr); err == nil {
		return host
	}
	return addr
}

// earlyAttach prepares the attach that goes with the hello, for a TCP dial of a
// name this Dialer holds attach state for, over either carrier: it is early data
// (docs/PROTOCOL.md, section 6.5), which a server that refuses the dial discards
// before it closes, so the refusal stays readable over TLS too. Sent with the
// hello, the attach reaches the agent with the session header instead of one
// round trip through the server later.
//
// With a state made by a tp-e2e/3 session, the attach also carries first's
// bytes (a dial's first bytes, DialFirst), sealed in its proof record; first.sent
// is set once the agent took them.
func (d *Dialer) earlyAttach(conn net.Conn, hello wire.ClientHello, first *earlyDial) *pendingAttach {
	if d.NoE2EAttach || hello.Op != wire.OpDial || hello.Net != "tcp" {
		return nil
	}
	st := d.e2e.get(hello.Host)
	if st == nil {
		return nil
	}
	p := st.prepare(time.Now(), first)
	if p == nil {
		d.e2e.drop(hello.Host, st)
	}
	return p
}

// attach runs an attach on conn: it sends p's message (unless it went with the
// hello), then reads the agent's answer: its hello in the first sealed record,
// or a fallback to a TLS handshake (fallback true, conn untouched beyond the
// answer's byte).
func (d *Dialer) attach(ctx context.Context, conn net.Conn, addr string, p *pendingAttach) (c net.Conn, fallback bool, err error) {
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	var answer [1]byte
	if !p.sent {
		_, err = conn.Write(p.msg)
	}
	if err == nil {
		_, err = io.ReadFull(conn, answer[:])
	}
	var sc *sealedConn
	var sh wire.ServerHello
	if err == nil && answer[0] == attachAccepted {
		sc = newSealedConn(conn, p.s2c, p.c2s, 0, 1) // the proof was the dialer's record 0
		sh, err = wire.ReadServerHello(sc)
	}
	if !stop() {
		err = errors.Join(err, ctx.Err())
	}
	switch {
	case err == nil && answer[0] == attachFallback:
		return nil, true, nil
	case err == nil && answer[0] != attachAccepted:
		err = fmt.Errorf("the agent answered the attach with 0x%02x", answer[0])
	}
	if err != nil {
		_ = conn.Close()
		return nil, false, fmt.Errorf("tp dial %s: attaching to the end-to-end session with the agent: %w", addr, err)
	}
	_ = conn.SetDeadline(time.Time{})
	if !sh.OK {
		_ = sc.CloseWrite()
		_ = conn.Close()
		return nil, false, &RefusedError{Code: sh.Code, Reason: sh.Reason, Agent: hostOf(addr)}
	}
	if p.early != nil {
		p.early.sent = true // the agent passes them on after its ok
	}
	return sc, false, nil
}

// innerTLS runs the end-to-end TLS session with a protected reverse listener's
// agent inside conn: it verifies the agent's certificate for host against the TP
// root, presents this device's certificate, and reads the agent's own hello.
// With offerAttach it also offers tp-e2e/2 and, when the agent takes it, keeps
// the session's attach state for later sessions to the same name.
func (d *Dialer) innerTLS(ctx context.Context, conn net.Conn, addr string, offerAttach bool) (net.Conn, error) {
	return d.innerTLSWith(ctx, conn, addr, offerAttach, nil)
}

// innerTLSWith is innerTLS; with claim it also offers tp-e2e-mux/1, and when
// the agent takes it the session becomes a carrier (e2emux_dial.go).
func (d *Dialer) innerTLSWith(ctx context.Context, conn net.Conn, addr string, offerAttach bool, claim *muxClaim) (net.Conn, error) {
	host, _, _ := net.SplitHostPort(addr)
	cfg := d.TLSConfig.Clone()
	cfg.ServerName = host
	cfg.NextProtos = []string{E2EALPN}
	if offerAttach {
		cfg.NextProtos = []string{E2EALPN3, E2EALPN2, E2EALPN}
	}
	if claim != nil {
		cfg.NextProtos = append([]string{E2EMuxALPN}, cfg.NextProtos...)
	}
	cfg.MinVersion = tls.VersionTLS13
	// EOFConn lets a cut of the inner session (no close_notify) be told from its end.
	batch := &transport.BatchConn{Conn: wire.NewEOFConn(conn)}
	tc := tls.Client(batch, cfg)
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	err := tc.HandshakeContext(ctx)
	mux := err == nil && claim != nil && tc.ConnectionState().NegotiatedProtocol == E2EMuxALPN
	var sh wire.ServerHello
	if err == nil && !mux { // a carrier's answers come per stream
		sh, err = wire.ReadServerHello(tc)
	}
	if !stop() {
		err = errors.Join(err, ctx.Err())
	}
	if err != nil {
		_ = conn.Close()
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("tp dial %s: the agent ended the session during its TLS handshake (it probably refused this device's certificate): %w", addr, err)
		}
		return nil, fmt.Errorf("tp dial %s: end-to-end TLS with the agent: %w", addr, err)
	}
	_ = conn.SetDeadline(time.Time{})
	if mux {
		d.e2e.count(false)
		return d.startMux(ctx, tc, batch, addr, claim)
	}
	if claim != nil {
		d.noMux(claim) // an older agent: sessions of their own for a while
	}
	if !sh.OK {
		_ = tc.Close()
		return nil, &RefusedError{Code: sh.Code, Reason: sh.Reason, Agent: host}
	}
	d.e2e.count(false)
	if cs := tc.ConnectionState(); cs.NegotiatedProtocol == E2EALPN2 || cs.NegotiatedProtocol == E2EALPN3 {
		if st, err := newDialerAttach(cs, time.Now()); err == nil {
			d.e2e.put(host, st)
		}
	}
	return &transport.BatchedTLS{Conn: tc, Batch: batch}, nil
}
