package mux

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy/wire"
)

// Stream is one session on a multiplexed connection: a wire.Stream whose end
// is a cut (wire.ErrTruncated) unless the peer ended its direction with FIN.
// While idle it holds no buffer.
type Stream struct {
	m  *Conn
	id uint32

	wmu sync.Mutex // one Write at a time

	mu        sync.Mutex
	rq        []*[]byte // received payloads, in order; rq[0][roff:rlens[0]] unread
	rlens     []int
	roff      int
	rwin      int    // bytes the peer may still send before more credit
	consumed  uint32 // read since the last credit
	win       int    // the receive window (grows up to MaxStreamWindow)
	lastGrant time.Time
	rfin      bool  // the peer's FIN arrived
	rerr      error // the stream was cut, for reads
	swin      int   // bytes this end may still send
	wfin      bool  // FIN sent
	werr      error // the stream was cut, for writes
	closed    bool  // Close was called
	rdeadline time.Time
	wdeadline time.Time
	rtimer    *time.Timer
	wtimer    *time.Timer
	rwake     chan struct{} // one wake-up for one of the readers waiting
	wwake     chan struct{} // the writer's (wmu: one at a time)
	rwaiting  int           // Reads waiting on rwake
	linger    *time.Timer   // a closed stream's wait for the peer's FIN (Close)
	cutErr    error         // why the peer's ABORT or the connection's end cut it
	ctx       context.Context
	ctxCancel context.CancelCauseFunc // made by Context, on first use
}

var (
	_ wire.Stream = (*Stream)(nil)
	_ interface {
		Abort(quic.ApplicationErrorCode)
	} = (*Stream)(nil)
)

func newStream(m *Conn, id uint32) *Stream {
	w := m.o.StreamWindow
	return &Stream{m: m, id: id, rwin: w, swin: w, win: w,
		rwake: make(chan struct{}, 1), wwake: make(chan struct{}, 1)}
}

// ReadsHeld says that a Read past the read deadline still returns what the
// stream holds (wire.HeldReader): Bridge waits on it holding no buffer.
func (s *Stream) ReadsHeld() {}

var _ wire.HeldReader = (*Stream)(nil)

// ID is the stream's id on its connection.
func (s *Stream) ID() uint32 { return s.id }

// Conn is the connection the stream belongs to.
func (s *Stream) Conn() *Conn { return s.m }

// Window is the stream's current receive window (tests).
func (s *Stream) Window() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.win
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// deliver queues a received payload (buf[:n]).
func (s *Stream) deliver(buf *[]byte, n int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.rfin:
		putBuf(buf)
		return s.m.protocolError("data on stream %d after its FIN", s.id)
	case n > s.rwin:
		putBuf(buf)
		return s.m.protocolError("%d bytes on stream %d beyond its window (%d)", n, s.id, s.rwin)
	case s.rerr != nil:
		putBuf(buf) // no longer read here
		return nil
	case s.closed:
		putBuf(buf) // closed here: cut it (on another goroutine: the reader never writes)
		go s.cutClosed()
		return nil
	case n == 0:
		putBuf(buf)
		return nil
	}
	s.rwin -= n
	// A payload that fits in the free end of the last buffer held goes there:
	// the window counts payload bytes, and one buffer per frame would let a
	// peer that sends one-byte frames make this end hold a 2 KiB buffer per
	// byte of window (a 4 MiB window, 8 GiB). So a stream holds at most twice
	// its window, and one buffer, whatever the frame sizes: a new buffer is
	// taken only for a payload the last one cannot fit, so each two
	// consecutive buffers hold more than the first one's size.
	if k := len(s.rq) - 1; k >= 0 && len(*s.rq[k])-s.rlens[k] >= n {
		s.rlens[k] += copy((*s.rq[k])[s.rlens[k]:], (*buf)[:n])
		putBuf(buf)
	} else {
		s.rq = append(s.rq, buf)
		s.rlens = append(s.rlens, n)
	}
	signal(s.rwake)
	return nil
}

// held is the memory of the payloads the stream holds: the size of its
// buffers (tests).
func (s *Stream) held() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, b := range s.rq {
		n += cap(*b)
	}
	return n
}

func (s *Stream) onFin() error {
	s.mu.Lock()
	if s.rfin {
		s.mu.Unlock()
		return s.m.protocolError("a second FIN on stream %d", s.id)
	}
	s.rfin = true
	done := s.wfin || s.werr != nil
	if s.linger != nil {
		s.linger.Stop()
	}
	s.mu.Unlock()
	signal(s.rwake)
	if done {
		s.m.remove(s.id)
	}
	return nil
}

