package wire_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/quic-go/quicvarint"

	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy/wire"
)

// fakeStream is the request stream a flow is registered for: the test sends
// nothing on it, and http3's own queue of it stays empty.
type fakeStream struct{ id quic.StreamID }

func (s fakeStream) StreamID() quic.StreamID   { return s.id }
func (s fakeStream) SendDatagram([]byte) error { return nil }
func (s fakeStream) ReceiveDatagram(ctx context.Context) ([]byte, error) {
	<-ctx.Done()
	return nil, context.Cause(ctx)
}

// The server's reader of a real QUIC connection on loopback: it reads the
// client's SETTINGS (HTTP Datagrams announced), holds datagrams that come
// before their request's flow and hands them to the flow in order, and
// counts as unknown those for a flow already closed (bad input: a client that
// goes on sending on a finished request); a flow sends below http3 until it
// is closed.
func TestH3ServerConnSettingsAndEarlyDatagrams(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	qc, sc := quicPair(ctx, t, true)
	hc := wire.NewH3ServerConn(sc)
	go hc.ServeUniStreams()
	hc.Datagrams.Start()

	// The client's control stream: type 0, SETTINGS {H3_DATAGRAM: 1}.
	ctrl, err := qc.OpenUniStream()
	if err != nil {
		t.Fatal(err)
	}
	settings := quicvarint.Append(quicvarint.Append(nil, 0x33), 1)
	b := quicvarint.Append(quicvarint.Append(quicvarint.Append(nil, 0x00), 0x04), uint64(len(settings)))
	if _, err := ctrl.Write(append(b, settings...)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-hc.SettingsRead():
	case <-ctx.Done():
		t.Fatal("the client's SETTINGS were not read")
	}
	if !hc.PeerDatagrams() {
		t.Fatal("the client's SETTINGS announce HTTP Datagrams; PeerDatagrams says no")
	}

	// Early: 10 datagrams for request stream 4 (quarter stream ID 1)
	// before its flow exists.
	const early = 10
	for i := range early {
		if err := qc.SendDatagram(append(quicvarint.Append(nil, 1), fmt.Sprintf("early %d", i)...)); err != nil {
			t.Fatal(err)
		}
	}
	// A marker on another request (quarter stream ID 2) whose flow exists:
	// once it arrived, the early ones (sent before it) were read too, as
	// QUIC keeps the order of datagrams on loopback without loss.
	marker := hc.Datagrams.Flow(fakeStream{id: 8}, 4)
	if err := qc.SendDatagram(append(quicvarint.Append(nil, 2), "marker"...)); err != nil {
		t.Fatal(err)
	}
	if p, err := marker.ReceiveDatagram(ctx); err != nil || string(p) != "marker" {
		t.Fatalf("marker: %q, %v", p, err)
	}
	f := hc.Datagrams.Flow(fakeStream{id: 4}, 32)
	for i := range early {
		p, err := f.ReceiveDatagram(ctx)
		if want := fmt.Sprintf("early %d", i); err != nil || !bytes.Equal(p, []byte(want)) {
			t.Fatalf("early datagram %d: %q, %v; want %q", i, p, err, want)
		}
	}

	// Bad input: datagrams for the marker's request after its flow closed
	// are not held for it but dropped and counted.
	marker.Close()
	for range 3 {
		if err := qc.SendDatagram(append(quicvarint.Append(nil, 2), "late"...)); err != nil {
			t.Fatal(err)
		}
	}
	if err := qc.SendDatagram(append(quicvarint.Append(nil, 1), "last"...)); err != nil {
		t.Fatal(err)
	}
	if p, err := f.ReceiveDatagram(ctx); err != nil || string(p) != "last" {
		t.Fatalf("last: %q, %v", p, err)
	}
	if n := hc.Datagrams.Unknown(); n != 3 {
		t.Fatalf("%d datagrams counted for no request; want the 3 sent after their flow closed", n)
	}

	// Sending below http3: the flow's quarter stream ID in the caller's
	// buffer, the datagram as the client reads it; nothing once closed.
	if err := f.SendQUIC(append(f.AppendQuarterStreamID(nil), "down"...)); err != nil {
		t.Fatal(err)
	}
	if p, err := qc.ReceiveDatagram(ctx); err != nil || !bytes.Equal(p, append(quicvarint.Append(nil, 1), "down"...)) {
		t.Fatalf("the client received %q, %v; want quarter stream ID 1 and \"down\"", p, err)
	}
	f.Close()
	if err := f.SendQUIC(append(f.AppendQuarterStreamID(nil), "late"...)); err == nil {
		t.Fatal("a closed flow sent a datagram")
	}
}

