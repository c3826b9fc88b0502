package clients

import (
	"encoding/binary"
	"net"
	"time"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/mux"
	"github.com/tp-proxy/tp/proxy/wire"
)

// End-to-end carriers (docs/PROTOCOL.md, section 11.4.1, ALPN tp-e2e-mux/1).
//
// A dialer that reaches the same protected name again keeps one ordinary
// protected session open to it (one TP dial, which tpd authorises and re-checks
// as any other), runs the end-to-end TLS 1.3 session inside it once, and then
// carries every further session to that name as a stream of a small
// multiplexer inside that TLS session: no TP dial, no trip through tpd's dial
// path, no handshake, no key exchange. The agent still checks every stream (the
// dialer's identity from the carrier's handshake, its allow list as it is now,
// its local service) and answers each with a hello of its own, so refusals stay
// readable.
//
// The multiplexer is proxy/mux (PROTOCOL section 9.9), shared with tpd's
// tp-mux/1; this file sets its bounds and words for a carrier.

// E2EMuxALPN is the ALPN of an end-to-end TLS session that carries many
// sessions as multiplexed streams.
const E2EMuxALPN = "tp-e2e-mux/1"

// Frame types of the multiplexer (proxy/mux), by their old names.
const (
	muxOpen   = mux.FrameOpen
	muxData   = mux.FrameData
	muxFin    = mux.FrameFin
	muxAbort  = mux.FrameAbort
	muxWindow = mux.FrameWindow
	muxPing   = mux.FramePing
	muxPong   = mux.FramePong
	muxGoAway = mux.FrameGoAway

	muxAbortRefused = mux.AbortRefused

	muxHeaderLen = mux.HeaderLen
	// muxMaxPayload keeps a frame within one TLS record of the inner session
	// (what a receiver accepts).
	muxMaxPayload = 16384 - muxHeaderLen
	// muxSendPayload is what TP puts in one frame: with the inner record's
	// header, tag and type (22 bytes) the record is then 16384 bytes, exactly
	// one full record of the outer TLS connection to the relay, so records of
	// both layers line up instead of each inner record taking two outer ones.
	muxSendPayload = 16384 - 22 - muxHeaderLen
	// muxStreamWindow is how many unread bytes each end accepts per stream and
	// direction before the reader grants more.
	muxStreamWindow = 256 << 10
	// muxMaxStreamWindow is how far a stream's window may grow: a reader that
	// takes a quarter of its window within muxGrowWithin of the last grant
	// doubles it, as quic-go's auto-tuning does, while the carrier's budget
	// (muxGrowBudget, summed over its streams) lasts. A relay path through tpd
	// has a round trip of a millisecond or more on a busy machine; 256 KiB in
	// flight would cap a stream near 200 MB/s.
	muxMaxStreamWindow = 4 << 20
	muxGrowBudget      = 16 << 20
	// MuxMaxStreams bounds the open streams of one carrier (both ends): a dialer
	// with this many open opens a further carrier; an agent closes a carrier whose
	// dialer goes beyond it. With muxStreamWindow and muxGrowBudget it bounds
	// what a carrier can make its peer buffer to 80 MiB.
	MuxMaxStreams = 256
	// muxMaxCarriers bounds the carriers a dialer holds to one name.
	muxMaxCarriers = 8
)

// Carrier timers; variables so that tests can shorten them.
var (
	// muxIdle: a dialer closes a carrier that had no open stream for this long.
	muxIdle = 60 * time.Second
	// muxTick is how often a carrier checks its timers; a dialer pings the
	// agent at each tick.
	muxTick = 15 * time.Second
	// muxDead: a carrier that received no frame for this long (the dialer pings
	// every muxTick, and the agent answers) is cut.
	muxDead = 60 * time.Second
	// muxLife: a dialer opens no stream on a carrier older than this (a new one
	// picks up a renewed certificate), and closes it once its streams ended.
	muxLife = time.Hour
	// muxAgentIdle: an agent closes a carrier without streams for this long (a
	// dialer closes its own after muxIdle).
	muxAgentIdle = 2 * time.Minute
	// muxGrowWithin: see muxMaxStreamWindow.
	muxGrowWithin = 5 * time.Millisecond
	// muxLinger: a closed stream whose other end has not ended its direction
	// is cut after this long (mux.Options.Linger).
	muxLinger = 10 * time.Second
)

