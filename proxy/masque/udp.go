package masque

// The data plane of a CONNECT-UDP flow (package proxy serves the request, in
// its masque_udp.go): the client's side as HTTP Datagrams (QUIC DATAGRAM
// frames on h3) and DATAGRAM capsules on the request stream, relayed to a
// connected UDP socket with the flow's bounds.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/quic-go/quicvarint"

	"github.com/tp-proxy/tp/proxy/wire"
)

// capsuleDatagram is the DATAGRAM capsule type (RFC 9297 §3.5).
const capsuleDatagram http3.CapsuleType = 0x00

// h3MessageError resets an h3 request stream that carried a malformed message
// (H3_MESSAGE_ERROR, RFC 9114 §8.1), e.g. a malformed capsule (RFC 9297 §3.3).
const h3MessageError = quic.StreamErrorCode(http3.ErrCodeMessageError)

// h3ConnectError resets an h3 CONNECT stream whose tunnel was aborted
// (H3_CONNECT_ERROR, RFC 9114 §8.1).
const h3ConnectError = quic.StreamErrorCode(http3.ErrCodeConnectError)

// errMalformedCapsule ends a flow whose client sent a capsule that is not
// well formed (RFC 9297 §3.3).
var errMalformedCapsule = errors.New("malformed capsule")

// UDPLimits bound one flow (proxy.ConnectUDPOptions, defaults filled).
type UDPLimits struct {
	// MaxDatagram is the largest UDP payload relayed either way; a larger
	// one is dropped and counted, never truncated.
	MaxDatagram int
	// MaxPacketsPerSecond bounds the datagrams relayed per second in each
	// direction; beyond it they are dropped and counted.
	MaxPacketsPerSecond int
	// MaxBytesPerFlow bounds the payload bytes of the flow, both directions
	// together; the flow ends when it reaches it.
	MaxBytesPerFlow int64
}

// settingsWait bounds how long an h3 CONNECT-UDP request waits for the peer's
// SETTINGS (which say whether it takes HTTP/3 datagrams) before falling back
// to capsules.
const settingsWait = 3 * time.Second

// UDPStats are a server's CONNECT-UDP counters since it started.
type UDPStats struct {
	Flows, Active int64
	// DatagramsUp and DatagramsDown were relayed client→target and
	// target→client; BytesFromClient counts the UDP payload bytes the clients
	// sent with context ID 0, BytesToTarget those written to targets, which
	// never exceeds it (no amplification).
	DatagramsUp, DatagramsDown     int64
	BytesFromClient, BytesToTarget int64
	// Dropped datagrams, by reason: larger than MaxDatagram (either way), over
	// MaxPacketsPerSecond (either way), an unknown context ID, a datagram
	// without a context ID, too large for the target's path (EMSGSIZE).
	Oversize, RateLimited, UnknownContext, Malformed, TooLarge int64
	// CapsuleFallback counts datagrams to clients that fit no QUIC DATAGRAM
	// frame and took the request stream as a DATAGRAM capsule (not lost).
	CapsuleFallback int64
	// MalformedCapsules counts flows ended because their client sent a
	// malformed capsule.
	MalformedCapsules int64
}

// UDPCounters hold UDPStats; the zero value is ready.
type UDPCounters struct {
	flows, active, up, down, fromClient, toTarget                            atomic.Int64
	oversize, rateLimited, unknownCtx, malformed, tooLarge, fallback, badCap atomic.Int64
}

// Stats returns the counters.
func (c *UDPCounters) Stats() UDPStats {
	return UDPStats{
		Flows: c.flows.Load(), Active: c.active.Load(),
		DatagramsUp: c.up.Load(), DatagramsDown: c.down.Load(),
		BytesFromClient: c.fromClient.Load(), BytesToTarget: c.toTarget.Load(),
		Oversize: c.oversize.Load(), RateLimited: c.rateLimited.Load(), UnknownContext: c.unknownCtx.Load(),
		Malformed: c.malformed.Load(), TooLarge: c.tooLarge.Load(), CapsuleFallback: c.fallback.Load(),
		MalformedCapsules: c.badCap.Load(),
	}
}

