package wire

import (
	"bytes"
	"testing"

	"github.com/quic-go/quic-go/quicvarint"
)

// fuzzFlowIDs are the flow ids registered in FuzzDatagramFlowID: the edges of
// every varint length.
var fuzzFlowIDs = []uint64{0, 1, 63, 64, 16383, 16384, 1<<30 - 1, 1 << 30, quicvarint.Max}

// varint decodes a QUIC variable-length integer (RFC 9000, 16) independently of
// quic-go: the two top bits of the first byte give the length.
func varint(b []byte) (v uint64, n int, ok bool) {
	if len(b) == 0 {
		return 0, 0, false
	}
	n = 1 << (b[0] >> 6)
	if len(b) < n {
		return 0, 0, false
	}
	v = uint64(b[0] & 0x3f)
	for _, c := range b[1:n] {
		v = v<<8 | uint64(c)
	}
	return v, n, true
}

// FuzzDatagramFlowID: any DATAGRAM frame payload a peer sends. It reaches exactly
// the flow its id names, with the id's bytes removed and nothing else, or it is
// counted as unknown, or, empty (a client's nudge), it is dropped uncounted; a datagram a flow writes (its prefix, then the payload)
// comes back to that flow unchanged.
func FuzzDatagramFlowID(f *testing.F) {
	for _, id := range fuzzFlowIDs {
		f.Add(quicvarint.Append(nil, id), uint64(id), []byte("payload"))
	}
	f.Add([]byte{0x40}, uint64(7), []byte{})               // a 2-byte id cut short
	f.Add([]byte{0x40, 0x05, 'x'}, uint64(5), []byte("x")) // id 5 in a longer encoding
	f.Add([]byte{}, uint64(0), []byte{})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, uint64(1<<62), []byte{1})
	f.Fuzz(func(t *testing.T, raw []byte, id uint64, payload []byte) {
		m := &datagramMux{flows: make(map[uint64]*UDPFlow)}
		flows := make(map[uint64]*UDPFlow)
		for _, fid := range fuzzFlowIDs {
			fl := newUDPFlow(nil, 2, nil)
			if err := m.add(fid, fl); err != nil {
				t.Fatal(err)
			}
			flows[fid] = fl
		}
		// received reports which flow got a datagram, and what.
		received := func() (uint64, []byte, int) {
			var got []byte
			var gotID uint64
			n := 0
			for fid, fl := range flows {
				select {
				case d := <-fl.in:
					got, gotID = d, fid
					n++
				default:
				}
			}
			return gotID, got, n
		}

		m.dispatch(raw)
		gotID, got, n := received()
		want, idLen, ok := varint(raw)
		_, registered := flows[want]
		switch {
		case len(raw) == 0:
			if n != 0 || m.unknown.Load() != 0 {
				t.Fatalf("an empty datagram (a nudge): %d flows got one, %d counted unknown; want neither", n, m.unknown.Load())
			}
		case ok && registered:
			if n != 1 || gotID != want || !bytes.Equal(got, raw[idLen:]) || m.unknown.Load() != 0 {
				t.Fatalf("datagram %x for flow %d: flow %d got %x (%d flows got one), %d unknown", raw, want, gotID, got, n, m.unknown.Load())
			}
		default:
			if n != 0 || m.unknown.Load() != 1 {
				t.Fatalf("datagram %x for no flow: %d flows got one, %d counted unknown", raw, n, m.unknown.Load())
			}
		}

		// The way UDPFlow.Write frames a datagram reaches the same flow intact.
		fid := fuzzFlowIDs[id%uint64(len(fuzzFlowIDs))]
		m.dispatch(append(quicvarint.Append(nil, fid), payload...))
		gotID, got, n = received()
		if n != 1 || gotID != fid || !bytes.Equal(got, payload) {
			t.Fatalf("datagram %x written by flow %d came to flow %d as %x (%d flows got one)", payload, fid, gotID, got, n)
		}
	})
}
