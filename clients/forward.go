package clients

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// Forwarder accepts local connections and carries each one to Target through Dial,
// typically (*Dialer).DialEarly, so that a local client's first bytes travel with
// the request. A refusal that Dial's connection reports on its first Read or Write
// instead of from Dial is logged like one from Dial.
type Forwarder struct {
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// DialFirst, when set, is used instead of Dial, typically (*Dialer).DialFirst:
	// first is what the local client had already sent when its connection was
	// accepted (read without waiting, at most wire.MaxEarlyData bytes), for the
	// dial to send with its request.
	DialFirst func(ctx context.Context, network, addr string, first []byte) (net.Conn, error)
	Target    string // host:port as the TP server should dial it
	Logger    *slog.Logger
}

// ListenForward listens on addr (host:port) for Serve. Connections from this
// host's loopback addresses are accepted without TCP keepalive probes: a
// local peer's end reaches the kernel as a FIN or a reset without them, and
// Go's default probes cost each new tunnel four system calls (SO_KEEPALIVE,
// TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT) before its first byte. A peer on
// another host keeps Go's default probes (after 15 s idle).
func ListenForward(ctx context.Context, addr string) (net.Listener, error) {
	ln, err := (&net.ListenConfig{KeepAlive: -1}).Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return probeRemote{ln}, nil
}

// probeRemote turns keepalive probes on for accepted connections whose peer
// is not on a loopback address.
type probeRemote struct{ net.Listener }

func (l probeRemote) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		probeUnlessLoopback(c)
	}
	return c, err
}

// probeUnlessLoopback turns Go's default TCP keepalive probes on for c, a
// connection made or accepted with none, unless its peer is on a loopback
// address (an IPv4-mapped one too, as a dual-stack socket sees IPv4 peers).
func probeUnlessLoopback(c net.Conn) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return
	}
	if a, ok := tc.RemoteAddr().(*net.TCPAddr); ok && a.AddrPort().Addr().Unmap().IsLoopback() {
		return
	}
	_ = tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true})
}

// Serve accepts on ln until ctx ends or ln fails, closes ln, waits for the
// connections it started to end (they end with ctx), and returns ctx's error or the
// accept error. A failure on one connection is logged and does not stop the others.
func (f *Forwarder) Serve(ctx context.Context, ln net.Listener) error {
	log := f.Logger
	if log == nil {
		log = slog.Default()
	}
	stop := context.AfterFunc(ctx, func() { _ = ln.Close() })
	defer stop()
	defer ln.Close()

	var wg sync.WaitGroup
	defer wg.Wait()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			log.Warn("forward: accept failed; retrying", "err", err, "backoff", backoff)
			select {
			case <-time.After(backoff):
				continue
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		backoff = 0
		wg.Add(1)
		go f.forward(ctx, log, c, &wg)
	}
}

// forward dials the tunnel for local and hands the tunnel's life to a fresh
// goroutine. The dial goes deep (a TLS handshake with a post-quantum key
// exchange, when no spare is at hand, grows a stack to tens of KiB), and a
// goroutine's stack keeps the size it grew to until the garbage collector
// shrinks it, one halving per cycle: the goroutine that parks for as long as
// the tunnel idles starts after the dial, with a stack that never grew. (A
// dial on a goroutine of its own, waited for, would cost each new tunnel one
// more hand-off between goroutines, a thread's wake-up on a busy machine.)
// It calls wg.Done when the tunnel has ended.
func (f *Forwarder) forward(ctx context.Context, log *slog.Logger, local net.Conn, wg *sync.WaitGroup) {
	start := time.Now()
	remote, first, err := f.dial(ctx, local)
	if err != nil {
		defer wg.Done()
		_ = local.Close()
		log.Warn("forward failed", "local", local.RemoteAddr().String(), "target", f.Target, "err", err.Error(), "duration", time.Since(start))
		return
	}
	go func() {
		defer wg.Done()
		f.relay(ctx, log, local, remote, first, start)
	}()
}

// relay bridges local and the tunnel's remote until either ends, and logs the
// forward line. first is how many of local's bytes went with the dial.
func (f *Forwarder) relay(ctx context.Context, log *slog.Logger, local, remote net.Conn, first int, start time.Time) {
	attrs := []any{"local", local.RemoteAddr().String(), "target", f.Target}
	// A cut on either side resets the other: the local client sees a reset, never
	// a clean end after partial data.
	up, down, err := wire.Bridge(ctx, local, remote)
	// The bytes the client had sent before the dial went with the request
	// (DialFirst), not through the bridge: they are sent bytes all the same.
	up += int64(first)
	if re := (*RefusedError)(nil); errors.As(err, &re) {
		// A dial that returned before the server's answer (DialEarly) learns of
		// the refusal only here; the bytes it sent early were discarded.
		log.Warn("forward failed", append(attrs, "err", re.Error(), "duration", time.Since(start))...)
		return
	}
	end := "closed"
	if err != nil {
		end = cutText(ExplainCut(ctx, err))
	}
	log.Info("forward", append(attrs, "bytes_up", up, "bytes_down", down, "duration", time.Since(start), "end", end)...)
}

// cutText is how a forwarded connection's cut reads in the forward line: a
// cut of the tunnel as CutError explains it (who cut it and why), a failure
// of the local client's connection as that. Bridge's own text would not do:
// it names its connections "first" and "second", and over QUIC it keeps only
// the stream's reset inside a CutError, dropping what Explain learnt.
func cutText(err error) string {
	var ce *CutError
	var bc *wire.CutError
	switch {
	case errors.As(err, &ce):
		return ce.Error()
	case errors.As(err, &bc) && bc.B:
		return "the connection through TP failed: " + wire.UnwrapOpError(bc.Err).Error()
	case errors.As(err, &bc): // Bridge's first connection is the local client's
		return "the local client's connection failed: " + wire.UnwrapOpError(bc.Err).Error()
	}
	return err.Error()
}

// dial connects the tunnel for local. first is how many of local's bytes went
// with the dial (DialFirst).
func (f *Forwarder) dial(ctx context.Context, local net.Conn) (conn net.Conn, first int, err error) {
	if f.DialFirst == nil {
		conn, err = f.Dial(ctx, "tcp", f.Target)
		return conn, 0, err
	}
	b := readReady(local)
	conn, err = f.DialFirst(ctx, "tcp", f.Target, b)
	return conn, len(b), err
}

// readyBufs holds the buffers readReady reads into: what it returns is a copy
// of the bytes read, so that a tunnel keeps no 16 KiB buffer for a few bytes.
var readyBufs = sync.Pool{New: func() any { b := make([]byte, wire.MaxEarlyData); return &b }}

// readReady returns what c has already received, up to wire.MaxEarlyData bytes,
// without waiting for more: nothing when c has no data yet (or is no socket).
// An end of input or a failure is left for the bridge to find.
func readReady(c net.Conn) []byte {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	bp := readyBufs.Get().(*[]byte)
	defer readyBufs.Put(bp)
	buf := *bp
	n := 0
	err = rc.Read(func(fd uintptr) bool {
		// One non-blocking read: EAGAIN (no data yet), EOF and errors all give
		// nothing, and the bridge's first read meets them again.
		n, _ = readFD(fd, buf)
		return true
	})
	if err != nil || n <= 0 {
		return nil
	}
	return bytes.Clone(buf[:n])
}