// UDPFlow is one flow's counters and ending (Relay).
type UDPFlow struct {
	up, down, fromClient, bytesToTarget, bytesToClient                        atomic.Int64
	oversize, rateLimited, unknownCtx, malformed, tooLarge, fallback, refused atomic.Int64
	end                                                                       string
	malformedCapsule                                                          bool
}

func (c *UDPCounters) add(f *UDPFlow) {
	c.up.Add(f.up.Load())
	c.down.Add(f.down.Load())
	c.fromClient.Add(f.fromClient.Load())
	c.toTarget.Add(f.bytesToTarget.Load())
	c.oversize.Add(f.oversize.Load())
	c.rateLimited.Add(f.rateLimited.Load())
	c.unknownCtx.Add(f.unknownCtx.Load())
	c.malformed.Add(f.malformed.Load())
	c.tooLarge.Add(f.tooLarge.Load())
	c.fallback.Add(f.fallback.Load())
	if f.malformedCapsule {
		c.badCap.Add(1)
	}
}

// Bytes are the payload bytes relayed to the target and to the client.
func (f *UDPFlow) Bytes() (toTarget, toClient int64) {
	return f.bytesToTarget.Load(), f.bytesToClient.Load()
}

// End is why the flow ended, for its log line.
func (f *UDPFlow) End() string { return f.end }

// MalformedCapsule reports whether the flow ended on a malformed capsule
// from its client.
func (f *UDPFlow) MalformedCapsule() bool { return f.malformedCapsule }

// Attrs are the flow's counters for its log line (the drops only when there
// were any).
func (f *UDPFlow) Attrs() []slog.Attr {
	attrs := []slog.Attr{
		slog.String("network", "udp"),
		slog.Int64("datagrams_up", f.up.Load()),
		slog.Int64("datagrams_down", f.down.Load()),
	}
	for _, c := range []struct {
		name string
		v    int64
	}{{"dropped_oversize", f.oversize.Load()}, {"dropped_rate", f.rateLimited.Load()}, {"dropped_unknown_context", f.unknownCtx.Load()},
		{"dropped_malformed", f.malformed.Load()}, {"dropped_too_large", f.tooLarge.Load()}, {"capsule_fallback", f.fallback.Load()}, {"dest_refused", f.refused.Load()}} {
		if c.v > 0 {
			attrs = append(attrs, slog.Int64(c.name, c.v))
		}
	}
	return attrs
}

// UDPTunnel is the client's side of a flow: capsules on the request stream
// (rd, wr), and HTTP/3 datagrams on dg when both ends negotiated them.
type UDPTunnel struct {
	rd      io.Reader
	wr      io.Writer
	flush   func() error // h2: after each capsule
	dg      udpDatagrams
	reset   func(malformed bool) // abort: the client sees a reset, not an end
	closeFn func()               // clean end
	wmu     sync.Mutex
	h2Reset atomic.Bool // the h2 handler must reset the stream (RST_STREAM)
}

// udpDatagrams are a flow's HTTP/3 datagrams: the stream's own (http3's
// queue of 32) or, where tpd reads them below http3, a wire.H3DatagramFlow.
type udpDatagrams interface {
	SendDatagram([]byte) error
	ReceiveDatagram(context.Context) ([]byte, error)
}

// udpDatagramQueue is the receive queue of one CONNECT-UDP flow's datagrams
// read below http3, in datagrams.
const udpDatagramQueue = 256

// AbortHandler reports whether the h2 handler must reset the request's
// stream (RST_STREAM) as it returns.
func (t *UDPTunnel) AbortHandler() bool { return t.h2Reset.Load() }

