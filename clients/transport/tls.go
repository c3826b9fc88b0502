package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/proxy/wire"
)

// TLSSessions opens TLS connections to a TP server (TCP connect and handshake)
// for one client: at most maxTLSHandshakes at a time, all with one shared
// configuration. The server's address and the caller's TLS configuration are
// given with each call, as a caller may change them between calls. The zero
// value is ready to use; it must not be copied after first use.
type TLSSessions struct {
	hs      handshakeSlots // TLS handshakes in flight (tlsslots.go)
	sessCfg sessionCfg     // the sessions' configuration (SessionConfig)
}

// Started is how many TLS connections s has begun (Connect): tests tell from
// it whether sessions rode spares.
func (s *TLSSessions) Started() int64 { return s.hs.started.Load() }

// Connect opens a new TLS connection to server with the TLS configuration
// cfg; wrap, when not nil, wraps the TCP connection below the TLS one.
func (s *TLSSessions) Connect(ctx context.Context, server string, cfg *tls.Config, wrap func(net.Conn) net.Conn) (*tls.Conn, error) {
	release, err := s.hs.acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("connecting to TP server %s: waiting while %d TLS handshakes with it are under way: %w", server, maxTLSHandshakes, err)
	}
	defer release()
	s.hs.started.Add(1)
	conn, err := handshake(ctx, server, cfg, wrap)
	var he *handshakeError
	if errors.As(err, &he) && ClosedUnanswered(he.err) && ctx.Err() == nil {
		// tpd closes a connection at accept, before any answer, when the source
		// address has max-handshakes-per-ip unfinished handshakes: it counts a
		// handshake until it has read the client's Finished, which under load can
		// be well after this side's slot was given back. One retry after a pause
		// rides that out; nothing of a request was sent yet.
		t := time.NewTimer(20*time.Millisecond + rand.N(60*time.Millisecond))
		defer t.Stop()
		select {
		case <-t.C:
			conn, err = handshake(ctx, server, cfg, wrap)
		case <-ctx.Done():
		}
	}
	return conn, err
}

// handshake connects to server over TCP and runs the TLS handshake, with
// wrap, when not nil, around the connection below TLS.
func handshake(ctx context.Context, server string, cfg *tls.Config, wrap func(net.Conn) net.Conn) (*tls.Conn, error) {
	var nd net.Dialer
	raw, err := nd.DialContext(ctx, "tcp", server)
	if err != nil {
		if ce := login.ExplainConnect(server, err); ce != err {
			return nil, ce
		}
		return nil, fmt.Errorf("connecting to TP server %s: %w", server, err)
	}
	// EOFConn lets a cut (a TLS session that ends without close_notify) be told
	// from a clean end; CheckTLSAnswer, a port that speaks no TLS from tpd.
	var below net.Conn = wire.NewEOFConn(login.CheckTLSAnswer(raw))
	if wrap != nil {
		below = wrap(below)
	}
	conn := tls.Client(below, cfg)
	if err := conn.HandshakeContext(ctx); err != nil {
		_ = raw.Close()
		if ce := login.ExplainConnect(server, err); ce != err {
			return nil, &handshakeError{ce}
		}
		return nil, fmt.Errorf("TLS handshake with TP server %s: %w", server, &handshakeError{err})
	}
	return conn, nil
}

// handshakeError is a TLS handshake that failed (handshake).
type handshakeError struct{ err error }

func (e *handshakeError) Error() string { return e.err.Error() }
func (e *handshakeError) Unwrap() error { return e.err }

// ForgetRejected drops the session ticket for server when err says the
// server refused this device's certificate, and returns err. crypto/tls drops a
// ticket only when the handshake fails on the client's side, but TLS 1.3 checks
// the client's certificate last, after the client's side is done (on a resumed
// session too): the refused ticket would be offered, and refused, again.
func ForgetRejected(err error, server string, base *tls.Config) error {
	if !errors.Is(err, ErrCertificateRejected) || base == nil || base.ClientSessionCache == nil {
		return err
	}
	if cfg, cerr := Config(server, base); cerr == nil {
		base.ClientSessionCache.Put(cfg.ServerName, nil)
	}
	return err
}

// SessionConfig is Config made once for all of s's TLS sessions (again if
// base or server changed): a TLS connection keeps its configuration for its
// life, and a clone per connection is a kilobyte more per idle tunnel.
func (s *TLSSessions) SessionConfig(server string, base *tls.Config) (*tls.Config, error) {
	c := &s.sessCfg
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cfg != nil && c.base == base && c.server == server {
		return c.cfg, nil
	}
	cfg, err := Config(server, base)
	if err != nil {
		return nil, err
	}
	c.base, c.server, c.cfg = base, server, cfg
	return cfg, nil
}

// sessionCfg is the cache of SessionConfig.
type sessionCfg struct {
	mu     sync.Mutex
	base   *tls.Config // the TLSConfig cfg was made from
	server string
	cfg    *tls.Config
}

// Config is a TLS configuration for a session with the TP server at server
// (host:port): a clone of base (nil: an empty one) with TP's ALPN, TLS 1.3,
// and server's host as the server name when base names none.
func Config(server string, base *tls.Config) (*tls.Config, error) {
	var cfg *tls.Config
	if base != nil {
		cfg = base.Clone()
	} else {
		cfg = &tls.Config{}
	}
	cfg.NextProtos = []string{wire.ALPN}
	cfg.MinVersion = tls.VersionTLS13
	cfg.MaxVersion = 0
	if cfg.ServerName == "" {
		host, _, err := net.SplitHostPort(server)
		if err != nil {
			return nil, fmt.Errorf("TP server address %q: %w", server, err)
		}
		cfg.ServerName = host
	}
	return cfg, nil
}