// onAbort cuts the stream for the peer's ABORT; code is the cut's code of
// section 6.1 when the ABORT carried one, else -1.
func (s *Stream) onAbort(reason byte, code int) {
	why := "the " + s.m.o.Peer + " aborted the stream"
	if reason == AbortRefused {
		why = "the " + s.m.o.Peer + " refused the stream (it holds as many as it serves)"
	}
	to := ""
	if s.m.o.Name != "" {
		to = " to " + s.m.o.Name
	}
	var err error = fmt.Errorf("%s%s: %s: %w", s.m.o.StreamLabel, to, why, wire.ErrTruncated)
	switch {
	case reason == AbortRefused:
		err = fmt.Errorf("%s%s: %s (%w): %w", s.m.o.StreamLabel, to, why, ErrRefused, wire.ErrTruncated)
	case code >= 0: // read as a QUIC stream reset with that code reads (wire.StreamResetCode)
		err = fmt.Errorf("%s%s: %s: %w (%w)", s.m.o.StreamLabel, to, why, wire.ErrTruncated, wire.ResetError(quic.ApplicationErrorCode(code)))
	}
	if s.m.o.PeerAbort != nil {
		err = s.m.o.PeerAbort(reason, err)
	}
	s.cut(err)
	s.m.remove(s.id)
}

// Context ends, with the cut's error as its cause, when the peer aborts the
// stream or the connection ends under it; this end's own close or abort does
// not end it. A server uses it to stop the set-up of a request its client
// cancelled.
func (s *Stream) Context() context.Context {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ctx == nil {
		s.ctx, s.ctxCancel = context.WithCancelCause(context.Background())
		if s.cutErr != nil {
			s.ctxCancel(s.cutErr)
		}
	}
	return s.ctx
}

// cut fails both directions with err (data already received stays readable).
func (s *Stream) cut(err error) {
	s.mu.Lock()
	if s.rerr == nil {
		s.rerr = err
	}
	if s.werr == nil {
		s.werr = err
	}
	if s.cutErr == nil {
		s.cutErr = err
		if s.ctxCancel != nil {
			s.ctxCancel(err)
		}
	}
	s.mu.Unlock()
	signal(s.rwake)
	signal(s.wwake)
}

func (s *Stream) onWindow(n uint32) error {
	s.mu.Lock()
	if s.swin+int(n) > s.m.o.MaxStreamWindow {
		s.mu.Unlock()
		return s.m.protocolError("the window of stream %d grew beyond %d bytes", s.id, s.m.o.MaxStreamWindow)
	}
	s.swin += int(n)
	s.mu.Unlock()
	signal(s.wwake)
	return nil
}

// Read may be called by several goroutines at once (net.Conn); rwake wakes
// one of them, which passes the wake-up on before it returns: what woke it (a
// deadline, the end, data it did not take) may concern the others too, and a
// wake-up that stopped at the first reader would leave the rest waiting for
// ever.
func (s *Stream) Read(p []byte) (n int, err error) {
	s.mu.Lock()
	defer func() {
		if s.rwaiting > 0 {
			signal(s.rwake)
		}
		s.mu.Unlock()
	}()
	for {
		if len(s.rq) > 0 {
			for len(s.rq) > 0 && n < len(p) { // as many queued frames as p holds
				c := copy(p[n:], (*s.rq[0])[s.roff:s.rlens[0]])
				n += c
				s.roff += c
				if s.roff == s.rlens[0] {
					putBuf(s.rq[0])
					s.rq[0] = nil
					s.rq, s.rlens, s.roff = s.rq[1:], s.rlens[1:], 0
				}
			}
			if len(s.rq) == 0 {
				s.rq, s.rlens = nil, nil // let go of the backing arrays while idle
			}
			s.consumed += uint32(n)
			var grant uint32
			if int(s.consumed) >= s.win/4 && !s.rfin && s.rerr == nil {
				grant, s.consumed = s.consumed, 0
				now := time.Now()
				if s.win < s.m.o.MaxStreamWindow && now.Sub(s.lastGrant) < s.m.o.GrowWithin && s.m.grow(s.win) {
					grant += uint32(s.win) // the window doubles
					s.win *= 2
				}
				s.lastGrant = now
				s.rwin += int(grant)
			}
			if grant > 0 {
				s.mu.Unlock()
				s.m.credit(s.id, grant)
				s.mu.Lock()
			}
			return n, nil
		}
		switch {
		case s.rfin:
			return 0, io.EOF
		case s.rerr != nil:
			return 0, s.rerr
		case s.closed:
			return 0, net.ErrClosed
		case !s.rdeadline.IsZero() && !time.Now().Before(s.rdeadline):
			return 0, os.ErrDeadlineExceeded
		}
		s.rwaiting++
		s.mu.Unlock()
		<-s.rwake
		s.mu.Lock()
		s.rwaiting--
	}
}

func (s *Stream) Write(p []byte) (int, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	written := 0
	for written < len(p) {
		s.mu.Lock()
		switch {
		case s.werr != nil:
			err := s.werr
			s.mu.Unlock()
			return written, err
		case s.wfin || s.closed:
			s.mu.Unlock()
			return written, net.ErrClosed
		case !s.wdeadline.IsZero() && !time.Now().Before(s.wdeadline):
			s.mu.Unlock()
			return written, os.ErrDeadlineExceeded
		case s.swin == 0:
			s.mu.Unlock()
			<-s.wwake
			continue
		}
		n := min(len(p)-written, s.swin, 4*s.m.o.SendPayload)
		s.swin -= n
		s.mu.Unlock()
		if err := s.m.writeData(s.id, p[written:written+n]); err != nil {
			to := ""
			if s.m.o.Name != "" {
				to = " to " + s.m.o.Name
			}
			return written, fmt.Errorf("%s%s: %w", s.m.o.StreamLabel, to, err)
		}
		written += n
	}
	return written, nil
}