// AcceptUDP answers 2xx (101 on HTTP/1.1) with Capsule-Protocol: ?1
// and returns the flow's client side.
func AcceptUDP(w http.ResponseWriter, r *http.Request, sid string) (*UDPTunnel, error) {
	switch r.ProtoMajor {
	case 1:
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return nil, err
		}
		_ = c.SetDeadline(time.Time{})
		_ = c.SetWriteDeadline(time.Now().Add(wire.HelloWriteTimeout))
		if _, err := io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\nCapsule-Protocol: ?1\r\nTP-Session: "+sid+"\r\n\r\n"); err != nil {
			_ = c.Close()
			return nil, err
		}
		_ = c.SetWriteDeadline(time.Time{})
		var rd io.Reader = c
		if brw.Reader.Buffered() > 0 { // capsules sent right behind the request
			rd = io.MultiReader(buffered(brw.Reader), c)
		}
		return &UDPTunnel{rd: rd, wr: c,
			reset:   func(bool) { wire.Abort(c, wire.QUICPeerReset) },
			closeFn: func() { _ = c.Close() }}, nil
	case 2:
		w.Header().Set(http3.CapsuleProtocolHeader, "?1")
		w.Header().Set("TP-Session", sid)
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w)
		if err := rc.Flush(); err != nil {
			return nil, err
		}
		t := &UDPTunnel{rd: r.Body, wr: w, flush: rc.Flush}
		// A clean end closes the request body (which ends its reader) and lets
		// the handler return: END_STREAM. An expired deadline would make
		// the server reset the stream, so only a reset uses them (to unblock
		// a write to a client that stopped reading).
		t.reset = func(bool) {
			t.h2Reset.Store(true)
			_ = rc.SetReadDeadline(time.Now())
			_ = rc.SetWriteDeadline(time.Now())
			_ = r.Body.Close()
		}
		t.closeFn = func() { _ = r.Body.Close() }
		return t, nil
	case 3:
		hs, ok := w.(http3.HTTPStreamer)
		if !ok {
			return nil, errors.New("the HTTP/3 response cannot be taken over")
		}
		datagrams := false
		hc := wire.H3ServerConnFrom(r.Context())
		if hc != nil { // tpd reads the client's SETTINGS itself
			select {
			case <-hc.SettingsRead():
				datagrams = hc.PeerDatagrams()
			case <-time.After(settingsWait):
			case <-r.Context().Done():
			}
		} else if st, ok := w.(http3.Settingser); ok {
			select {
			case <-st.ReceivedSettings():
				datagrams = st.Settings().EnableDatagrams
			case <-time.After(settingsWait):
			case <-r.Context().Done():
			}
		}
		w.Header().Set(http3.CapsuleProtocolHeader, "?1")
		w.Header().Set("TP-Session", sid)
		w.WriteHeader(http.StatusOK)
		str, err := hs.HTTPStream()
		if err != nil {
			return nil, err
		}
		t := &UDPTunnel{rd: str, wr: str}
		var flow *wire.H3DatagramFlow
		switch {
		case datagrams && hc != nil:
			flow = hc.Datagrams.Flow(str, udpDatagramQueue)
			t.dg = flow
		case datagrams:
			t.dg = str
		}
		t.reset = func(malformed bool) {
			code := h3ConnectError
			if malformed {
				code = h3MessageError
			}
			str.CancelRead(code)
			str.CancelWrite(code)
			if flow != nil {
				flow.Close()
			}
		}
		t.closeFn = func() {
			str.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
			_ = str.Close()
			if flow != nil {
				flow.Close()
			}
		}
		return t, nil
	}
	return nil, fmt.Errorf("CONNECT-UDP over %s is not served", r.Proto)
}

// buffered returns what r has buffered, consuming it.
func buffered(r *bufio.Reader) io.Reader {
	b := make([]byte, r.Buffered())
	_, _ = io.ReadFull(r, b)
	return &byteReader{b: b}
}

type byteReader struct{ b []byte }

func (r *byteReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.b)
	r.b = r.b[n:]
	return n, nil
}

// writeCapsule sends p (context ID 0) as one DATAGRAM capsule in one Write.
func (t *UDPTunnel) writeCapsule(p []byte) error {
	b := make([]byte, 0, len(p)+17)
	b = quicvarint.Append(b, uint64(capsuleDatagram))
	b = quicvarint.Append(b, uint64(len(p)+1))
	b = append(b, 0) // context ID 0
	b = append(b, p...)
	t.wmu.Lock()
	defer t.wmu.Unlock()
	if _, err := t.wr.Write(b); err != nil {
		return err
	}
	if t.flush != nil {
		return t.flush()
	}
	return nil
}

// dgramBucket is a token bucket of datagrams per second with a one-second burst.
type dgramBucket struct {
	mu     sync.Mutex
	rate   float64
	tokens float64
	last   time.Time
}

