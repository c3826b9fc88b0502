package clients

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/wire"
)

// UDPForwarder receives datagrams on a local socket and carries them to Target
// through Dial (typically (*Dialer).DialContext with network "udp"), one flow per
// local source address, like a NAT: replies go back to the source that opened the
// flow. A flow idle for IdleTimeout ends; at most MaxFlows are open, and a new
// source beyond that ends the least recently used one.
type UDPForwarder struct {
	Dial   func(ctx context.Context, network, addr string) (net.Conn, error)
	Target string // host:port as the TP server should reach it
	Logger *slog.Logger
	// IdleTimeout ends a flow that carried nothing either way for this long,
	// counted from when Dial returned: a dial slower than it (bounded by the
	// Dialer's Timeout) is not idleness. Default 60s.
	IdleTimeout time.Duration
	// MaxFlows bounds the local sources served at once. Default 32 (the server's
	// default bound per QUIC connection is 64).
	MaxFlows int
	// QueueLen bounds the datagrams waiting per flow while it connects or while
	// the server is slower than the source; beyond it they are dropped and counted.
	// Default 64.
	QueueLen int
	// QUICDropped, when set, reports the datagrams the QUIC connection's receive
	// queue discarded so far ((*Dialer).QUICDatagramsDropped); flows log it.
	QUICDropped func() int64
	// Dialer, when Dial is its DialContext, says a flow's cut with this
	// device's words: its name, and what to do about an expired certificate
	// (renew, or be enrolled again without the device key).
	Dialer *Dialer

	dropped atomic.Int64
}

// Dropped counts datagrams this forwarder dropped: queues full, flows that could
// not be opened, datagrams the flow refused (too large).
func (f *UDPForwarder) Dropped() int64 { return f.dropped.Load() }

type natEntry struct {
	src    net.Addr
	q      chan []byte
	last   atomic.Int64 // unix nanoseconds of the last datagram either way
	open   atomic.Bool  // Dial has returned: idle time counts from then
	cancel context.CancelCauseFunc
	drops  atomic.Int64
}

func (e *natEntry) touch() { e.last.Store(time.Now().UnixNano()) }

var (
	errFlowIdle    = errors.New("idle")
	errFlowEvicted = errors.New("ended to make room for a new local source (MaxFlows)")
)

// Serve forwards datagrams arriving on pc until ctx ends or pc fails, then ends
// every flow, closes pc and returns ctx's error or the read error.
func (f *UDPForwarder) Serve(ctx context.Context, pc net.PacketConn) error {
	log := f.Logger
	if log == nil {
		log = slog.Default()
	}
	idle := f.IdleTimeout
	if idle <= 0 {
		idle = 60 * time.Second
	}
	maxFlows := f.MaxFlows
	if maxFlows <= 0 {
		maxFlows = 32
	}
	qlen := f.QueueLen
	if qlen <= 0 {
		qlen = 64
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { _ = pc.Close() })
	defer stop()
	defer pc.Close()

	var mu sync.Mutex
	table := make(map[string]*natEntry)
	var wg sync.WaitGroup
	defer wg.Wait()

	wg.Add(1)
	go func() { // idle expiry
		defer wg.Done()
		tick := time.NewTicker(max(idle/8, 10*time.Millisecond))
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			mu.Lock()
			for k, e := range table {
				if e.open.Load() && time.Since(time.Unix(0, e.last.Load())) >= idle {
					e.cancel(fmt.Errorf("%w for %s", errFlowIdle, idle))
					delete(table, k)
				}
			}
			mu.Unlock()
		}
	}()

	buf := make([]byte, wire.MaxDatagramSize)
	for {
		n, src, err := pc.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return err
		}
		d := make([]byte, n)
		copy(d, buf[:n])
		key := src.String()
		mu.Lock()
		e := table[key]
		if e == nil {
			if len(table) >= maxFlows {
				var oldest string
				for k, o := range table {
					if oldest == "" || o.last.Load() < table[oldest].last.Load() {
						oldest = k
					}
				}
				table[oldest].cancel(errFlowEvicted)
				delete(table, oldest)
			}
			e = &natEntry{src: src, q: make(chan []byte, qlen)}
			e.touch()
			var fctx context.Context
			fctx, e.cancel = context.WithCancelCause(ctx)
			table[key] = e
			wg.Add(1)
			go func() {
				defer wg.Done()
				f.runFlow(fctx, log, pc, e, idle)
				mu.Lock()
				if table[key] == e {
					delete(table, key)
				}
				mu.Unlock()
			}()
		}
		mu.Unlock()
		e.touch()
		select {
		case e.q <- d:
		default:
			e.drops.Add(1)
			f.dropped.Add(1)
		}
	}
}

