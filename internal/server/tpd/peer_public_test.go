package tpd

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
	"github.com/tp-proxy/tp/proxy/wire"
)

// keyEpoch reads the epoch of key's row in tp_holds.
func keyEpoch(t *testing.T, dsn, key string) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cc, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cc.Password = testpg.Password
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var epoch int64
	if err := conn.QueryRow(ctx, "SELECT epoch FROM tp_holds WHERE key = $1", key).Scan(&epoch); err != nil {
		t.Fatal(err)
	}
	return epoch
}

// The peer gate for public exposures, on one real instance on PostgreSQL:
// alice's agent holds public TCP port P. A peer open of "tcp/P" at a stale
// epoch (before the agent's last claim) is refused with reverse_offline; at
// the current epoch it opens a plain session to the agent (no e2e), whose
// label the serving instance fills in. Malformed public opens are refused
// with bad_request (bad input: a label set by the forwarding instance, a
// dialer identity on a public session, a header naming another exposure, UDP
// on a TCP port, no public client address). The peer-session counters count
// what was served and refused.
func TestPGPeerPublicGate(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	port := testnet.FreePort(t, "tcp")
	cfg := leaseDataDir(t, dsn, nil)
	if err := os.WriteFile(filepath.Join(cfg.PolicyDir(), "tp.rego"), []byte(fmt.Sprintf(publicPolicy, port)), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.PublicPorts = strconv.Itoa(port)
	cfg.QUIC = true
	a := runDaemon(t, cfg)
	alice, _, _ := enrollClient(t, a.d, a.url, "alice", "laptop")
	exposed := []clients.Exposed{{Name: "web", Local: testnet.Upper(t), PublicPort: port}}
	if _, err := runAgent(t, alice, clients.TransportTLS, exposed, nil); err != nil {
		t.Fatal(err)
	}
	// A newer agent of the same device replaces it: the epoch rises.
	if _, err := runAgent(t, alice, clients.TransportQUIC, exposed, nil); err != nil {
		t.Fatal(err)
	}
	key := "tcp/" + strconv.Itoa(port)
	epoch := keyEpoch(t, dsn, key)
	if epoch < 2 {
		t.Fatalf("%s's epoch after a second claim is %d; want at least 2", key, epoch)
	}
	chain, nkey, leaf, err := a.d.pki.IssueNodeCert("peer/1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	node := tls.Certificate{Certificate: chain, PrivateKey: nkey, Leaf: leaf}
	open := func(op wire.PeerOpen) (*tls.Conn, wire.ServerHello, error) {
		conn, err := tls.Dial("tcp", a.d.cfg.Listen, &tls.Config{Certificates: []tls.Certificate{node}, NextProtos: []string{wire.PeerALPN},
			InsecureSkipVerify: true, // verified by VerifyConnection, against TP's root
			VerifyConnection: func(cs tls.ConnectionState) error {
				_, err := a.d.verifyNode(cs, "")
				return err
			}})
		if err != nil {
			return nil, wire.ServerHello{}, err
		}
		_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
		if err := wire.WritePeerOpen(conn, op); err != nil {
			conn.Close()
			return nil, wire.ServerHello{}, err
		}
		sh, err := wire.ReadServerHello(conn)
		if err != nil || !sh.OK {
			conn.Close()
			return nil, sh, err
		}
		return conn, sh, nil
	}
	hdr := wire.SessionHeader{V: wire.Version, Session: "0123abcd", Public: key, PeerAddr: "192.0.2.7:40000"}
	public := func(epoch int64, h wire.SessionHeader) wire.PeerOpen {
		return wire.PeerOpen{V: wire.Version, Key: key, Epoch: epoch, Header: h}
	}

	_, sh, err := open(public(epoch-1, hdr))
	if err != nil || sh.OK || sh.Code != wire.CodeReverseOffline {
		t.Fatalf("public peer open at stale epoch %d (current %d): %+v %v; want reverse_offline", epoch-1, epoch, sh, err)
	}
	bad := map[string]func(h *wire.SessionHeader){
		"a label set by the forwarding instance": func(h *wire.SessionHeader) { h.Name = "web" },
		"a dialer identity on a public session":  func(h *wire.SessionHeader) { h.PeerID, h.PeerUser = "bob@phone", "bob" },
		"a header naming another exposure":       func(h *wire.SessionHeader) { h.Public = "tcp/1" },
		"UDP on a TCP port":                      func(h *wire.SessionHeader) { h.Net = "udp" },
		"no public client address":               func(h *wire.SessionHeader) { h.PeerAddr = "" },
	}
	for what, spoil := range bad {
		h := hdr
		spoil(&h)
		_, sh, err := open(public(epoch, h))
		if err != nil || sh.OK || sh.Code != wire.CodeBadRequest {
			t.Fatalf("public peer open with %s: %+v %v; want bad_request", what, sh, err)
		}
	}
	conn, sh, err := open(public(epoch, hdr))
	if err != nil || !sh.OK || sh.E2E {
		t.Fatalf("public peer open at the current epoch %d: %+v %v; want ok, no e2e", epoch, sh, err)
	}
	got, err := roundTrip(conn, []byte("public through a peer"))
	if err != nil || string(got) != "PUBLIC THROUGH A PEER" {
		t.Fatalf("public session opened by a peer: %q %v", got, err)
	}
	waitLog(t, a, "name="+key)
	st := a.d.proxy.Stats().Peer["in"]
	if st.Opened != 1 || st.Refused != 1+int64(len(bad)) {
		t.Fatalf("peer sessions in: %+v; want 1 opened, %d refused", st, 1+len(bad))
	}
	deadline := time.Now().Add(10 * time.Second)
	for a.d.proxy.Stats().Peer["in"].Active != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("peer sessions in still active 10s after the session ended: %+v", a.d.proxy.Stats().Peer["in"])
		}
		time.Sleep(10 * time.Millisecond) // polling a gauge, bounded by the deadline
	}
}