// newDgramBucket is a full bucket at now.
func newDgramBucket(perSecond int, now time.Time) *dgramBucket {
	return &dgramBucket{rate: float64(perSecond), tokens: float64(perSecond), last: now}
}

// take takes one datagram at now, or reports that the bucket is empty.
func (b *dgramBucket) take(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.tokens = min(b.rate, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// udpEnd is why a flow ended; abort when the client must see a reset.
type udpEnd struct {
	text      string
	abort     bool
	malformed bool
}

// Relay relays datagrams between t and upstream until either side
// ends, ctx ends (revocation, expiry, shutdown: t is reset), the flow reaches
// its byte bound, or nothing moved for idle.
func (c *UDPCounters) Relay(ctx context.Context, t *UDPTunnel, upstream net.Conn, o UDPLimits, idle time.Duration) *UDPFlow {
	c.flows.Add(1)
	c.active.Add(1)
	defer c.active.Add(-1)
	f := &UDPFlow{}
	var last atomic.Int64
	touch := func() { last.Store(time.Now().UnixNano()) }
	touch()
	var total atomic.Int64 // payload bytes both ways, for MaxBytesPerFlow
	start := time.Now()
	upRate, downRate := newDgramBucket(o.MaxPacketsPerSecond, start), newDgramBucket(o.MaxPacketsPerSecond, start)
	rctx, rcancel := context.WithCancel(ctx)
	defer rcancel()
	ends := make(chan udpEnd, 3)
	endWith := func(e udpEnd) { // the first end counts; later ones never block
		select {
		case ends <- e:
		default:
		}
	}
	overBudget := func(n int) bool {
		if total.Add(int64(n)) > o.MaxBytesPerFlow {
			endWith(udpEnd{text: fmt.Sprintf("the flow reached its bound of %d bytes; open a new one", o.MaxBytesPerFlow), abort: true})
			return true
		}
		return false
	}

	// up handles one HTTP Datagram payload from the client; a capsule's
	// payload without a context ID is a malformed capsule.
	up := func(p []byte, capsule bool) error {
		id, n, err := quicvarint.Parse(p)
		if err != nil {
			if capsule {
				return errMalformedCapsule
			}
			f.malformed.Add(1)
			return nil
		}
		if id != 0 { // RFC 9298 §5: unknown context IDs are dropped
			f.unknownCtx.Add(1)
			return nil
		}
		p = p[n:]
		f.fromClient.Add(int64(len(p)))
		touch()
		switch {
		case len(p) > o.MaxDatagram:
			f.oversize.Add(1)
			return nil
		case !upRate.take(time.Now()):
			f.rateLimited.Add(1)
			return nil
		case overBudget(len(p)):
			return io.EOF
		}
		if _, err := upstream.Write(p); err != nil {
			switch {
			case errors.Is(err, syscall.EMSGSIZE):
				f.tooLarge.Add(1)
			case errors.Is(err, syscall.ECONNREFUSED):
				f.refused.Add(1)
			case errors.Is(err, syscall.ENOBUFS), errors.Is(err, syscall.EAGAIN):
				f.rateLimited.Add(1)
			default:
				endWith(udpEnd{text: "writing to destination: " + wire.UnwrapOpError(err).Error(), abort: true})
				return io.EOF
			}
			return nil
		}
		f.up.Add(1)
		f.bytesToTarget.Add(int64(len(p)))
		return nil
	}

	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // capsules from the client
		defer wg.Done()
		cp := http3.NewCapsuleParser(t.rd)
		for {
			typ, cr, err := cp.Next()
			if err != nil {
				switch {
				case errors.Is(err, io.EOF):
					endWith(udpEnd{text: "closed by client"})
				case errors.Is(err, io.ErrUnexpectedEOF):
					endWith(udpEnd{text: "the client's stream ended inside a capsule (malformed capsule)", abort: true, malformed: true})
				default:
					endWith(udpEnd{text: "client: " + wire.UnwrapOpError(err).Error(), abort: true})
				}
				return
			}
			if typ != capsuleDatagram { // RFC 9297 §3.2: unknown capsule types are skipped
				if err := cr.Discard(); err != nil {
					endWith(udpEnd{text: "the client's stream ended inside a capsule (malformed capsule)", abort: true, malformed: true})
					return
				}
				continue
			}
			if rem := cr.Remaining(); rem > int64(o.MaxDatagram)+8 {
				f.oversize.Add(1)
				f.fromClient.Add(rem) // what the client sent, though not relayed
				if err := cr.Discard(); err != nil {
					endWith(udpEnd{text: "the client's stream ended inside a capsule (malformed capsule)", abort: true, malformed: true})
					return
				}
				touch()
				continue
			}
			p := make([]byte, cr.Remaining())
			if _, err := io.ReadFull(cr, p); err != nil {
				endWith(udpEnd{text: "the client's stream ended inside a capsule (malformed capsule)", abort: true, malformed: true})
				return
			}
			if err := up(p, true); err != nil {
				if errors.Is(err, errMalformedCapsule) {
					endWith(udpEnd{text: "the client sent a DATAGRAM capsule without a context ID (malformed capsule)", abort: true, malformed: true})
				}
				return
			}
		}
	}()
	if t.dg != nil {
		wg.Add(1)
		go func() { // HTTP/3 datagrams from the client
			defer wg.Done()
			for {
				p, err := t.dg.ReceiveDatagram(rctx)
				if err != nil {
					return // the stream or the flow ended: the capsule reader says how
				}
				if up(p, false) != nil {
					return
				}
			}
		}()
	}
	go func() { // target → client
		defer wg.Done()
		buf := make([]byte, wire.MaxDatagramSize+1)
		for {
			n, err := upstream.Read(buf)
			if err != nil {
				if errors.Is(err, syscall.ECONNREFUSED) {
					f.refused.Add(1) // nothing listens (yet): the flow stays for its idle time
					continue
				}
				if rctx.Err() == nil {
					endWith(udpEnd{text: wire.FlowEnd("destination", err), abort: !wire.IsNormalEnd(err)})
				}
				return
			}
			touch()
			switch {
			case n > o.MaxDatagram:
				f.oversize.Add(1)
				continue
			case !downRate.take(time.Now()):
				f.rateLimited.Add(1)
				continue
			case overBudget(n):
				return
			}
			if err := sendDown(t, f, buf[:n]); err != nil {
				if rctx.Err() == nil {
					endWith(udpEnd{text: wire.FlowEnd("client", err), abort: !wire.IsNormalEnd(err)})
				}
				return
			}
		}
	}()

	tick := time.NewTicker(max(idle/8, 10*time.Millisecond))
	defer tick.Stop()
	var end udpEnd
	for end.text == "" {
		select {
		case end = <-ends:
		case <-ctx.Done():
			end = udpEnd{text: context.Cause(ctx).Error(), abort: true}
		case <-tick.C:
			if since := time.Since(time.Unix(0, last.Load())); since >= idle {
				end.text = fmt.Sprintf("idle for %s", idle)
			}
		}
	}
	rcancel()
	if end.abort {
		t.reset(end.malformed)
	} else {
		t.closeFn()
	}
	_ = upstream.Close()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(wire.HelloWriteTimeout):
		// A capsule write still blocked on a client that stopped reading:
		// reset, which unblocks it, rather than wait for ever.
		t.reset(false)
		<-done
	}
	f.end, f.malformedCapsule = end.text, end.malformed
	c.add(f) // before the deferred Active decrement: a flow seen ended is counted
	return f
}

// sendDown sends one payload to the client: an HTTP/3 datagram when the flow
// has them and it fits one, else a DATAGRAM capsule.
func sendDown(t *UDPTunnel, f *UDPFlow, p []byte) error {
	if t.dg != nil {
		b := make([]byte, 1+len(p))
		copy(b[1:], p)
		err := t.dg.SendDatagram(b)
		if err == nil {
			f.down.Add(1)
			f.bytesToClient.Add(int64(len(p)))
			return nil
		}
		if !errors.As(err, new(*quic.DatagramTooLargeError)) {
			return err
		}
		f.fallback.Add(1)
	}
	if err := t.writeCapsule(p); err != nil {
		return err
	}
	f.down.Add(1)
	f.bytesToClient.Add(int64(len(p)))
	return nil
}
