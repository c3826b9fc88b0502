package proxy_test

import (
	"context"
	"encoding/binary"
	"net"
	"testing"
	"time"

	"github.com/pion/stun/v4"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
)

// tpd answers STUN Binding requests on its QUIC port with the address they
// came from, and QUIC on the same port goes on. Bad input gets no answer and
// is counted: a Binding indication, a Binding success response, a header cut
// short, a datagram longer than any request, and a request whose FINGERPRINT
// is wrong.
func TestSTUNOnTheQUICPort(t *testing.T) {
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	server := mustAddrPort(t, q.udpAddr)
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := clients.ReflexiveAddr(ctx, pc, server)
	if err != nil {
		t.Fatal(err)
	}
	if want := pc.LocalAddr().(*net.UDPAddr).AddrPort(); got != want {
		t.Fatalf("STUN answered %s, want the request's source %s", got, want)
	}
	if st := q.srv.Stats().STUN; st.Answered < 1 { // 2 if a slow machine made the client ask again
		t.Fatalf("STUN stats after one request: %+v, want it answered", st)
	}

	// QUIC on the same socket is unaffected.
	_, err = q.quicConn(t, nil)
	if err != nil {
		t.Fatalf("QUIC beside STUN: %v", err)
	}

	bad := func(setters ...stun.Setter) []byte {
		m, err := stun.Build(setters...)
		if err != nil {
			t.Fatal(err)
		}
		return m.Raw
	}
	req := bad(stun.TransactionID, stun.BindingRequest, stun.Fingerprint)
	wrongFP := append([]byte(nil), req...)
	binary.BigEndian.PutUint32(wrongFP[len(wrongFP)-4:], binary.BigEndian.Uint32(wrongFP[len(wrongFP)-4:])^1)
	long := append(bad(stun.TransactionID, stun.BindingRequest), make([]byte, 600)...)
	binary.BigEndian.PutUint16(long[2:], 600) // a well-formed length, and too long a request
	// From a socket of their own: a late answer to a repeated request above
	// must not look like an answer to a bad one.
	pc2, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc2.Close()
	for name, b := range map[string][]byte{
		"a Binding indication":       bad(stun.TransactionID, stun.NewType(stun.MethodBinding, stun.ClassIndication)),
		"a Binding success response": bad(stun.TransactionID, stun.BindingSuccess),
		"a header cut short":         req[:12],
		"a datagram of 620 bytes":    long,
		"a wrong FINGERPRINT":        wrongFP,
	} {
		if _, err := pc2.WriteTo(b, net.UDPAddrFromAddrPort(server)); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for q.srv.Stats().STUN.Malformed < 5 {
		if time.Now().After(deadline) {
			t.Fatalf("STUN stats: %+v, want 5 malformed", q.srv.Stats().STUN)
		}
		time.Sleep(10 * time.Millisecond) // polling the counter, bounded by the deadline
	}
	_ = pc2.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, _, err := pc2.ReadFrom(make([]byte, 1500)); err == nil {
		t.Fatalf("a bad STUN message got an answer of %d bytes", n)
	}
	if st := q.srv.Stats().STUN; st.Malformed != 5 {
		t.Fatalf("STUN stats: %+v, want 5 malformed", st)
	}
}

// On a wildcard socket of a host with several addresses, the STUN answer
// leaves from the address the request reached, as QUIC's packets do: a NAT
// that filters by address lets only that through. In a network namespace of
// the test's own with 10.77.0.1 and 10.77.0.2 on its loopback,
// a request from 10.77.0.2 to 10.77.0.1 must be answered from 10.77.0.1 (the
// kernel alone would pick 10.77.0.2, the destination's own address).
func TestSTUNAnswersFromTheAddressReached(t *testing.T) {
	if !testnet.InNetns(t, "10.77.0.1/32", "10.77.0.2/32") {
		return
	}
	e := newEnv(t, nil)
	udp, err := net.ListenUDP("udp4", &net.UDPAddr{}) // 0.0.0.0, any port
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.srv.ServeQUIC(ctx, udp, proxy.QUICOptions{}) }()
	defer func() { cancel(); <-done }()
	port := udp.LocalAddr().(*net.UDPAddr).Port

	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP("10.77.0.2")})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	req, err := stun.Build(stun.TransactionID, stun.BindingRequest)
	if err != nil {
		t.Fatal(err)
	}
	to := &net.UDPAddr{IP: net.ParseIP("10.77.0.1"), Port: port}
	buf := make([]byte, 1500)
	for try := 0; ; try++ {
		if _, err := pc.WriteTo(req.Raw, to); err != nil {
			t.Fatal(err)
		}
		_ = pc.SetReadDeadline(time.Now().Add(time.Second))
		n, from, err := pc.ReadFromUDP(buf)
		if err != nil {
			if try < 5 { // the server may not read yet: ServeQUIC starts in the background
				continue
			}
			t.Fatalf("no STUN answer: %v", err)
		}
		m := &stun.Message{Raw: buf[:n]}
		if err := m.Decode(); err != nil || m.TransactionID != req.TransactionID {
			t.Fatalf("an answer that is not ours: %v", err)
		}
		if from.String() != to.String() {
			t.Fatalf("the STUN answer came from %s; the request went to %s", from, to)
		}
		return
	}
}
