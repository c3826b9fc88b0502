//go:build unix

package clients

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/internal/testkit/testpar"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

// lockHolderEnv makes the test binary a lock holder instead of running tests:
// it takes $TP_HOME's lock in the directory named by the variable, says
// "locked", and holds the lock until its standard input ends.
const lockHolderEnv = "TP_TEST_HOLD_LOCK"

func TestMain(m *testing.M) {
	if dir := os.Getenv(lockHolderEnv); dir != "" {
		os.Exit(holdLock(dir))
	}
	testpar.Default(8) // many tests at once: each mostly waits on its own server
	os.Exit(m.Run())
}

func holdLock(dir string) int {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	unlock, err := Home{Dir: dir}.Lock(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer unlock()
	fmt.Println("locked")
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n') // until EOF
	return 0
}

// Two tp processes renewing at once: the second waits for the lock and, when
// its context ends first, says who holds it. Bad input: another process holding
// $TP_HOME's lock (and then dying without unlocking, which must free it).
func TestLockContendedByAnotherProcess(t *testing.T) {
	t.Parallel()
	h := Home{Dir: t.TempDir()}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	holder := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	holder.Env = append(os.Environ(), lockHolderEnv+"="+h.Dir)
	holder.Stderr = os.Stderr
	stdin, err := holder.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	stdout, err := holder.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	defer holder.Wait()
	defer holder.Process.Kill()
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "locked\n" {
		t.Fatalf("the holder process did not take the lock: %q, %v", line, err)
	}

	short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = h.Lock(short)
	cancelShort()
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "another tp or dlogin holds "+filepath.Join(h.Dir, lockFile)) {
		t.Fatalf("lock held by another process: got %v, want an error naming the lock file and the deadline", err)
	}

	// The holder dies without unlocking (ssh killed, laptop lid closed): the
	// operating system frees the lock, and the next tp takes it.
	if err := holder.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	unlock, err := h.Lock(ctx)
	if err != nil {
		t.Fatalf("lock after its holder died: %v", err)
	}
	unlock()
}

// Within one process, two Lock calls (two open files) exclude each other too,
// and unlocking lets the waiter in. Bad input: a second Lock while the first is held.
func TestLockContendedInProcess(t *testing.T) {
	t.Parallel()
	h := Home{Dir: t.TempDir()}
	unlock, err := h.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, err = h.Lock(short)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second lock while the first is held: got %v, want a deadline error", err)
	}
	got := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		u, err := h.Lock(ctx)
		if err == nil {
			u()
		}
		got <- err
	}()
	unlock()
	if err := <-got; err != nil {
		t.Fatalf("waiting lock after unlock: %v", err)
	}
}

// An existing $TP_HOME open to other users (bad input: mode 0755, as mkdir makes
// it) is made private by dlogin's Init, and a fresh one is created 0700.
func TestInitMakesHomePrivate(t *testing.T) {
	t.Parallel()
	existing := filepath.Join(t.TempDir(), "tp")
	if err := os.Mkdir(existing, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(existing, 0o755); err != nil { // whatever the umask
		t.Fatal(err)
	}
	fresh := filepath.Join(t.TempDir(), "config", "tp")
	for _, dir := range []string{existing, fresh} {
		if err := (Home{Dir: dir}).Init(); err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(dir)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o700 {
			t.Errorf("%s after Init: mode %04o, want 0700", dir, fi.Mode().Perm())
		}
	}
	// A file where the directory should be is refused, not chmod'ed.
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := (Home{Dir: file}).Init(); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("Init on a regular file: %v, want a not-a-directory error", err)
	}
}

// Keys and the profile are written 0600 even over files left 0644 (bad input:
// a home restored from a backup that lost the modes); certificates stay 0644.
func TestKeysWrittenPrivate(t *testing.T) {
	t.Parallel()
	h := Home{Dir: t.TempDir()}
	for _, name := range []string{deviceKeyFile, keyFile, profileFile, certFile} {
		if err := os.WriteFile(h.path(name), []byte("old"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(h.path(name), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ca := testpki.New(t)
	key, err := NewDeviceKey()
	if err != nil {
		t.Fatal(err)
	}
	if err := h.SaveDeviceKey(key); err != nil {
		t.Fatal(err)
	}
	if err := h.SaveProfile(Profile{Server: "https://tp.example.org", DeviceID: "alice@laptop"}); err != nil {
		t.Fatal(err)
	}
	if err := h.SaveRoot(ca.Root); err != nil {
		t.Fatal(err)
	}
	c := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	creds := &login.Credentials{Chain: []*x509.Certificate{c.Leaf, ca.Intermediate}, Key: c.PrivateKey.(*ecdsa.PrivateKey)}
	if err := h.SaveCredentials(creds); err != nil {
		t.Fatal(err)
	}
	want := map[string]os.FileMode{deviceKeyFile: 0o600, keyFile: 0o600, profileFile: 0o600, certFile: 0o644, rootFile: 0o644}
	for name, mode := range want {
		fi, err := os.Stat(h.path(name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != mode {
			t.Errorf("%s: mode %04o, want %04o", name, fi.Mode().Perm(), mode)
		}
	}
}
