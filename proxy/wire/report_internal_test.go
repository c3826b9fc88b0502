package wire

import (
	"net"
	"testing"
	"time"
)

// A REPORT of another version is ignored and the flow goes on (docs/PROTOCOL.md,
// section 2.3): its counts reach neither Stats nor the report callback, and the
// datagram after it is delivered. Bad input: {"v":2,"too_large":5} and a REPORT
// without "v".
func TestReportOfAnotherVersionIgnored(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	reports := make(chan UDPReport, 4)
	f, err := NewUDPFlow(udpPipe{a}, 4, func(r UDPReport) { reports <- r })
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.Start()
	go func() {
		_ = WriteCapsule(b, CapsuleReport, []byte(`{"v":2,"too_large":5}`))
		_ = WriteCapsule(b, CapsuleReport, []byte(`{"queue_full":7}`))
		_ = WriteCapsule(b, CapsuleDatagram, []byte("after"))
	}()
	_ = f.SetReadDeadline(time.Now().Add(10 * time.Second))
	d, err := f.ReadDatagram()
	if err != nil || string(d) != "after" {
		t.Fatalf("after the reports the flow read %q, %v; want the datagram", d, err)
	}
	if p := f.Stats().Peer; p != (UDPReport{}) {
		t.Fatalf("peer report %+v taken from a report of another version", p)
	}
	select {
	case r := <-reports:
		t.Fatalf("report callback got %+v from a report of another version", r)
	default:
	}
}
