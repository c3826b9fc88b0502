package proxy_test

import (
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// A client that breaks the protocol on its UDP flow gets the flow aborted with
// internal (0x1), the code of a protocol error (docs/PROTOCOL.md, section 9.5),
// not peer_reset, which would blame the destination. Bad input: a REPORT capsule
// whose too_large is a string.
func TestUDPMalformedReportAborts(t *testing.T) {
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	echo := startUDPEcho(t)
	conn, err := q.quicConn(t, &q.cert)
	if err != nil {
		t.Fatal(err)
	}
	str, err := conn.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	qs := wire.NewQUICStream(conn, str)
	_ = qs.SetDeadline(time.Now().Add(20 * time.Second))
	host, port, _ := net.SplitHostPort(echo)
	var p int
	fmt.Sscan(port, &p)
	if err := wire.WriteClientHello(qs, wire.ClientHello{V: 1, Op: "dial", Net: "udp", Host: host, Port: p}); err != nil {
		t.Fatal(err)
	}
	if sh, err := wire.ReadServerHello(qs); err != nil || !sh.OK {
		t.Fatalf("server hello %+v, %v", sh, err)
	}
	if err := wire.WriteCapsule(qs, wire.CapsuleReport, []byte(`{"v":1,"too_large":"many"}`)); err != nil {
		t.Fatal(err)
	}
	_, err = io.Copy(io.Discard, qs)
	if code, reset := wire.StreamResetCode(err); !reset || code != wire.QUICInternal {
		t.Fatalf("after a malformed REPORT the client saw %v; want RESET_STREAM internal (0x1)", err)
	}
}