// Bad input: SETTINGS that are not the control stream's first frame, or that
// are cut short or malformed, are errors; an absent H3_DATAGRAM means no
// HTTP Datagrams.
func TestReadH3Settings(t *testing.T) {
	t.Parallel()
	frame := func(typ uint64, payload []byte) []byte {
		return append(quicvarint.Append(quicvarint.Append(nil, typ), uint64(len(payload))), payload...)
	}
	pair := func(id, v uint64) []byte { return quicvarint.Append(quicvarint.Append(nil, id), v) }
	for _, tc := range []struct {
		name    string
		in      []byte
		dgram   bool
		wantErr bool
	}{
		{"datagrams", frame(0x04, pair(0x33, 1)), true, false},
		{"datagrams off", frame(0x04, pair(0x33, 0)), false, false},
		{"other settings only", frame(0x04, append(pair(0x06, 1<<16), pair(0x08, 1)...)), false, false},
		{"empty", frame(0x04, nil), false, false},
		{"not SETTINGS first", frame(0x07, pair(0x33, 1)), false, true},
		{"cut short", frame(0x04, pair(0x33, 1))[:3], false, true},
		{"odd payload", frame(0x04, quicvarint.Append(nil, 0x33)), false, true},
		{"too long", quicvarint.Append(quicvarint.Append(nil, 0x04), 1<<20), false, true},
		{"nothing", nil, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dgram, err := wire.ReadH3Settings(bytes.NewReader(tc.in))
			if (err != nil) != tc.wantErr || dgram != tc.dgram {
				t.Fatalf("ReadH3Settings = %v, %v; want %v, error %v", dgram, err, tc.dgram, tc.wantErr)
			}
		})
	}
}

func FuzzReadH3Settings(f *testing.F) {
	f.Add([]byte{0x04, 0x02, 0x33, 0x01})
	f.Add([]byte{0x04, 0x00})
	f.Add([]byte{0x07, 0x01, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = wire.ReadH3Settings(bytes.NewReader(b))
	})
}

// DataWriter frames each write as one HTTP/3 DATA frame on a real QUIC
// stream on loopback, and Track/RequestStream find the stream while it is
// tracked (and not after, nor on a nil connection): the peer reads the frames
// back whole, including one larger than a packet and an empty one.
func TestDataWriter(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	qc, sc := quicPair(ctx, t, false)
	cs, err := qc.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cs.Write([]byte{0}); err != nil { // the server accepts a stream once bytes arrive
		t.Fatal(err)
	}
	ss, err := sc.AcceptStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	hc := wire.NewH3ServerConn(sc)
	forget := hc.Track(ss)
	if hc.RequestStream(ss.StreamID()) != ss {
		t.Fatal("RequestStream does not find the tracked stream")
	}
	forget()
	if hc.RequestStream(ss.StreamID()) != nil || (*wire.H3ServerConn)(nil).RequestStream(0) != nil {
		t.Fatal("RequestStream finds a stream no longer tracked, or on a nil connection")
	}
	frames := [][]byte{bytes.Repeat([]byte{1}, 70000), {}, []byte("capsules")}
	w := &wire.DataWriter{Stream: ss}
	for _, f := range frames {
		if n, err := w.Write(f); err != nil || n != len(f) {
			t.Fatalf("Write(%d bytes) = %d, %v", len(f), n, err)
		}
	}
	_ = ss.Close()
	r := quicvarint.NewReader(cs)
	for i, want := range frames {
		typ, err := quicvarint.Read(r)
		if err != nil || typ != 0 {
			t.Fatalf("frame %d: type %#x, %v; want DATA (0)", i, typ, err)
		}
		n, err := quicvarint.Read(r)
		if err != nil || n != uint64(len(want)) {
			t.Fatalf("frame %d: length %d, %v; want %d", i, n, err, len(want))
		}
		got := make([]byte, n)
		if _, err := io.ReadFull(cs, got); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("frame %d: payload differs (%v)", i, err)
		}
	}
	if _, err := cs.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after the frames: %v, want io.EOF", err)
	}
}

// quicPair connects a client and a server QUIC connection with ALPN h3 on
// loopback (datagrams on when dgrams) and closes them at the test's end.
func quicPair(ctx context.Context, t *testing.T, dgrams bool) (client, server *quic.Conn) {
	t.Helper()
	ca := testpki.New(t)
	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: uc}
	t.Cleanup(func() { _ = tr.Close() })
	ln, err := tr.Listen(&tls.Config{Certificates: []tls.Certificate{ca.ServerCert(t, "proxy.localhost")}, NextProtos: []string{http3.NextProtoH3}},
		&quic.Config{EnableDatagrams: dgrams})
	if err != nil {
		t.Fatal(err)
	}
	client, err = quic.DialAddr(ctx, uc.LocalAddr().String(),
		&tls.Config{RootCAs: ca.Pool, ServerName: "proxy.localhost", NextProtos: []string{http3.NextProtoH3}},
		&quic.Config{EnableDatagrams: dgrams})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.CloseWithError(0, "") })
	if server, err = ln.Accept(ctx); err != nil {
		t.Fatal(err)
	}
	return client, server
}
