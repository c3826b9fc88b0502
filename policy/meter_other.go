//go:build !linux

package policy

import "time"

// meter measures an evaluation by the wall-clock time since it started (after it
// got its turn): only Linux gives a thread's processor time cheaply here.
type meter struct{ wallStart time.Time }

func (m *meter) start() { m.wallStart = time.Now() }

func (m *meter) used() time.Duration { return time.Since(m.wallStart) }

func (m *meter) stop() {}
