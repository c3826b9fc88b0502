package wire

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
)

// RelayResult is how a UDP relay ended.
type RelayResult struct {
	End     string // why, for a log line
	Refused int64  // ICMP port unreachable answers from upstream
}

// DefaultUDPIdle is the idle time RelayUDP takes for idle ≤ 0.
const DefaultUDPIdle = 60 * time.Second

// RelayUDP copies datagrams between flow and upstream, a connected UDP socket,
// until either side ends, ctx ends (flow is then aborted with ctx's cause's code),
// or nothing moved either way for idle (DefaultUDPIdle when ≤ 0); then it closes
// both and says why it ended. A failure on either side aborts flow.
func RelayUDP(ctx context.Context, flow *UDPFlow, upstream net.Conn, idle time.Duration) RelayResult {
	if idle <= 0 {
		idle = DefaultUDPIdle
	}
	var last atomic.Int64
	touch := func() { last.Store(time.Now().UnixNano()) }
	touch()
	var refused atomic.Int64
	ends := make(chan udpEnd, 2)

	go func() { // client → destination
		for {
			d, err := flow.ReadDatagram()
			if err != nil {
				ends <- flowEnd("client", err)
				return
			}
			n := len(d)
			touch()
			if _, err := upstream.Write(d); err != nil {
				switch {
				case errors.Is(err, syscall.EMSGSIZE):
					flow.NoteTooLarge(n)
				case errors.Is(err, syscall.ECONNREFUSED):
					refused.Add(1) // an earlier datagram was refused; this one may pass
				case errors.Is(err, syscall.ENOBUFS), errors.Is(err, syscall.EAGAIN):
					flow.NoteQueueFull()
				default:
					ends <- udpEnd{"writing to destination: " + UnwrapOpError(err).Error(), true, QUICPeerReset}
					return
				}
			}
		}
	}()
	go func() { // destination → client
		buf := make([]byte, MaxDatagramSize)
		for {
			n, err := upstream.Read(buf)
			if err != nil {
				if errors.Is(err, syscall.ECONNREFUSED) {
					refused.Add(1) // nothing listens (yet): the flow stays for its idle time
					continue
				}
				ends <- flowEnd("destination", err)
				return
			}
			touch()
			if _, err := flow.Write(buf[:n]); err != nil {
				ends <- flowEnd("client", err)
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
			cause := context.Cause(ctx)
			// Ended by the server (shutdown, expiry, revocation): the client's
			// stream is reset with the code that says why, not closed.
			Abort(flow, AbortCode(cause))
			end = udpEnd{text: cause.Error()}
		case <-tick.C:
			if since := time.Since(time.Unix(0, last.Load())); since >= idle {
				end.text = fmt.Sprintf("idle for %s", idle)
			}
		}
	}
	if end.abort {
		Abort(flow, end.code)
	}
	_ = flow.Close()
	_ = upstream.Close()
	return RelayResult{End: end.text, Refused: refused.Load()}
}

// udpEnd is why a UDP flow ended; abort when it failed rather than ended, with
// code.
type udpEnd struct {
	text  string
	abort bool
	code  quic.ApplicationErrorCode
}

// FlowEnd says, for a log line, how a flow's side ended with err: closed, or failed.
func FlowEnd(side string, err error) string { return flowEnd(side, err).text }

func flowEnd(side string, err error) udpEnd {
	if IsNormalEnd(err) {
		return udpEnd{text: "closed by " + side}
	}
	// A protocol error of the flow's peer (a malformed REPORT) is answered with
	// internal (0x1); any other failure is passed on as peer_reset.
	code := QUICPeerReset
	if errors.As(err, new(*ProtocolError)) {
		code = QUICInternal
	}
	return udpEnd{side + ": " + err.Error(), true, code}
}
