//go:build unix

package fileperm

import (
	"fmt"
	"os"
)

// Chmod sets f's mode to perm.
func Chmod(f *os.File, perm os.FileMode) error {
	return f.Chmod(perm)
}

// PrivateDir creates dir (and missing parents, 0700) if it does not exist, and
// takes group and other access away from it if it does, so that nobody else can
// list it or swap the files in it.
func PrivateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		if err := os.Chmod(dir, perm&^0o077); err != nil {
			return fmt.Errorf("%s is open to other users (mode %04o) and could not be made private: %w", dir, perm, err)
		}
	}
	return nil
}
