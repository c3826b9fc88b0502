package clients

import (
	"context"
	"io"
	"net"

	"github.com/tp-proxy/tp/proxy"
)

// Stdio bridges conn to a process's standard streams, as ssh's ProxyCommand needs:
// in→conn, then conn.CloseWrite at EOF on in, and conn→out. It returns when
// conn→out ends or ctx ends, and closes conn. EOF on in only half-closes: ssh closes
// its side early and still expects the reply. The in→conn goroutine may stay blocked
// reading in after Stdio returns if in cannot be interrupted (os.Stdin); callers exit.
func Stdio(ctx context.Context, conn net.Conn, in io.Reader, out io.Writer) error {
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()
	defer conn.Close()

	go func() {
		_, err := io.Copy(conn, in)
		if err != nil && !proxy.IsNormalEnd(err) {
			_ = conn.Close()
			return
		}
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
	}()

	_, err := io.Copy(out, conn)
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	if proxy.IsNormalEnd(err) {
		return nil
	}
	return err
}
