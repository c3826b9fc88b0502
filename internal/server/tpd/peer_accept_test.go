package tpd

import (
	"crypto/tls"
	"io"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/proxy/wire"
)

// rawConn opens a tp/1 connection to addr as c's device, for hellos written
// by hand.
func rawConn(t *testing.T, c *clients.Client, addr string) *tls.Conn {
	t.Helper()
	d, err := c.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	cfg := d.TLSConfig.Clone()
	d.Close()
	cfg.NextProtos, cfg.ServerName = []string{wire.ALPN}, "localhost"
	conn, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(60 * time.Second))
	return conn
}

// rawHello sends h on a new connection of c's device to addr and returns the
// connection and the answer.
func rawHello(t *testing.T, c *clients.Client, addr string, h wire.ClientHello) (*tls.Conn, wire.ServerHello) {
	t.Helper()
	conn := rawConn(t, c, addr)
	if err := wire.WriteClientHello(conn, h); err != nil {
		t.Fatal(err)
	}
	sh, err := wire.ReadServerHello(conn)
	if err != nil {
		t.Fatalf("answer to %s: %v", h.Op, err)
	}
	return conn, sh
}

// rawListen registers name for c's device over TLS, as an agent that picks
// nothing up by itself, and returns the sessions announced to it.
func rawListen(t *testing.T, c *clients.Client, addr, name string) <-chan string {
	t.Helper()
	ctl, sh := rawHello(t, c, addr, wire.ClientHello{V: wire.Version, Op: wire.OpListen, Net: "tcp", Names: []string{name}})
	if !sh.OK {
		t.Fatalf("listen %s: %+v", name, sh)
	}
	_ = ctl.SetDeadline(time.Time{})
	announced := make(chan string, 16)
	go func() {
		for {
			h, err := wire.ReadSessionHeader(ctl)
			if err != nil {
				return
			}
			if h.Session != "" { // not a keepalive
				announced <- h.Session
			}
		}
	}()
	return announced
}

// A pickup is for the device whose agent the session was announced to. Two
// instances on one database; alice's agent (svc) and mallory's (mal) are on
// A, and each of bob's dials of svc through A waits there for alice's pickup.
// Bad input: mallory picks alice's session up on B (B carries it to A, where
// mallory's agent is); a peer open to A that offers the pickup of alice's
// session for bob's device, at svc's current epoch. Both are refused with
// unknown_session, and alice's own pickup on B, after them, is carried to A
// and pairs with bob's dial, bytes both ways.
func TestPGPeerPickupIsTheAgentsDevice(t *testing.T) {
	a, b, dsn := peerDaemons(t)
	alice, _, _ := enrollClient(t, a.d, a.url, "alice", "laptop")
	mallory, _, _ := enrollClient(t, a.d, a.url, "mallory", "pc")
	bob, _, _ := enrollClient(t, a.d, a.url, "bob", "phone")
	announced := rawListen(t, alice, a.d.cfg.Listen, "svc")
	rawListen(t, mallory, a.d.cfg.Listen, "mal")
	const key = "svc.rev.tp.internal"
	epoch := keyEpoch(t, dsn, key)
	chain, nkey, leaf, err := a.d.pki.IssueNodeCert("peer/1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	node := tls.Certificate{Certificate: chain, PrivateKey: nkey, Leaf: leaf}
	peerOpen := func(op wire.PeerOpen) wire.ServerHello {
		t.Helper()
		conn, err := tls.Dial("tcp", a.d.cfg.Listen, &tls.Config{Certificates: []tls.Certificate{node}, NextProtos: []string{wire.PeerALPN},
			InsecureSkipVerify: true, // verified by VerifyConnection, against TP's root
			VerifyConnection: func(cs tls.ConnectionState) error {
				_, err := a.d.verifyNode(cs, "")
				return err
			}})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
		if err := wire.WritePeerOpen(conn, op); err != nil {
			t.Fatal(err)
		}
		sh, err := wire.ReadServerHello(conn)
		if err != nil {
			t.Fatal(err)
		}
		return sh
	}

	// A pickup must come within the pickup timeout (10 s) of the dial: a
	// round whose session expired before alice's pickup, on a machine too
	// loaded for it, proves nothing and is played again.
	for round := 1; ; round++ {
		type answer struct {
			sh  wire.ServerHello
			err error
		}
		dialed := make(chan answer, 1)
		dial := rawConn(t, bob, a.d.cfg.Listen)
		go func() {
			if err := wire.WriteClientHello(dial, wire.ClientHello{V: wire.Version, Op: wire.OpDial, Net: "tcp", Host: key, Port: 22}); err != nil {
				dialed <- answer{err: err}
				return
			}
			sh, err := wire.ReadServerHello(dial)
			dialed <- answer{sh, err}
		}()
		var sid string
		select {
		case sid = <-announced:
		case <-time.After(30 * time.Second):
			t.Fatal("bob's dial of svc was not announced to alice's agent within 30s")
		}

		if _, sh := rawHello(t, mallory, b.d.cfg.Listen, wire.ClientHello{V: wire.Version, Op: wire.OpAccept, Session: sid}); sh.OK || sh.Code != wire.CodeUnknownSession {
			t.Fatalf("mallory's pickup of alice's session on B: %+v; want unknown_session", sh)
		}
		hdr := wire.SessionHeader{V: wire.Version, Session: sid, Name: "svc", Net: wire.NetAccept, PeerID: "bob@phone"}
		if sh := peerOpen(wire.PeerOpen{V: wire.Version, Key: key, Epoch: epoch, Header: hdr}); sh.OK || sh.Code != wire.CodeUnknownSession {
			t.Fatalf("a peer's pickup of alice's session for bob@phone: %+v; want unknown_session", sh)
		}

		acc, sh := rawHello(t, alice, b.d.cfg.Listen, wire.ClientHello{V: wire.Version, Op: wire.OpAccept, Session: sid})
		if !sh.OK {
			d := <-dialed
			if sh.Code == wire.CodeUnknownSession && d.err == nil && d.sh.Code == wire.CodeReverseTimeout && round < 3 {
				t.Logf("round %d: the session expired before alice's pickup (%s); again", round, d.sh.Reason)
				continue
			}
			t.Fatalf("alice's own pickup on B: %+v (bob's dial: %+v, %v); want ok", sh, d.sh, d.err)
		}
		d := <-dialed
		if d.err != nil || !d.sh.OK {
			t.Fatalf("bob's dial after alice's pickup: %+v, %v", d.sh, d.err)
		}
		for _, dir := range []struct {
			what     string
			from, to *tls.Conn
		}{{"bob to alice", dial, acc}, {"alice to bob", acc, dial}} {
			if _, err := dir.from.Write([]byte(dir.what)); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(dir.what))
			if _, err := io.ReadFull(dir.to, got); err != nil || string(got) != dir.what {
				t.Fatalf("%s through the paired session: %q, %v", dir.what, got, err)
			}
		}
		dial.Close()
		acc.Close()
		waitLog(t, a, "accept="+sid+" agent=alice@laptop") // A served it, for the peer
		return
	}
}

