package proxy

// The client sides of h2 and h3 CONNECT tunnels as streams wire.Bridge relays:
// Read, Write, CloseWrite (a clean end of the server's direction) and Abort (a
// reset the client sees as one).

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// errServerHalfClose ends an h2 tunnel whose destination finished sending while
// the client was still sending: see h2Tunnel.CloseWrite.
var errServerHalfClose = &wire.EndError{Code: wire.QUICPeerReset, By: "destination",
	Reason: "the destination finished sending while the client was still sending; an HTTP/2 CONNECT cannot stay open in one direction only (docs/HTTP.md, section 4), so the client was told to stop and the destination was reset"}

// h2Tunnel is an h2 CONNECT stream: the request body carries the client's
// bytes, the response body the destination's.
//
// Go's HTTP/2 server ends a response only when the handler returns, and then
// stops the request body with RST_STREAM(NO_ERROR) (RFC 9113 §8.1), so the
// server's direction cannot end while the client's keeps going. CloseWrite
// therefore ends the whole tunnel when the client's direction is still open:
// the client gets the complete response (END_STREAM) and is asked to stop
// sending, and the destination, which may not have received everything the
// client meant to send, is reset rather than shown a clean end.
type h2Tunnel struct {
	body       io.ReadCloser
	w          http.ResponseWriter
	rc         *http.ResponseController
	remote     string
	halfClosed context.CancelCauseFunc // ends the bridge (serveConnect)

	readEOF   atomic.Bool // the client ended its direction cleanly (END_STREAM)
	wroteEOF  atomic.Bool // CloseWrite: the response ends cleanly when the handler returns
	aborted   atomic.Bool // Abort: the handler resets the stream
	closeOnce sync.Once
}

var _ wire.Stream = (*h2Tunnel)(nil)

func (t *h2Tunnel) Read(p []byte) (int, error) {
	n, err := t.body.Read(p)
	if errors.Is(err, io.EOF) {
		t.readEOF.Store(true)
	}
	return n, err
}

func (t *h2Tunnel) Write(p []byte) (int, error) {
	n, err := t.w.Write(p)
	if err == nil {
		err = t.rc.Flush()
	}
	return n, err
}

// CloseWrite ends the server's direction: at once when the client's ended
// already (the handler then returns, sending END_STREAM), otherwise by ending
// the tunnel (see h2Tunnel).
func (t *h2Tunnel) CloseWrite() error {
	t.wroteEOF.Store(true)
	if !t.readEOF.Load() {
		t.halfClosed(errServerHalfClose)
	}
	return nil
}

// Abort makes the handler reset the stream (RST_STREAM), unless the server's
// direction already ended cleanly, which the client keeps.
func (t *h2Tunnel) Abort(quic.ApplicationErrorCode) {
	if !t.wroteEOF.Load() {
		t.aborted.Store(true)
	}
	_ = t.Close()
}

func (t *h2Tunnel) Close() error {
	t.closeOnce.Do(func() { _ = t.body.Close() })
	return nil
}

func (t *h2Tunnel) resetByHandler() bool { return t.aborted.Load() }

func (t *h2Tunnel) LocalAddr() net.Addr  { return stringAddr("tp-proxy") }
func (t *h2Tunnel) RemoteAddr() net.Addr { return stringAddr(t.remote) }
func (t *h2Tunnel) SetDeadline(d time.Time) error {
	return errors.Join(t.SetReadDeadline(d), t.SetWriteDeadline(d))
}
func (t *h2Tunnel) SetReadDeadline(d time.Time) error  { return t.rc.SetReadDeadline(d) }
func (t *h2Tunnel) SetWriteDeadline(d time.Time) error { return t.rc.SetWriteDeadline(d) }

type stringAddr string

func (a stringAddr) Network() string { return "tcp" }
func (a stringAddr) String() string  { return string(a) }

// h3ConnectError is the code an aborted h3 tunnel resets its stream with
// (H3_CONNECT_ERROR, RFC 9114 §4.4: the TCP connection was reset or failed).
const h3ConnectError = quic.StreamErrorCode(http3.ErrCodeConnectError)

// h3Stream is an h3 CONNECT request stream taken over from the server: DATA
// frames each way, FIN for a clean end, a stream reset for an abort.
type h3Stream struct {
	*http3.Stream
	remote string
}

var _ wire.Stream = (*h3Stream)(nil)

// h3Tunnel answers 200 and takes the request stream over.
func h3Tunnel(w http.ResponseWriter, r *http.Request) (wire.Stream, error) {
	hs, ok := w.(http3.HTTPStreamer)
	if !ok {
		return nil, errors.New("the HTTP/3 response cannot be taken over")
	}
	w.WriteHeader(http.StatusOK)
	str, err := hs.HTTPStream()
	if err != nil {
		return nil, err
	}
	return &h3Stream{Stream: str, remote: r.RemoteAddr}, nil
}

// CloseWrite sends FIN; the client's direction keeps going.
func (s *h3Stream) CloseWrite() error { return s.Stream.Close() }

// Close ends both directions: FIN, and the client told to stop sending (a
// no-op when its direction ended already).
func (s *h3Stream) Close() error {
	s.Stream.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
	return s.Stream.Close()
}

// Abort resets both directions with H3_CONNECT_ERROR.
func (s *h3Stream) Abort(quic.ApplicationErrorCode) {
	s.Stream.CancelRead(h3ConnectError)
	s.Stream.CancelWrite(h3ConnectError)
}

func (s *h3Stream) LocalAddr() net.Addr  { return stringAddr("tp-proxy") }
func (s *h3Stream) RemoteAddr() net.Addr { return stringAddr(s.remote) }
