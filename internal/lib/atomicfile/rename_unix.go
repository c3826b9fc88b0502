//go:build unix

package atomicfile

import "os"

// rename replaces newpath by oldpath atomically; readers holding newpath open
// keep reading the old content.
func rename(oldpath, newpath string) error { return os.Rename(oldpath, newpath) }
