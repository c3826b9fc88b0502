//go:build windows

package atomicfile

import (
	"errors"
	"os"
	"time"

	"golang.org/x/sys/windows"
)

// rename replaces newpath by oldpath. On Windows a file that another process
// has open cannot be replaced until it is closed (Go opens files without
// FILE_SHARE_DELETE), so a tp reading its certificate while another renews it
// would make the renewal fail: retry for a bounded time, as readers hold the
// file only for the moment of a read.
func rename(oldpath, newpath string) error {
	const attempts = 100 // 100 × 20 ms: two seconds
	var err error
	for range attempts {
		err = os.Rename(oldpath, newpath)
		if !errors.Is(err, windows.ERROR_ACCESS_DENIED) && !errors.Is(err, windows.ERROR_SHARING_VIOLATION) {
			return err
		}
		time.Sleep(20 * time.Millisecond) // waiting for a reader to close newpath
	}
	return err
}
