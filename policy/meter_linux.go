package policy

import (
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// meter measures the processor time an evaluation uses: the goroutine is locked
// to its thread for the evaluation, and the thread's CPU clock, which stands
// still while the thread waits for a processor, is read from any thread.
type meter struct {
	clock     int32 // the thread's CPU clock; 0 if it cannot be read
	start0    time.Duration
	wallStart time.Time
}

// start locks the calling goroutine to its thread and starts measuring; stop
// must follow on the same goroutine.
func (m *meter) start() {
	runtime.LockOSThread()
	m.wallStart = time.Now()
	// MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED) of linux/posix-timers.h: the
	// inverted thread id, then CPUCLOCK_PERTHREAD_MASK (4) | CPUCLOCK_SCHED (2).
	clock := (^int32(unix.Gettid()))<<3 | 6
	if d, ok := readClock(clock); ok {
		m.clock, m.start0 = clock, d
	}
}

// used returns the processor time since start; wall time if the clock
// cannot be read.
func (m *meter) used() time.Duration {
	if m.clock != 0 {
		if d, ok := readClock(m.clock); ok {
			return d - m.start0
		}
	}
	return time.Since(m.wallStart)
}

func (m *meter) stop() { runtime.UnlockOSThread() }

func readClock(clock int32) (time.Duration, bool) {
	var ts unix.Timespec
	if err := unix.ClockGettime(clock, &ts); err != nil {
		return 0, false
	}
	return time.Duration(ts.Nano()), true
}
