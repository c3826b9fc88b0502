package clients

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// Stdio bridges conn to a process's standard streams, as ssh's ProxyCommand needs:
// in→conn, then conn.CloseWrite at EOF on in, and conn→out. It returns when
// conn→out ends or ctx ends, and closes conn. EOF on in only half-closes: ssh closes
// its side early and still expects the reply. The in→conn goroutine may stay blocked
// reading in after Stdio returns if in cannot be interrupted (os.Stdin); callers exit.
//
// Only a clean end returns nil. A session cut off on the way (a reset, a QUIC stream
// reset, a TLS session without close_notify) returns an error that says who cut it
// and why, as the TP server answered (CutError); when in or out fails, or ctx ends,
// conn is aborted (wire.Abort) rather than closed, so the far side sees the cut too.
func Stdio(ctx context.Context, conn net.Conn, in io.Reader, out io.Writer) error {
	stop := context.AfterFunc(ctx, func() { wire.Abort(conn, wire.AbortCode(context.Cause(ctx))) })
	defer stop()
	defer conn.Close()

	uploaded := make(chan struct{}) // in→conn ended: EOF passed on, or failed
	go func() {
		defer close(uploaded)
		_, err := io.Copy(conn, in)
		var ce *CutError
		switch {
		case errors.As(err, &ce) || errors.Is(err, net.ErrClosed):
			return // the session was cut (conn→out sees it too), or it is over
		case err != nil: // reading in failed: the upload is incomplete
			wire.Abort(conn, wire.QUICPeerReset)
			return
		}
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
	}()

	rerr, werr := copyOut(out, conn)
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	switch {
	case werr != nil: // the reader of out went away before the end
		wire.Abort(conn, wire.QUICPeerReset)
		return fmt.Errorf("writing the session's data to standard output: %w", werr)
	case rerr == nil:
		// The far side ended its direction cleanly; ours may still be sending
		// (a destination that half-closes and keeps reading). Closing now would
		// end the upload cleanly but short: wait for in's EOF a moment (ssh
		// closes our input as soon as it sees the end), then abort instead, so
		// the far side sees a reset, never a silently truncated upload.
		select {
		case <-uploaded:
		case <-time.After(uploadGrace):
			wire.Abort(conn, wire.QUICPeerReset)
		case <-ctx.Done():
			return context.Cause(ctx)
		}
		return nil
	default: // a *CutError says who cut the session, once explained
		return ExplainCut(ctx, rerr)
	}
}

// copyOut copies conn to out until EOF, telling a read error from a write error.
func copyOut(out io.Writer, conn net.Conn) (rerr, werr error) {
	buf := make([]byte, 32<<10)
	for {
		n, err := conn.Read(buf)
		if n > 0 {
			if _, werr := out.Write(buf[:n]); werr != nil {
				return nil, werr
			}
		}
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		if err != nil {
			return err, nil
		}
	}
}

// uploadGrace bounds how long Stdio waits, after the far side ended, for the end
// of its own input before it aborts the session.
const uploadGrace = 2 * time.Second
