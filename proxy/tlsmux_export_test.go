package proxy

import "time"

// SetTLSMuxTimers shortens a tp-mux connection's timers for a test; the
// returned function restores them.
func SetTLSMuxTimers(tick, dead, idle time.Duration) func() {
	t, d, i := tlsMuxTick.Load(), tlsMuxDead.Load(), tlsMuxIdle.Load()
	tlsMuxTick.Store(int64(tick))
	tlsMuxDead.Store(int64(dead))
	tlsMuxIdle.Store(int64(idle))
	return func() { tlsMuxTick.Store(t); tlsMuxDead.Store(d); tlsMuxIdle.Store(i) }
}
