package tpd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
	"github.com/tp-proxy/tp/proxy/wire"
)

// peerDataDirs are two instances' configurations on one database, with the
// reverse policy, short leases and QUIC on.
func peerDaemons(t *testing.T) (a, b *daemonRun, dsn string) {
	t.Helper()
	_, dsn = testpg.NewDatabase(t)
	cfgA := leaseDataDir(t, dsn, nil)
	cfgA.QUIC = true
	cfgB := leaseDataDir(t, dsn, &cfgA)
	cfgB.QUIC = true
	return runDaemon(t, cfgA), runDaemon(t, cfgB), dsn
}

// Two instances on one database: alice's agent is on A; bob dials svc
// through B over TLS and over QUIC and reaches it, B having carried the
// session to A over a peer connection (A logs the peer session, B names A
// as the upstream). The relays see ciphertext only: the agent's data never
// shows its plaintext marker on either instance's path (protected mode).
func TestPGPeerForward(t *testing.T) {
	t.Parallel()
	a, b, _ := peerDaemons(t)
	local := testnet.Upper(t)
	alice, _, _ := enrollClient(t, a.d, a.url, "alice", "laptop")
	bob, _, _ := enrollClient(t, a.d, a.url, "bob", "phone")
	bobB := clientOn(t, bob, b.url)
	for _, agentTr := range []string{clients.TransportTLS, clients.TransportQUIC} {
		t.Run("agent-"+agentTr, func(t *testing.T) {
			tap := &capture{}
			stop, _ := startAgent(t, alice, agentTr, local, []string{"bob"}, tap)
			defer stop()
			for _, tr := range []string{clients.TransportTLS, clients.TransportQUIC} {
				marker := []byte("peer-plaintext-" + agentTr + "-" + tr)
				got, err := dialReverse(bobB, tr, marker)
				if err != nil || string(got) != strings.ToUpper(string(marker)) {
					t.Fatalf("bob on B (%s) to svc whose agent is on A: %q %v", tr, got, err)
				}
				if tap.contains(marker) {
					t.Fatalf("the agent's connection to A carried %q in clear: protected mode is not end to end across the hop", marker)
				}
			}
			waitLog(t, a, "peer session")
			waitLog(t, b, "upstream=\"peer "+a.d.Instance())
		})
	}
}

// The peer port's gate: a device certificate offered on ALPN tp-peer/1 is
// refused at the handshake, a node certificate is refused as a device on
// tp/1, and a peer open whose epoch is not the one A's agent holds (stale,
// as after a takeover B had not yet heard of) is refused with
// reverse_offline while the current epoch opens the session.
func TestPGPeerGate(t *testing.T) {
	t.Parallel()
	a, b, dsn := peerDaemons(t)
	local := testnet.Upper(t)
	alice, _, _ := enrollClient(t, a.d, a.url, "alice", "laptop")
	bob, _, _ := enrollClient(t, a.d, a.url, "bob", "phone")
	startAgent(t, alice, clients.TransportTLS, local, []string{"bob"}, nil)
	startAgent(t, alice, clients.TransportQUIC, local, []string{"bob"}, nil) // a newer agent's claim: the epoch rises
	epoch, _ := holdRow(t, dsn)
	if epoch < 2 {
		t.Fatalf("svc's epoch after a second claim is %d; want at least 2", epoch)
	}
	roots := x509.NewCertPool()
	roots.AddCert(a.d.pki.Root)

	// A device certificate on the peer ALPN (bad input: bob's own certificate).
	dev, err := bob.Certificate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// The server's side is verified as a peer instance verifies it: a node
	// certificate of TP's CA (it names no host, so not by host name).
	peerTLS := func(cert tls.Certificate) *tls.Config {
		return &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{wire.PeerALPN},
			InsecureSkipVerify: true, // verified by VerifyConnection, against TP's root
			VerifyConnection: func(cs tls.ConnectionState) error {
				_, err := a.d.verifyNode(cs, "")
				return err
			}}
	}
	conn, err := tls.Dial("tcp", a.d.cfg.Listen, peerTLS(*dev))
	if err == nil {
		_, err = conn.Read(make([]byte, 1)) // TLS 1.3: the client learns of its refusal on its first read
		conn.Close()
	}
	if err == nil {
		t.Fatal("a device certificate was accepted on ALPN tp-peer/1")
	}
	waitLog(t, a, "a device certificate is not")

	// A node certificate (of a made-up instance) on tp/1, as a device.
	chain, key, leaf, err := b.d.pki.IssueNodeCert("intruder/1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	node := tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}
	if _, err := authz.IdentityFromCert(leaf); err == nil || !strings.Contains(err.Error(), "node certificate") {
		t.Fatalf("a node certificate read as a device identity: %v", err)
	}
	conn, err = tls.Dial("tcp", a.d.cfg.Listen, &tls.Config{Certificates: []tls.Certificate{node}, NextProtos: []string{wire.ALPN}, RootCAs: roots, ServerName: "localhost"})
	if err == nil {
		_ = wire.WriteClientHello(conn, wire.ClientHello{V: wire.Version, Op: wire.OpDial, Host: "svc.rev.tp.internal", Port: 22})
		var sh wire.ServerHello
		if sh, err = wire.ReadServerHello(conn); err == nil && sh.OK {
			t.Fatal("a node certificate was accepted as a device on tp/1")
		}
		conn.Close()
	}

	open := func(epoch int64) (wire.ServerHello, error) {
		conn, err := tls.Dial("tcp", a.d.cfg.Listen, peerTLS(node))
		if err != nil {
			return wire.ServerHello{}, err
		}
		defer conn.Close()
		hdr := wire.SessionHeader{V: wire.Version, Session: "0123abcd", Name: "svc", PeerID: "bob@phone", PeerUser: "bob"}
		if err := wire.WritePeerOpen(conn, wire.PeerOpen{V: wire.Version, Key: "svc.rev.tp.internal", Epoch: epoch, Header: hdr}); err != nil {
			return wire.ServerHello{}, err
		}
		return wire.ReadServerHello(conn)
	}
	sh, err := open(epoch - 1)
	if err != nil || sh.OK || sh.Code != wire.CodeReverseOffline {
		t.Fatalf("peer open at stale epoch %d (current %d): %+v %v; want reverse_offline", epoch-1, epoch, sh, err)
	}
	sh, err = open(epoch)
	if err != nil || !sh.OK || !sh.E2E {
		t.Fatalf("peer open at the current epoch %d: %+v %v; want ok, e2e", epoch, sh, err)
	}
}
