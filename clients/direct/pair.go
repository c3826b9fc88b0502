package direct

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy/wire"
)

// ALPN of the pair's QUIC connection.
const ALPN = "tp-direct/1"

// StreamOpener is the dialer's first byte on each session's stream: a QUIC
// stream reaches the other end only with data.
const StreamOpener byte = 0x00

// MaxStreams bounds the sessions open on a pair at once.
const MaxStreams = 256

// HandshakeTimeout bounds the pair's QUIC handshake over the relay.
const HandshakeTimeout = 10 * time.Second

// Pair is one end of the end-to-end QUIC connection between a dialer and an
// agent: Conn carries the sessions (one bidirectional stream each), Path its
// packets.
type Pair struct {
	Conn *quic.Conn
	Path *Path
	tr   *quic.Transport
	ctx  context.Context // ends with the pair
	stop context.CancelFunc
	done chan struct{}

	iceOnce  sync.Once
	iceErr   error
	searched chan struct{} // ICE ended (or never ran); iceErr says why
}

func quicConfig() *quic.Config {
	return &quic.Config{
		HandshakeIdleTimeout:       HandshakeTimeout,
		MaxIdleTimeout:             30 * time.Second,
		KeepAlivePeriod:            10 * time.Second,
		InitialPacketSize:          MaxPacket,
		DisablePathMTUDiscovery:    true, // it would measure the relay; the Path checks the direct path
		MaxIncomingStreams:         MaxStreams,
		MaxIncomingUniStreams:      1, // the signalling stream
		MaxStreamReceiveWindow:     16 << 20,
		MaxConnectionReceiveWindow: 32 << 20,
	}
}

// Dial opens the dialer's end over relay, the stream through the TP server of
// a dial the server answered with "e2e": it writes the marker, and runs the
// QUIC handshake (tls: ServerName the name, the device certificate, TP's
// root) without waiting for the agent's answer. Then it looks for a direct
// path in the background.
func Dial(ctx context.Context, relay net.Conn, tlsConf *tls.Config, opts ICEOptions) (*Pair, error) {
	_ = relay.SetWriteDeadline(time.Now().Add(HandshakeTimeout))
	if _, err := relay.Write([]byte{Marker, Version}); err != nil {
		_ = relay.Close()
		return nil, fmt.Errorf("opening a direct path: %w", err)
	}
	_ = relay.SetWriteDeadline(time.Time{})
	path := NewPath(relay, []byte{Marker, Version})
	tr := &quic.Transport{Conn: path}
	cfg := tlsConf.Clone()
	cfg.NextProtos = []string{ALPN}
	cfg.MinVersion = tls.VersionTLS13
	hctx, cancel := context.WithTimeout(ctx, HandshakeTimeout)
	defer cancel()
	type result struct {
		c   *quic.Conn
		err error
	}
	res := make(chan result, 1)
	go func() {
		c, err := tr.Dial(hctx, path.RemoteAddr(), cfg, quicConfig())
		res <- result{c, err}
	}()
	var r result
	select {
	case r = <-res:
	case <-path.Done():
		cancel()
		r = <-res
		if r.err == nil {
			_ = r.c.CloseWithError(0, "")
		}
		r.err = path.Err()
	}
	if r.err != nil {
		_ = tr.Close()
		path.Close()
		if errors.Is(path.Err(), ErrRefused) {
			return nil, ErrRefused
		}
		return nil, fmt.Errorf("the end-to-end QUIC handshake with the agent: %w", r.err)
	}
	p := start(r.c, tr, path)
	p.StartICE(true, opts)
	return p, nil
}

