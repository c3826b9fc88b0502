package tpd

import (
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// freezeRelay passes TCP connections to a TP server as a load balancer does.
// After freeze, the connections it carries pass nothing more either way and
// stay open, as a frozen process's do (SIGSTOP, a stalled VM), and new
// connections go to another server (the balancer's health check noticed).
type freezeRelay struct {
	addr   string
	to     atomic.Pointer[string]
	frozen chan struct{}
	once   sync.Once
}

func newFreezeRelay(t *testing.T, to string) *freezeRelay {
	t.Helper()
	r := &freezeRelay{frozen: make(chan struct{})}
	r.to.Store(&to)
	done := make(chan struct{})
	t.Cleanup(func() { close(done) })
	r.addr = testnet.Serve(t, func(c *net.TCPConn) {
		frozen := r.frozen // connections made after the freeze go elsewhere and pass
		select {
		case <-frozen:
			frozen = nil
		default:
		}
		up, err := net.Dial("tcp", *r.to.Load())
		if err != nil {
			return
		}
		defer up.Close()
		pass := func(dst, src net.Conn) {
			buf := make([]byte, 32<<10)
			for {
				n, err := src.Read(buf)
				select {
				case <-frozen: // what arrives now is never passed on
					<-done
					return
				default:
				}
				if n > 0 {
					if _, werr := dst.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}
		go pass(up, c)
		pass(c, up)
	})
	return r
}

// freeze stops the connections the relay carries and sends new ones to next.
func (r *freezeRelay) freeze(next string) {
	r.to.Store(&next)
	r.once.Do(func() { close(r.frozen) })
}

// Bad input: the instance a TLS agent is connected to freezes (its
// connections stay open, nothing arrives) while the balancer in front sends
// new connections to another instance. The agent takes the silence of twice
// the ping period its instance announced (with a database: the lease's renew
// period, 500 ms here) as a lost connection, reconnects, and its name moves to
// the other instance. Before, it waited for 45 s of silence while its name's
// lease lapsed after 15 s: the name was down for as long as the freeze.
func TestPGTLSAgentLeavesFrozenInstance(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	cfgA := leaseDataDir(t, dsn, nil)
	a := runDaemon(t, cfgA)
	b := runDaemon(t, leaseDataDir(t, dsn, &cfgA))
	alice, _, _ := enrollClient(t, a.d, a.url, "alice", "laptop")
	bob, _, _ := enrollClient(t, a.d, b.url, "bob", "phone")
	relay := newFreezeRelay(t, strings.TrimPrefix(a.url, "https://"))
	startAgent(t, clientOn(t, alice, "https://"+relay.addr), clients.TransportTLS, testnet.Upper(t), []string{"bob"}, nil)
	_, instA := holdRow(t, dsn)

	relay.freeze(strings.TrimPrefix(b.url, "https://"))
	waitFor(t, "alice's agent, its instance silent, registered svc on the other instance", func() bool {
		_, inst := holdRow(t, dsn)
		return inst != instA
	})
	if got, err := dialReverse(clientOn(t, bob, b.url), clients.TransportTLS, []byte("moved")); err != nil || string(got) != "MOVED" {
		t.Fatalf("bob through B after alice's agent left its frozen instance: %q %v", got, err)
	}
}
