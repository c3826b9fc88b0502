//go:build unix

package fileperm

import (
	"os"
	"path/filepath"
	"testing"
)

// PrivateDir takes group and other access from an existing directory (bad
// input: mode 0755) and keeps the owner's bits; a missing one is created 0700.
func TestPrivateDir(t *testing.T) {
	open := filepath.Join(t.TempDir(), "open")
	if err := os.Mkdir(open, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o755); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "a", "b")
	for _, dir := range []string{open, missing} {
		if err := PrivateDir(dir); err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(dir)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o700 {
			t.Errorf("%s: mode %04o, want 0700", dir, fi.Mode().Perm())
		}
	}
}

// Chmod applies the mode to an open file whatever it was created with (bad
// input: a file created 0666).
func TestChmod(t *testing.T) {
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "k"), os.O_CREATE|os.O_RDWR, 0o666)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := Chmod(f, 0o600); err != nil {
		t.Fatal(err)
	}
	fi, err := f.Stat()
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, %v; want 0600", fi.Mode().Perm(), err)
	}
}
