package wire

import (
	"bufio"
	"bytes"
	"net"
	"testing"
)

type udpPipe struct{ net.Conn }

func (udpPipe) CloseWrite() error { return nil }

// TestUDPFlowQueueBound: datagrams beyond a flow's queue are dropped and counted,
// never buffered without bound, and a report of the drops goes to the peer.
func TestUDPFlowQueueBound(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	f, err := NewUDPFlow(udpPipe{a}, 4, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.Start()
	for range 1000 {
		f.deliver(make([]byte, 1200))
	}
	if st := f.Stats(); st.QueueFull != 996 || len(f.in) != 4 {
		t.Fatalf("queue %d, dropped %d; want 4 queued, 996 dropped", len(f.in), st.QueueFull)
	}
	typ, _, err := ReadCapsule(bufio.NewReader(b))
	if err != nil || typ != CapsuleReport {
		t.Fatalf("capsule %d, %v; want a report", typ, err)
	}
}

// TestCapsuleRoundTrip: capsules of every boundary size survive framing, and
// unknown capsule types are skipped.
func TestCapsuleRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	sizes := []int{0, 1, 1199, 65535}
	for _, n := range sizes {
		if err := WriteCapsule(&buf, CapsuleDatagram, bytes.Repeat([]byte{7}, n)); err != nil {
			t.Fatal(err)
		}
	}
	if err := WriteCapsule(&buf, CapsuleDatagram, make([]byte, 65536)); err == nil {
		t.Fatal("a 65536-byte capsule was written")
	}
	r := bufio.NewReader(&buf)
	for _, want := range sizes {
		typ, p, err := ReadCapsule(r)
		if err != nil || typ != CapsuleDatagram || len(p) != want {
			t.Fatalf("capsule: type %d, %d bytes, %v; want %d bytes", typ, len(p), err, want)
		}
	}
}

// FuzzUDPStream: whatever arrives on a flow's stream, the flow neither panics nor
// delivers more than was framed.
func FuzzUDPStream(f *testing.F) {
	f.Add([]byte{0, 0, 3, 'a', 'b', 'c', 1, 0, 2, '{', '}', 9, 0, 0})
	f.Add([]byte{0, 0xff, 0xff, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		a, b := net.Pipe()
		fl, err := NewUDPFlow(udpPipe{a}, 8, nil)
		if err != nil {
			t.Fatal(err)
		}
		fl.Start()
		go func() { _, _ = b.Write(data); _ = b.Close() }()
		buf := make([]byte, MaxDatagramSize)
		total := 0
		for {
			n, err := fl.Read(buf)
			if err != nil {
				break
			}
			total += n
		}
		if total > len(data) {
			t.Fatalf("read %d bytes from %d on the wire", total, len(data))
		}
		fl.Close()
	})
}
