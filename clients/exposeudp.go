package clients

import (
	"context"
	"log/slog"
	"net"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// servePublicUDP runs one session of a name whose UDP service is exposed
// publicly: one public client of the server's public UDP port (hdr.PeerAddr),
// or a TP client that dialed the name with net "udp". Datagrams arrive as
// capsules on st and, over QUIC when the server named a flow id, in DATAGRAM
// frames too. The agent dials only e.Local.
func (a *Agent) servePublicUDP(ctx context.Context, st wire.Stream, hdr wire.SessionHeader, e Exposed, log *slog.Logger) {
	start := time.Now()
	if hdr.PeerAddr != "" {
		log = log.With("public_client", hdr.PeerAddr, "via", hdr.Public)
	}
	flow, err := wire.NewUDPFlow(st, 0, nil)
	if err == nil {
		err = flow.UseFlowID(hdr.Flow)
	}
	if err != nil { // a flow id in use, or one that is not the stream's: a protocol error
		if flow != nil {
			flow.Abort(wire.QUICInternal)
		} else {
			refuseSession(st, wire.QUICInternal)
		}
		log.Warn("tp expose: cannot start a UDP session; refused", "err", err.Error())
		return
	}
	var nd net.Dialer
	dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
	local, err := nd.DialContext(dctx, "udp", e.Local)
	dcancel()
	if err != nil {
		flow.Abort(wire.QUICPeerReset)
		log.Warn("tp expose: cannot reach the local UDP service; session reset", "local", e.Local, "err", err.Error())
		return
	}
	a.relayUDP(ctx, flow, local, e.Local, start, log)
}

// relayUDP relays a started or new flow to the connected local UDP socket until
// the session ends, and logs it.
func (a *Agent) relayUDP(ctx context.Context, flow *wire.UDPFlow, local net.Conn, addr string, start time.Time, log *slog.Logger) {
	flow.Start()
	end := wire.RelayUDP(ctx, flow, local, a.UDPIdle).End
	st := flow.Stats()
	attrs := []any{"local", addr, "datagrams_in", st.DatagramsIn, "datagrams_out", st.DatagramsOut,
		"bytes_in", st.BytesIn, "bytes_out", st.BytesOut, "duration", time.Since(start), "end", end}
	if n := a.Dialer.QUICDatagramsDropped(); n > 0 { // per QUIC connection, not per session
		attrs = append(attrs, "quic_receive_queue_dropped_total", n)
	}
	log.Info("tp expose: UDP session", attrs...)
}