// Accept runs the agent's end over relay, whose marker and version were read:
// it answers, and takes the dialer's QUIC handshake (tls: the agent's
// certificate for the name; a client certificate required and verified
// against TP's root). The caller checks the dialer's certificate, then starts
// ICE (StartICE).
func Accept(ctx context.Context, relay net.Conn, tlsConf *tls.Config) (*Pair, error) {
	_ = relay.SetWriteDeadline(time.Now().Add(HandshakeTimeout))
	if _, err := relay.Write([]byte{Marker, Version}); err != nil {
		_ = relay.Close()
		return nil, fmt.Errorf("answering a direct path: %w", err)
	}
	_ = relay.SetWriteDeadline(time.Time{})
	path := NewPath(relay, nil)
	tr := &quic.Transport{Conn: path}
	cfg := tlsConf.Clone()
	cfg.NextProtos = []string{ALPN}
	cfg.MinVersion = tls.VersionTLS13
	ln, err := tr.Listen(cfg, quicConfig())
	if err != nil {
		path.Close()
		return nil, err
	}
	hctx, cancel := context.WithTimeout(ctx, HandshakeTimeout)
	defer cancel()
	go func() {
		select {
		case <-path.Done():
			cancel()
		case <-hctx.Done():
		}
	}()
	c, err := ln.Accept(hctx)
	_ = ln.Close() // one connection per pair: no further handshakes
	if err == nil {
		select {
		case <-c.HandshakeComplete():
		case <-hctx.Done():
			err = hctx.Err()
			_ = c.CloseWithError(0, "")
		}
	}
	if err != nil {
		_ = tr.Close()
		if perr := path.Err(); perr != nil {
			err = perr
		}
		path.Close()
		return nil, fmt.Errorf("the end-to-end QUIC handshake with the dialer: %w", err)
	}
	return start(c, tr, path), nil
}

func start(c *quic.Conn, tr *quic.Transport, path *Path) *Pair {
	ctx, cancel := context.WithCancel(context.Background())
	p := &Pair{Conn: c, Path: path, tr: tr, ctx: ctx, stop: cancel, done: make(chan struct{}), searched: make(chan struct{})}
	go func() {
		select {
		case <-path.Done():
			if errors.Is(path.Err(), ErrRelayEnded) {
				// The other end ended the relay after its close, which says
				// why, went on the direct path: let it arrive.
				select {
				case <-c.Context().Done():
				case <-time.After(time.Second):
				}
			}
			code, reason := wire.QUICPeerReset, path.Err().Error()
			if rc, ok := wire.StreamResetCode(path.Err()); ok { // the TP server's word (a revoke, a drain)
				code, reason = rc, "the TP server cut the session that authorises the direct path: "+
					strings.TrimPrefix(wire.ResetError(rc).Error(), "stream reset by the peer: ")
			}
			_ = c.CloseWithError(code, reason)
		case <-c.Context().Done():
			path.CloseRelay()
		}
		_ = path.Close()
		path.flushed() // a CONNECTION_CLOSE queued for the direct path goes before ICE closes its socket
		cancel()
		_ = tr.Close()
		p.iceOnce.Do(func() { close(p.searched) }) // ICE never started
		<-p.searched
		close(p.done)
	}()
	return p
}

// StartICE starts looking for a direct path (RunICE), once: the dialer at
// once, the agent once the dialer passed its checks, so that a dialer it
// refuses learns none of its addresses.
func (p *Pair) StartICE(controlling bool, opts ICEOptions) {
	p.iceOnce.Do(func() {
		go func() {
			p.iceErr = RunICE(p.ctx, p.Conn, p.Path, controlling, opts)
			close(p.searched)
		}()
	})
}

// ICEErr is why no direct path was found, once the pair ended; nil when one was,
// or when ICE did not run.
func (p *Pair) ICEErr() error {
	select {
	case <-p.searched:
		if errors.Is(p.iceErr, context.Canceled) {
			return nil
		}
		return p.iceErr
	default:
		return nil
	}
}

// Done is closed once the pair ended and released its ICE agent and sockets.
func (p *Pair) Done() <-chan struct{} { return p.done }

// Close ends the pair: its open streams are cut (the other end sees the code
// and reason), then the relay stream.
func (p *Pair) Close(code quic.ApplicationErrorCode, reason string) {
	_ = p.Conn.CloseWithError(code, reason)
}
