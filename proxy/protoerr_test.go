package proxy_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// A client that breaks the protocol on its UDP flow gets the flow aborted with
// internal (0x1), the code of a protocol error (docs/PROTOCOL.md, section 9.5),
// not peer_reset, which would blame the destination. Bad input: a REPORT capsule
// whose too_large is a string.
func TestUDPMalformedReportAborts(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	echo := testnet.EchoUDP(t)
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

// An agent that sends anything but {"end":"unregister"} on its control stream
// is told why before the server ends its control session: an end frame with
// bad_request (docs/PROTOCOL.md, section 11.7), over TLS and QUIC; its names stay
// held for the grace period, as when an agent goes away. Bad input: a ping from
// the agent, a frame with an unknown field, a frame of version 2.
func TestControlStreamViolationEnds(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.Reverse = proxy.ReverseOptions{Zone: "rev.test", Grace: time.Hour}
	}, proxy.QUICOptions{})
	for _, bad := range []string{`{"v":1,"ping":true}`, `{"v":1,"end":"unregister","x":1}`, `{"v":2,"end":"unregister"}`} {
		for _, tr := range bothTransports {
			t.Run(tr+"/"+bad, func(t *testing.T) {
				ctl := q.streamAs(t, &q.cert, tr, nil)
				if sh := mustHello(t, ctl, wire.ClientHello{V: wire.Version, Op: wire.OpListen, Net: "tcp", Names: []string{"svc"}}); !sh.OK {
					t.Fatalf("listen: %+v", sh)
				}
				frame := binary.BigEndian.AppendUint16(nil, uint16(len(bad)))
				if _, err := ctl.Write(append(frame, bad...)); err != nil {
					t.Fatal(err)
				}
				for {
					h, err := wire.ReadSessionHeader(ctl)
					if err != nil {
						t.Fatalf("the control stream ended without an end frame: %v", err)
					}
					if h.Ping {
						continue
					}
					if h.End != wire.CodeBadRequest || !strings.Contains(h.Reason, "control stream") {
						t.Fatalf("got %+v; want end bad_request saying what the agent sent", h)
					}
					break
				}
				if o, _ := q.srv.ReverseOwner("svc.rev.test"); o != "alice@laptop" {
					t.Fatalf("svc is held by %q; want alice@laptop through the grace period", o)
				}
			})
		}
	}
}

// An agent that breaks the protocol on a public UDP session gets the session
// aborted with internal (0x1), not closed. Bad input: the agent answers a public
// client's datagram with a REPORT capsule whose too_large is a string.
func TestPublicUDPMalformedReportAborts(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.Reverse = proxy.ReverseOptions{Zone: "rev.test", PublicHost: "127.0.0.1", PublicPorts: func(string, int) bool { return true }}
	}, proxy.QUICOptions{})
	port := testnet.FreePort(t, "udp") // a free port for the server to open
	ctl := q.streamAs(t, &q.cert, clients.TransportQUIC, nil)
	if sh := mustHello(t, ctl, wire.ClientHello{V: wire.Version, Op: wire.OpListen, Net: "tcp", Names: []string{"game"}, UDP: []string{"game"},
		Public: []wire.PublicSpec{{Name: "game", Net: "udp", Port: port}}}); !sh.OK {
		t.Fatalf("listen: %+v", sh)
	}
	public, err := net.Dial("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	defer public.Close()
	if _, err := public.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	qc := ctl.(*wire.QUICStream).Conn()
	str, err := qc.AcceptStream(ctx)
	if err != nil {
		t.Fatalf("no session for the public client's datagram: %v", err)
	}
	st := wire.NewQUICStream(qc, str)
	_ = st.SetDeadline(time.Now().Add(20 * time.Second))
	if h, err := wire.ReadSessionHeader(st); err != nil || h.Net != "udp" {
		t.Fatalf("session header %+v, %v", h, err)
	}
	if err := wire.WriteCapsule(st, wire.CapsuleReport, []byte(`{"v":1,"too_large":"many"}`)); err != nil {
		t.Fatal(err)
	}
	_, err = io.Copy(io.Discard, st)
	if code, reset := wire.StreamResetCode(err); !reset || code != wire.QUICInternal {
		t.Fatalf("after a malformed REPORT the agent saw %v; want RESET_STREAM internal (0x1)", err)
	}
}