// A device may run two agents on one instance, each with its own names, and
// pick up over TLS through any instance (no client affinity at the balancer).
// Two instances on one database; alice's agents for aaa and svc are both on
// A. Bob's dial of svc through A is announced to the second agent, and alice
// picks it up on B: B offers the pickup to A under one of alice's names
// there (aaa, the first), and A takes it, the session being pending for
// alice's device. Before, A took a pickup only under the name of the
// very agent the session was announced to, and B offered one name per
// instance: 8 of 12 such pickups failed behind a round-robin balancer.
func TestPGPeerPickupSecondAgentOfDevice(t *testing.T) {
	t.Parallel()
	a, b, _ := peerDaemons(t)
	alice, _, _ := enrollClient(t, a.d, a.url, "alice", "laptop")
	bob, _, _ := enrollClient(t, a.d, a.url, "bob", "phone")
	rawListen(t, alice, a.d.cfg.Listen, "aaa")
	second := rawListen(t, alice, a.d.cfg.Listen, "svc")
	for round := 1; ; round++ {
		type answer struct {
			sh  wire.ServerHello
			err error
		}
		dialed := make(chan answer, 1)
		dial := rawConn(t, bob, a.d.cfg.Listen)
		go func() {
			if err := wire.WriteClientHello(dial, wire.ClientHello{V: wire.Version, Op: wire.OpDial, Net: "tcp", Host: "svc.rev.tp.internal", Port: 22}); err != nil {
				dialed <- answer{err: err}
				return
			}
			sh, err := wire.ReadServerHello(dial)
			dialed <- answer{sh, err}
		}()
		var sid string
		select {
		case sid = <-second:
		case <-time.After(30 * time.Second):
			t.Fatal("bob's dial of svc was not announced to alice's second agent within 30s")
		}
		acc, sh := rawHello(t, alice, b.d.cfg.Listen, wire.ClientHello{V: wire.Version, Op: wire.OpAccept, Session: sid})
		if !sh.OK {
			d := <-dialed
			if sh.Code == wire.CodeUnknownSession && d.err == nil && d.sh.Code == wire.CodeReverseTimeout && round < 3 {
				t.Logf("round %d: the session expired before alice's pickup (%s); again", round, d.sh.Reason)
				continue
			}
			t.Fatalf("alice's pickup on B of the session announced to her second agent: %+v (bob's dial: %+v, %v); want ok", sh, d.sh, d.err)
		}
		d := <-dialed
		if d.err != nil || !d.sh.OK {
			t.Fatalf("bob's dial after alice's pickup: %+v, %v", d.sh, d.err)
		}
		if _, err := dial.Write([]byte("to svc")); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len("to svc"))
		if _, err := io.ReadFull(acc, got); err != nil || string(got) != "to svc" {
			t.Fatalf("bob to alice's second agent through the paired session: %q, %v", got, err)
		}
		return
	}
}
