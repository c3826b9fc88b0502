package wire

import (
	"context"
	"sync/atomic"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/qlog"
	"github.com/quic-go/quic-go/qlogwriter"
)

// DatagramDropCounter counts the DATAGRAM frames quic-go discards because its
// receive queue (128 frames per connection) is full: quic-go says so only in its
// qlog events, so without this those datagrams would vanish without a count.
// It also counts the packets quic-go discards before it read them because the
// connection's queue of unprocessed packets (256) is full: whatever DATAGRAM
// frames they held are lost too. Set Tracer as quic.Config.Tracer; it records
// nothing else. Flows counted with UDPFlow.CountNoFlow add the DATAGRAM
// frames that reach their connection for no live flow (NoFlow).
type DatagramDropCounter struct{ n, packets, noFlow atomic.Int64 }

// Tracer is a quic.Config.Tracer that feeds the counter.
func (c *DatagramDropCounter) Tracer(context.Context, bool, quic.ConnectionID) qlogwriter.Trace {
	return dropTrace{c}
}

// Dropped is how many received DATAGRAM frames were discarded so far.
func (c *DatagramDropCounter) Dropped() int64 { return c.n.Load() }

// PacketsDropped is how many received packets were discarded unread so far
// (the connection's queue of unprocessed packets full).
func (c *DatagramDropCounter) PacketsDropped() int64 { return c.packets.Load() }

// NoFlow is how many DATAGRAM frames named no live flow on the connections
// of flows counted here: late, after their flow ended, or malformed.
func (c *DatagramDropCounter) NoFlow() int64 { return c.noFlow.Load() }

type dropTrace struct{ c *DatagramDropCounter }

func (t dropTrace) AddProducer() qlogwriter.Recorder { return t }

func (t dropTrace) RecordEvent(ev qlogwriter.Event) {
	switch d := ev.(type) {
	case qlog.DatagramDropped:
		if d.Direction == qlog.DirectionReceiving {
			t.c.n.Add(1)
		}
	case qlog.PacketDropped:
		if d.Trigger == qlog.PacketDropDOSPrevention {
			t.c.packets.Add(1)
		}
	}
}

func (t dropTrace) Close() error { return nil }
