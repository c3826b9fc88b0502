package transport

// A nudge after a silence (docs/PROTOCOL.md section 9.7). A client whose
// address changes (a NAT rebinding, a new carrier link) is followed by the
// server only once a packet from the new address arrives. A client that only
// receives (a download) has sent its last acknowledgement before the change
// and has nothing more to send: the server's packets go to the old address
// and are lost, and the connection stalls until the client's keepalive (15 s
// over UDP). So after packets came in and then none for NudgeAfter, the
// client sends one ack-eliciting packet, an empty DATAGRAM frame, which the
// server drops unread: it tells the server the current address, and its
// acknowledgement restarts the server's loss recovery at once. One nudge per
// silence: an idle connection costs one packet (and its acknowledgement)
// after its last exchange, and nothing after that.

import (
	"time"

	"github.com/quic-go/quic-go"
)

// NudgeAfter is how long a connection that was receiving waits in silence
// before it nudges the server.
const NudgeAfter = time.Second

// nudges reports whether a connection with keepalive period keepAlive (0:
// none) needs nudges: the keepalive alone would leave a longer stall.
func nudges(keepAlive time.Duration) bool {
	return keepAlive == 0 || keepAlive > NudgeAfter
}

// nudgeOnSilence runs until conn ends: after packets came in and then none
// for NudgeAfter, it sends one empty DATAGRAM frame. What answers a nudge
// ends no silence (else an idle connection would nudge for ever, once per
// NudgeAfter): the server's acknowledgements of the nudge and of the
// client's probes after it are at most one per packet the client sent, so
// only more packets in than out since the nudge (a server sending on its
// own, as one resuming a download does) count as coming in. Every client
// connection enables DATAGRAM frames; a server without them makes SendDatagram fail
// without sending anything, and the nudges stop. (It does not ask
// ConnectionState: quic-go reads the path there without a lock, which races
// with a migration.)
func nudgeOnSilence(conn *quic.Conn) {
	ctx := conn.Context()
	tick := time.NewTicker(NudgeAfter / 4)
	defer tick.Stop()
	last, at, armed := conn.ConnectionStats().PacketsReceived, time.Now(), false
	var nudged quic.ConnectionStats // at the last nudge, while no packets came in since
	nudging := false
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			st := conn.ConnectionStats()
			switch got := st.PacketsReceived; {
			case got != last && (!nudging || got-nudged.PacketsReceived > st.PacketsSent-nudged.PacketsSent):
				last, at, armed, nudging = got, now, true, false
			case armed && now.Sub(at) >= NudgeAfter:
				armed, nudging, nudged = false, true, st
				if err := conn.SendDatagram(nil); err != nil {
					return // conn is gone, or its server takes no DATAGRAM frames
				}
			}
		}
	}
}

// StartNudges nudges conn's server after silences, until conn ends, when
// its keepalive period keepAlive (0: none) is too slow to.
func StartNudges(conn *quic.Conn, keepAlive time.Duration) {
	if nudges(keepAlive) {
		go nudgeOnSilence(conn)
	}
}