// errMuxFull is a carrier that takes no further stream (full, closing or told
// to go away): the dialer uses another one.
var errMuxFull = mux.ErrFull

// muxStream is one session on a carrier.
type muxStream = mux.Stream

// muxConn is one end of a carrier: the multiplexer over an end-to-end TLS
// session.
type muxConn struct {
	*mux.Conn
	session string // dialer: the server's id of the carrier's session (for why)
}

// newMuxConn runs a carrier over conn. It ends when expires passes, by clock
// (the TLS configuration's Time, which judged the certificates that set
// expires; nil: time.Now).
func newMuxConn(conn net.Conn, client bool, name string, expires time.Time, clock func() time.Time, accept func(*muxStream)) *muxConn {
	peer := "dialer"
	if client {
		peer = "agent"
	}
	o := mux.Options{Client: client, Label: "end-to-end carrier", Noun: "carrier", StreamLabel: "end-to-end stream",
		Peer: peer, Name: name, Expires: expires, Now: clock, ExpiredReason: "a certificate of the end-to-end session expired",
		MaxStreams: MuxMaxStreams, MaxPayload: muxMaxPayload, SendPayload: muxSendPayload,
		StreamWindow: muxStreamWindow, MaxStreamWindow: muxMaxStreamWindow, GrowBudget: muxGrowBudget, GrowWithin: muxGrowWithin,
		Tick: muxTick, Dead: muxDead, Idle: muxIdle, ServerIdle: muxAgentIdle, Life: muxLife, Linger: muxLinger,
		WriteFrames: writeCarrierFrames}
	if client {
		o.PeerAbort = func(reason byte, err error) error {
			if reason == mux.AbortRefused {
				return err
			}
			// The carrier lives on, so the server has no record of this cut: the
			// agent's ABORT is the answer to "why" (section 11.4.1).
			return &muxAbortError{err: err, end: wire.SessionEnd{Code: wire.EndPeerReset, By: "agent",
				Reason: "the exposed service's side of the session to " + name + " was cut off (the service reset the connection, or the agent gave up on it)"}}
		}
	}
	return &muxConn{Conn: mux.New(conn, o, accept)}
}

// appendMuxFrame appends a frame of the multiplexer to dst.
func appendMuxFrame(dst []byte, typ byte, id uint32, payload []byte) []byte {
	return mux.AppendFrame(dst, typ, id, payload)
}

// writeCarrierFrames writes whole frames (b) to the carrier: over an inner
// TLS session, one record per frame and all of them in one write of the
// relay's stream (transport.BatchConn).
func writeCarrierFrames(conn net.Conn, b []byte) error {
	bt, ok := conn.(*transport.BatchedTLS)
	if !ok || len(b) <= muxSendPayload+muxHeaderLen {
		_, err := conn.Write(b)
		return err
	}
	bt.Batch.Begin()
	var err error
	for len(b) > 0 && err == nil {
		n := muxHeaderLen + int(binary.BigEndian.Uint16(b[5:7]))
		_, err = bt.Conn.Write(b[:n])
		b = b[n:]
	}
	if ferr := bt.Batch.End(); err == nil {
		err = ferr
	}
	return err
}

// muxAbortError is a stream cut by the agent's ABORT: it says who cut it
// without asking the server, which saw nothing of the stream.
type muxAbortError struct {
	err error
	end wire.SessionEnd
}

func (e *muxAbortError) Error() string { return e.err.Error() }
func (e *muxAbortError) Unwrap() error { return e.err }
