// Package atomicfile writes files so that a reader, or a crash, sees either the
// old content or the new, never a part: temporary file in the same directory,
// fsync, rename. The mode is applied before any data is written, so a secret
// is never readable by others, not even for an instant (on Windows as an ACL:
// see internal/lib/fileperm).
package atomicfile

import (
	"os"
	"path/filepath"

	"github.com/tp-proxy/tp/internal/lib/fileperm"
)

// Write replaces path with data, mode perm.
func Write(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := fileperm.Chmod(f, perm); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return rename(f.Name(), path)
}
