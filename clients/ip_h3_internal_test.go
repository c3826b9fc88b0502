package clients

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/quic-go/quicvarint"

	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy/wire"
)

// TestIPH3DatagramsBelowHTTP3 runs the client side of `tp ip` over HTTP/3
// (the server's unidirectional streams read by serverStreams, the request on
// a raw http3 client connection, datagrams read by wire.H3Datagrams) against
// quic-go's real http3 server on loopback. It proves that the SETTINGS are
// read and checked, that the request's datagrams reach the flow in full, that
// a datagram naming another stream is dropped and counted (bad input: a
// quarter stream ID of no request), and that a closed flow ends its reader.
func TestIPH3DatagramsBelowHTTP3(t *testing.T) {
	t.Parallel()
	ca := testpki.New(t)
	const n = 100 // fewer than quic-go's queue (128): nothing may be lost
	conns := make(chan *quic.Conn, 1)
	srv := &http3.Server{
		EnableDatagrams: true,
		TLSConfig:       &tls.Config{Certificates: []tls.Certificate{ca.ServerCert(t, "proxy.localhost")}, NextProtos: []string{http3.NextProtoH3}},
		ConnContext: func(ctx context.Context, c *quic.Conn) context.Context {
			conns <- c
			return ctx
		},
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
			str, err := w.(http3.HTTPStreamer).HTTPStream()
			if err != nil {
				t.Error(err)
				return
			}
			for i := range n {
				if err := str.SendDatagram([]byte(fmt.Sprintf("packet %d", i))); err != nil {
					t.Error(err)
					return
				}
			}
			<-r.Context().Done()
		}),
	}
	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(uc) }()
	t.Cleanup(func() { _ = srv.Close() })

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	qc, err := quic.DialAddr(ctx, uc.LocalAddr().String(),
		&tls.Config{RootCAs: ca.Pool, ServerName: "proxy.localhost", NextProtos: []string{http3.NextProtoH3}},
		&quic.Config{EnableDatagrams: true})
	if err != nil {
		t.Fatal(err)
	}
	defer qc.CloseWithError(0, "")
	settings := serverStreams(qc)
	cc := (&http3.Transport{EnableDatagrams: true}).NewRawClientConn(qc)
	str, err := cc.OpenRequestStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := str.SendRequestHeader(&http.Request{Method: http.MethodConnect, Proto: wire.ConnectIPProtocol,
		URL: &url.URL{Scheme: "https", Host: "proxy.localhost", Path: ipPath}, Host: "proxy.localhost",
		Header: http.Header{"Capsule-Protocol": {"?1"}}}); err != nil {
		t.Fatal(err)
	}
	m := wire.NewH3Datagrams(qc)
	flow := m.Flow(str, wire.IPDatagramQueue)
	if resp, err := str.ReadResponse(); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("response %v, %v", resp, err)
	}
	select {
	case err := <-settings:
		if err != nil {
			t.Fatalf("the server's SETTINGS: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("no SETTINGS from the server")
	}
	got := map[string]bool{}
	for len(got) < n {
		p, err := flow.ReceiveDatagram(ctx)
		if err != nil {
			t.Fatalf("after %d of %d datagrams: %v", len(got), n, err)
		}
		got[string(p)] = true
	}
	if d := flow.Dropped(); d != 0 {
		t.Errorf("the flow dropped %d datagrams", d)
	}

	// A datagram for a stream no request opened: dropped and counted.
	sc := <-conns
	if err := sc.SendDatagram(quicvarint.Append(nil, 1000)); err != nil {
		t.Fatal(err)
	}
	for m.Unknown() != 1 {
		select {
		case <-ctx.Done():
			t.Fatalf("the datagram for an unknown stream was not counted (%d)", m.Unknown())
		case <-time.After(5 * time.Millisecond):
		}
	}

	flow.Close()
	if _, err := flow.ReceiveDatagram(ctx); err == nil || ctx.Err() != nil {
		t.Fatalf("ReceiveDatagram on a closed flow: %v", err)
	}
}

// TestIPReadSettings feeds the control stream's first frame: HTTP Datagrams
// must be announced; a missing setting, another frame first, an over-long or
// malformed SETTINGS frame are each refused with a reason.
func TestIPReadSettings(t *testing.T) {
	t.Parallel()
	settings := func(pairs ...uint64) []byte {
		var body []byte
		for _, v := range pairs {
			body = quicvarint.Append(body, v)
		}
		b := quicvarint.Append(nil, h3FrameSettings)
		b = quicvarint.Append(b, uint64(len(body)))
		return append(b, body...)
	}
	for _, c := range []struct {
		name string
		in   []byte
		want string // "" for no error
	}{
		{"datagrams announced", settings(0x06, 16384, h3SettingDgram, 1, 0x08, 1), ""},
		{"no H3_DATAGRAM", settings(0x06, 16384), "do not announce HTTP Datagrams"},
		{"H3_DATAGRAM 0", settings(h3SettingDgram, 0), "do not announce HTTP Datagrams"},
		{"GOAWAY first", append(quicvarint.Append(nil, 0x07), 1, 0), "not SETTINGS"},
		{"over-long", append(quicvarint.Append(nil, h3FrameSettings), quicvarint.Append(nil, 1<<20)...), "more than"},
		{"value missing", append(quicvarint.Append(nil, h3FrameSettings), 1, 0x33), "malformed"},
		{"truncated", append(quicvarint.Append(nil, h3FrameSettings), 4, 0x33), "reading the server's HTTP/3 SETTINGS"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := readSettings(bytes.NewReader(c.in))
			switch {
			case c.want == "" && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case c.want != "" && (err == nil || !bytes.Contains([]byte(err.Error()), []byte(c.want))):
				t.Fatalf("error %v, want one saying %q", err, c.want)
			}
			if c.want == "do not announce HTTP Datagrams" && !errors.Is(err, errNoH3Datagrams) {
				t.Fatalf("error %v is not errNoH3Datagrams", err)
			}
		})
	}
}