// runFlow opens the flow for one local source and relays until it ends.
func (f *UDPForwarder) runFlow(ctx context.Context, log *slog.Logger, pc net.PacketConn, e *natEntry, idle time.Duration) {
	start := time.Now()
	attrs := []any{"local", e.src.String(), "target", f.Target}
	conn, err := f.Dial(ctx, "udp", f.Target)
	e.touch() // before open: the sweeper never sees the dial's time as idle
	e.open.Store(true)
	if err != nil {
		// Drop what this source sends for a moment instead of redialing per datagram.
		log.Warn("udp forward failed", append(attrs, "err", err.Error())...)
		t := time.NewTimer(min(5*time.Second, idle))
		defer t.Stop()
		for {
			select {
			case <-e.q:
				e.drops.Add(1)
				f.dropped.Add(1)
				continue
			case <-t.C:
			case <-ctx.Done():
			}
			break
		}
		f.dropped.Add(int64(len(e.q)))
		return
	}
	flow, _ := conn.(*wire.UDPFlow)
	if flow != nil {
		flow.OnReport(func(r wire.UDPReport) {
			log.Warn("udp: the TP server dropped datagrams of this flow", append(attrs,
				"too_large", r.TooLarge, "largest", r.Largest, "queue_full", r.QueueFull)...)
		})
	}
	ends := make(chan error, 2)
	go func() { // local source → TP
		for {
			select {
			case d := <-e.q:
				if _, err := conn.Write(d); err != nil {
					if errors.Is(err, wire.ErrDatagramTooLarge) {
						f.dropped.Add(1)
						continue // counted by the flow and reported to the server
					}
					ends <- err
					return
				}
			case <-ctx.Done():
				ends <- context.Cause(ctx)
				return
			}
		}
	}()
	go func() { // TP → local source
		buf := make([]byte, wire.MaxDatagramSize)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				ends <- err
				return
			}
			e.touch()
			if _, err := pc.WriteTo(buf[:n], e.src); err != nil && !errors.Is(err, net.ErrClosed) {
				e.drops.Add(1)
				f.dropped.Add(1)
			}
		}
	}()
	err = <-ends
	_ = conn.Close()
	e.cancel(err) // the other direction waits for the source's next datagram otherwise
	<-ends
	attrs = append(attrs, "duration", time.Since(start), "end", flowEnd(err, f.Dialer))
	if flow != nil {
		st := flow.Stats()
		attrs = append(attrs, "datagrams_up", st.DatagramsOut, "datagrams_down", st.DatagramsIn)
		if st.Oversize > 0 {
			attrs = append(attrs, "oversize_on_stream", st.Oversize)
		}
		if st.TooLarge > 0 {
			attrs = append(attrs, "dropped_too_large", st.TooLarge)
		}
		if st.Peer.TooLarge > 0 || st.Peer.QueueFull > 0 {
			attrs = append(attrs, "server_dropped_too_large", st.Peer.TooLarge, "server_dropped_queue_full", st.Peer.QueueFull)
		}
	}
	if n := e.drops.Load(); n > 0 {
		attrs = append(attrs, "dropped_queue_full", n)
	}
	if f.QUICDropped != nil {
		if n := f.QUICDropped(); n > 0 { // per QUIC connection, not per flow
			attrs = append(attrs, "quic_receive_queue_dropped_total", n)
		}
	}
	log.Info("udp flow", attrs...)
}

// flowEnd says how a flow ended, from the error that ended it.
func flowEnd(err error, d *Dialer) string {
	code, reset := wire.StreamResetCode(err)
	var closed *quic.ApplicationError
	switch {
	case errors.Is(err, errFlowIdle), errors.Is(err, errFlowEvicted):
		return err.Error()
	case errors.Is(err, context.Canceled):
		return "forwarder stopped"
	case reset && code != wire.QUICNoError:
		// The server (or the other end, through it) cut the flow, and its code
		// says why: said as a cut session's end is.
	case errors.As(err, &closed) && closed.Remote && closed.ErrorCode != wire.QUICNoError && wire.EndName(closed.ErrorCode) != wire.EndInternal:
		// The server closed the whole QUIC connection for a reason of TP's
		// (shutdown, an expired certificate), which ends every flow on it.
		code = closed.ErrorCode
	case err != nil && !wire.IsNormalEnd(err):
		return transport.ExplainQUIC(err, d.expiredAdvice).Error()
	default:
		return "ended by the TP server"
	}
	return "the flow was cut off by the TP server (" + wire.EndName(code) + "): " + resetText(code, d)
}
