package clients

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// public reports whether e is exposed in public mode.
func (e Exposed) public() bool { return e.PublicPort != 0 || e.PublicSNI != "" }

// servePublic runs one session of a publicly exposed name: a public client (or
// a TP dialer the relay's policy let through) with no TLS of TP's. It connects
// to the local service, the only address it ever dials, after terminating the
// client's TLS when e.TLS is set. A cut on either side resets the other (Bridge),
// so an error is never passed on as a clean end.
func (a *Agent) servePublic(ctx context.Context, st wire.Stream, hdr wire.SessionHeader, e Exposed, log *slog.Logger) {
	start := time.Now()
	if hdr.PeerAddr != "" {
		log = log.With("public_client", hdr.PeerAddr, "via", hdr.Public)
	}
	var conn wire.Stream = st
	if a.WrapData != nil {
		if w, ok := a.WrapData(st).(wire.Stream); ok {
			conn = w
		}
	}
	if e.TLS != nil {
		tc := tls.Server(wire.NewEOFConn(conn), e.TLS) // EOFConn: tell a cut client from a clean end
		hctx, cancel := context.WithTimeout(ctx, agentHandshakeTimeout)
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			_ = conn.Close()
			log.Warn("tp expose: TLS handshake with a public client failed", "err", err.Error())
			return
		}
		conn = tc
	}
	var nd net.Dialer
	dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
	local, err := nd.DialContext(dctx, "tcp", e.Local)
	dcancel()
	if err != nil {
		wire.Abort(conn, wire.QUICPeerReset)
		log.Warn("tp expose: cannot reach the local service; session reset", "local", e.Local, "err", err.Error())
		return
	}
	up, down, err := wire.Bridge(ctx, conn, local)
	end := "closed"
	if err != nil {
		end = err.Error()
	}
	log.Info("tp expose: public session", "local", e.Local, "bytes_in", up, "bytes_out", down, "duration", time.Since(start), "end", end)
}
