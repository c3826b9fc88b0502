package e2e

import (
	"encoding/json"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/server/admin"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// statusOf runs `tpd status --json` against the tpd on dataDir.
func statusOf(t *testing.T, dataDir string) admin.Status {
	t.Helper()
	var st admin.Status
	out := run(t, nil, binary("tpd"), "status", "--json", "--data-dir", dataDir)
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("tpd status --json: %v\n%s", err, out)
	}
	return st
}

// instanceAt is the instance whose peer address is addr in st, or nil.
func instanceAt(st admin.Status, addr string) *admin.Instance {
	for i := range st.Instances {
		if st.Instances[i].PeerAddress == addr {
			return &st.Instances[i]
		}
	}
	return nil
}

// waitStatus runs `tpd status --json` on dataDir until ok accepts it, within 30 s.
func waitStatus(t *testing.T, dataDir, what string, ok func(admin.Status) bool) admin.Status {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		st := statusOf(t, dataDir)
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			b, _ := json.MarshalIndent(st.Instances, "", "  ")
			t.Fatalf("tpd status: %s not seen within 30s; instances:\n%s", what, b)
		}
		time.Sleep(200 * time.Millisecond) // polling, bounded by the deadline
	}
}

// waitTable runs `tpd status` on dataDir until its table holds every want,
// within 30 s.
func waitTable(t *testing.T, dataDir string, want ...string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		table := run(t, nil, binary("tpd"), "status", "--data-dir", dataDir)
		missing := ""
		for _, w := range want {
			if !strings.Contains(table, w) {
				missing = w
				break
			}
		}
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("tpd status lacks %q after 30s:\n%s", missing, table)
		}
		time.Sleep(200 * time.Millisecond) // polling, bounded by the deadline
	}
}

// `tpd status` lists the instances on the database (tp_instances), with two
// real tpd A and B on one PostgreSQL (heartbeat every 500 ms): on A, both,
// A marked as itself, each with its peer address and the same policy
// revision, both serving; the table names them. B frozen with
// SIGSTOP: A shows B stale within seconds (its heartbeat ages), and serving
// again after SIGCONT. B drained (SIGTERM) while a session through it is open
// (a dial of alice's name on A, relayed by B, so the drain waits for it): A
// shows B draining; once the session ends and B stops, B is gone from A's list.
func TestPGStatusListsInstances(t *testing.T) {
	parallel(t)
	raceTPD(t)
	srvs := startPeers(t, 2, peerPolicy, []string{"TP_REVERSE_LEASE=3s", "TP_REVERSE_RENEW=500ms", "TP_SHUTDOWN_TIMEOUT=30s"})
	a, b := srvs[0], srvs[1]

	st := waitStatus(t, a.DataDir, "both instances serving", func(st admin.Status) bool {
		return len(st.Instances) == 2 && !st.Instances[0].Stale && !st.Instances[1].Stale
	})
	if st.InstancesError != "" {
		t.Fatalf("tpd status on A: %s", st.InstancesError)
	}
	ia, ib := instanceAt(st, a.Addr), instanceAt(st, b.Addr)
	if ia == nil || ib == nil {
		t.Fatalf("tpd status on A lists %+v; want the peer addresses %s and %s", st.Instances, a.Addr, b.Addr)
	}
	if !ia.Self || ib.Self || ia.Name != st.Instance || ia.Name == ib.Name {
		t.Fatalf("tpd status on A (instance %q): A %+v, B %+v; want A alone marked as itself, two names", st.Instance, ia, ib)
	}
	for _, in := range []*admin.Instance{ia, ib} {
		if in.PolicyRevision == "" || in.PolicyRevision != st.PolicyRevision {
			t.Fatalf("instance %s reports policy revision %q; A runs %q (one policy)", in.Name, in.PolicyRevision, st.PolicyRevision)
		}
		if in.Draining || in.HeartbeatAge < 0 {
			t.Fatalf("instance %s: %+v; want serving", in.Name, in)
		}
	}
	waitTable(t, b.DataDir, "INSTANCES (2)", ia.Name, ib.Name+" (this one)", a.Addr, b.Addr, "serving")

	// B frozen: its heartbeat ages on the database's clock.
	if err := b.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	st = waitStatus(t, a.DataDir, "B stale while frozen", func(st admin.Status) bool {
		in := instanceAt(st, b.Addr)
		return in != nil && in.Stale && in.HeartbeatAge > 1.5
	})
	waitTable(t, a.DataDir, "stale (no heartbeat")
	if err := b.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, a.DataDir, "B serving after SIGCONT", func(st admin.Status) bool {
		in := instanceAt(st, b.Addr)
		return in != nil && !in.Stale && !in.Draining
	})

	// B draining: a session relayed by B keeps the drain going.
	alice := a.login(t, "alice", "laptop")
	startExpose(t, append(alice, "TP_TRANSPORT=tls"), "chat", testnet.Echo(t), "--allow-user", "bob")
	bob := b.login(t, "bob", "phone")
	// A session of its own per connection (no end-to-end carrier, which
	// would outlive the connection, idle, until tp forward closes it): the
	// session ends when live does.
	fwd, _ := startForward(t, append(bob, "TP_TRANSPORT=tls"), "chat.rev.tp.internal:22", "--no-e2e-mux")
	var live net.Conn
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("tcp", fwd)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(30 * time.Second))
		buf := make([]byte, 4)
		if _, err = c.Write([]byte("ping")); err == nil {
			_, err = io.ReadFull(c, buf)
		}
		if err == nil && string(buf) == "ping" {
			live = c
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatalf("bob through B to chat on A: %q %v", buf, err)
		}
		time.Sleep(200 * time.Millisecond) // the agent registers; bounded by the deadline
	}
	defer live.Close()
	if err := b.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, a.DataDir, "B draining", func(st admin.Status) bool {
		in := instanceAt(st, b.Addr)
		return in != nil && in.Draining && !in.Stale
	})
	waitTable(t, a.DataDir, "draining")
	live.Close()
	select {
	case <-b.done:
	case <-time.After(60 * time.Second):
		t.Fatalf("B did not stop within 60s of its last session's end\n%s", b.log.String())
	}
	waitStatus(t, a.DataDir, "B gone after it stopped", func(st admin.Status) bool {
		return len(st.Instances) == 1 && st.Instances[0].Self
	})
}