// CloseWrite sends FIN: the clean end of this direction.
func (s *Stream) CloseWrite() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.Lock()
	if s.wfin || s.werr != nil {
		err := s.werr
		s.mu.Unlock()
		return err
	}
	s.wfin = true
	done := s.rfin || s.rerr != nil
	s.mu.Unlock()
	err := s.m.frame(FrameFin, s.id, nil)
	if done {
		s.m.remove(s.id)
	}
	return err
}

// Close ends the stream as closing a TCP socket does: FIN for an open write
// direction; when the peer's direction has not ended, ABORT at once if data
// of it was left unread, else only once more of it arrives (it is not read:
// the peer's writes fail, as a TCP reset makes them) or the peer has not
// ended it within Options.Linger. A peer that ends its direction then sees a
// clean end, as over TLS (close_notify) or QUIC (FIN and STOP_SENDING 0).
func (s *Stream) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	readOpen := !s.rfin && s.rerr == nil
	writeOpen := !s.wfin && s.werr == nil
	unread := len(s.rq) > 0
	s.dropReceivedLocked()
	if readOpen && !unread {
		s.linger = time.AfterFunc(s.m.o.Linger, s.cutClosed)
	}
	s.mu.Unlock()
	signal(s.rwake)
	signal(s.wwake)
	if writeOpen {
		s.wmu.Lock()
		s.mu.Lock()
		s.wfin = true
		s.mu.Unlock()
		_ = s.m.frame(FrameFin, s.id, nil)
		s.wmu.Unlock()
	}
	if readOpen && unread {
		s.Abort(wire.QUICPeerReset)
		return nil
	}
	if !readOpen {
		s.m.remove(s.id)
	}
	return nil // else the stream ends with the peer's FIN (onFin), or cutClosed
}

// cutClosed cuts a closed stream whose peer did not end its direction: more
// of it arrived, which nobody reads, or Options.Linger passed.
func (s *Stream) cutClosed() {
	s.mu.Lock()
	ended := s.rfin || s.rerr != nil
	s.mu.Unlock()
	if !ended {
		s.Abort(wire.QUICPeerReset)
	}
}

func (s *Stream) dropReceivedLocked() {
	for _, b := range s.rq {
		putBuf(b)
	}
	s.rq, s.rlens, s.roff = nil, nil, 0
}

// Abort cuts the stream both ways: the peer reads an error, never an end. With
// Options.AbortCodes the ABORT carries code (one byte; a larger code goes as
// internal).
func (s *Stream) Abort(code quic.ApplicationErrorCode) {
	if !s.m.o.AbortCodes {
		s.abort([]byte{AbortCut})
		return
	}
	if code > 0xff {
		code = wire.QUICInternal
	}
	s.abort([]byte{AbortCut, byte(code)})
}

// AbortWith cuts the stream both ways with reason (AbortCut, AbortRefused).
func (s *Stream) AbortWith(reason byte) { s.abort([]byte{reason}) }

// abort cuts the stream both ways, sending ABORT with payload unless this end
// already did.
func (s *Stream) abort(payload []byte) {
	s.mu.Lock()
	sent := s.closed && s.werr != nil
	if s.werr == nil {
		s.werr = net.ErrClosed
	}
	if s.rerr == nil {
		s.rerr = net.ErrClosed
	}
	s.closed = true
	s.dropReceivedLocked()
	s.mu.Unlock()
	signal(s.rwake)
	signal(s.wwake)
	if !sent {
		_ = s.m.frame(FrameAbort, s.id, payload)
	}
	s.m.remove(s.id)
}

func (s *Stream) LocalAddr() net.Addr  { return s.m.conn.LocalAddr() }
func (s *Stream) RemoteAddr() net.Addr { return s.m.conn.RemoteAddr() }

func (s *Stream) SetDeadline(t time.Time) error {
	_ = s.SetReadDeadline(t)
	return s.SetWriteDeadline(t)
}

func (s *Stream) SetReadDeadline(t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rdeadline = t
	s.rtimer = rearm(s.rtimer, t, s.rwake)
	signal(s.rwake)
	return nil
}

func (s *Stream) SetWriteDeadline(t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.wdeadline = t
	s.wtimer = rearm(s.wtimer, t, s.wwake)
	signal(s.wwake)
	return nil
}

// rearm stops timer and, for a deadline in the future, starts one that wakes c
// at t.
func rearm(timer *time.Timer, t time.Time, c chan struct{}) *time.Timer {
	if timer != nil {
		timer.Stop()
	}
	if t.IsZero() {
		return nil
	}
	d := time.Until(t)
	if d <= 0 {
		return nil
	}
	return time.AfterFunc(d, func() { signal(c) })
}
