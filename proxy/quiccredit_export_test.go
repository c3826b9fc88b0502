package proxy

import "time"

// SetStreamCreditDelay changes how long finished streams' credit may be held
// back (quiccredit.go); it returns the restore.
func SetStreamCreditDelay(d time.Duration) func() {
	old := streamCreditDelay.Swap(int64(d))
	return func() { streamCreditDelay.Store(old) }
}
