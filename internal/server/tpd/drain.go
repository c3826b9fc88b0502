package tpd

import (
	"context"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/internal/lib/config"
)

// opsState is what drain.go and reload.go keep on the Daemon.
type opsState struct {
	stop   stopState
	reload reloadState
	live   atomic.Pointer[config.Server] // the configuration as last reloaded; nil: Daemon.cfg
}

// config is the running configuration: Daemon.cfg, or what a reload applied.
func (d *Daemon) config() *config.Server {
	if c := d.ops.live.Load(); c != nil {
		return c
	}
	return &d.cfg
}

// stopState is what a stopping tpd knows: whether it drains, and how to end
// the drain early.
type stopState struct {
	draining atomic.Bool
	once     sync.Once
	force    chan struct{} // closed by Force
}

func (s *stopState) forceCh() chan struct{} {
	s.once.Do(func() { s.force = make(chan struct{}) })
	return s.force
}

// Draining reports whether tpd has begun to stop: it accepts nothing new and
// waits for live sessions (a readiness probe answers "not ready" then).
func (d *Daemon) Draining() bool { return d.ops.stop.draining.Load() }

// Force ends a drain at once: sessions still live are aborted with the shutdown
// code. `tpd serve` calls it on a second SIGTERM or SIGINT. Safe to call more
// than once, and before the drain began (it then begins with no grace at all).
func (d *Daemon) Force() {
	ch := d.ops.stop.forceCh()
	select {
	case <-ch:
	default:
		close(ch)
	}
}

// drain stops tpd gracefully (docs/PROTOCOL.md, section 6.3): no new connections
// on any listener, agents told to reconnect at once, live sessions given up to
// shutdown-timeout, then the rest aborted with the shutdown code. It logs once
// when it begins and once, with the counts, when it ends.
func (d *Daemon) drain(ctx context.Context, adminSrv *http.Server, ln net.Listener) {
	start := time.Now()
	d.ops.stop.draining.Store(true)
	timeout := d.config().ShutdownTimeout
	live := d.proxy.Live()

	// The admin socket goes first, so that a tpd started next on the same data
	// dir can open its own.
	actx, acancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	_ = adminSrv.Shutdown(actx)
	acancel()
	os.Remove(d.cfg.AdminSocket())
	// Then the listeners, before the line that says so: whoever reads it
	// (a test, an operator's script) finds new connections refused. ln is
	// closed here too: a stop that comes before the proxy's Serve has taken
	// ln would otherwise leave it open in the kernel past this line, taking
	// handshakes that end in a reset once Serve closes it.
	d.proxy.StopAccepting()
	_ = ln.Close()
	d.log.Info("draining: no new connections; agents told to reconnect; live sessions may finish (a second SIGTERM or SIGINT aborts them)",
		"live", live, "shutdown_timeout", timeout)

	// The proxy is forced by cancelling sctx; what is live just before is what
	// gets cut.
	sctx, forceNow := context.WithCancel(context.WithoutCancel(ctx))
	defer forceNow()
	var cut atomic.Int64
	var forced atomic.Bool
	var forceOnce sync.Once
	doForce := func(why string, bySignal bool) {
		forceOnce.Do(func() {
			forced.Store(bySignal)
			n := d.proxy.Live()
			cut.Store(int64(n))
			if n > 0 {
				d.log.Warn("draining: aborting the sessions still live; their clients are told the server shut down", "why", why, "live", n)
			}
			forceNow()
		})
	}
	timer := time.AfterFunc(timeout, func() { doForce("shutdown-timeout reached", false) })
	defer timer.Stop()
	stopForce := make(chan struct{})
	defer close(stopForce)
	go func() {
		select {
		case <-d.ops.stop.forceCh():
			doForce("forced by a second signal", true)
		case <-stopForce:
		}
	}()
	_ = d.proxy.Shutdown(sctx)
	timer.Stop()
	n := int(cut.Load())
	drained := max(live-n, 0)
	d.log.Info("stopped", "drained", drained, "cut", n, "forced", forced.Load(), "took", time.Since(start).Round(time.Millisecond))
}
