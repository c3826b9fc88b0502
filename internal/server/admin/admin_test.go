package admin

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/users"
)

func TestAdminSocket(t *testing.T) {
	dir := t.TempDir()
	st, err := users.Open(filepath.Join(dir, "users.json"))
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "admin.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: (&Server{Users: st, ServerURL: "https://tp.test", Fingerprint: "SHA256:ab", TokenTTL: time.Hour}).Handler()}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("admin socket mode %v, want 0600", fi.Mode().Perm())
	}
	// A second tpd on the same data dir is refused rather than stealing the socket.
	if _, err := Listen(sock); err == nil || !strings.Contains(err.Error(), "already serving") {
		t.Errorf("second Listen on a live socket: %v", err)
	}

	c := NewClient(sock)
	ctx := context.Background()
	res, err := c.Enroll(ctx, EnrollRequest{User: "alice", Device: "laptop", Groups: []string{"dev"}})
	if err != nil {
		t.Fatal(err)
	}
	if res.DeviceID != "alice@laptop" || res.Token == "" || res.ServerURL != "https://tp.test" || res.Fingerprint != "SHA256:ab" {
		t.Errorf("enroll response %+v", res)
	}
	if d := time.Until(res.Expires); d < 59*time.Minute || d > time.Hour {
		t.Errorf("token expires in %s, want the server default of 1h", d)
	}
	list, err := c.Users(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].Name != "alice" || list[0].PendingTokens != 1 {
		t.Errorf("users %+v", list)
	}
	// Bad input comes back as tpd's sentence.
	if _, err := c.Enroll(ctx, EnrollRequest{User: "Alice!", Device: "x"}); err == nil || !strings.Contains(err.Error(), "names must be") {
		t.Errorf("bad user name: %v", err)
	}
	if _, err := c.Enroll(ctx, EnrollRequest{User: "bob", Device: "x", TTL: "soon"}); err == nil || !strings.Contains(err.Error(), "duration") {
		t.Errorf("bad ttl: %v", err)
	}
}

// A stale socket left by a crashed tpd is replaced; nobody running, nobody refused.
func TestStaleSocketReplaced(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	// Simulate a crash: the file stays, nobody answers.
	ln.(interface{ SetUnlinkOnClose(bool) }).SetUnlinkOnClose(false)
	ln.Close()
	ln2, err := Listen(sock)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	ln2.Close()
	// A client of a tpd that is not running gets told what to check.
	_, err = NewClient(sock).Users(context.Background())
	if err == nil || !strings.Contains(err.Error(), "is `tpd serve` running") {
		t.Errorf("no tpd running: %v", err)
	}
}

// Opening the admin socket leaves the process's umask alone: directories that
// other goroutines make meanwhile (a website's certificate storage, a test's
// temporary directory) keep their search bit. Before, Listen set the umask to
// 0177 around the socket's creation, and a directory made in that moment was
// 0600, in which tpd, not being root, could create nothing. The socket is
// still 0600, and gone after Close.
func TestListenLeavesUmaskAlone(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "admin.sock")
	stop := make(chan struct{})
	bad := make(chan string, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			d := filepath.Join(dir, "other", strconv.Itoa(i))
			if err := os.MkdirAll(d, 0o700); err != nil {
				continue
			}
			if fi, err := os.Stat(d); err == nil && fi.Mode().Perm()&0o100 == 0 {
				select {
				case bad <- fmt.Sprintf("%s was made with mode %v", d, fi.Mode().Perm()):
				default:
				}
			}
		}
	}()
	for range 50 {
		ln, err := Listen(sock)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(sock)
		if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode()&os.ModeSocket == 0 {
			t.Fatalf("admin socket: %v, %v; want a socket of mode 0600", fi, err)
		}
		ln.Close()
		if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("admin socket after Close: %v; want it gone", err)
		}
	}
	close(stop)
	<-done
	select {
	case b := <-bad:
		t.Fatalf("a directory made while the admin socket opened lost its search bit: %s", b)
	default:
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".a*")); len(left) != 0 {
		t.Fatalf("Listen left %v behind", left)
	}
}

type reloadFunc func(context.Context) (ReloadResponse, error)

func (f reloadFunc) Reload(ctx context.Context) (ReloadResponse, error) { return f(ctx) }

// tpd reload of a tpd.yaml that is not YAML says that tpd kept its running
// configuration, which line is wrong, and what to do. Bad input: a key
// indented under a scalar. tpd reload once printed "tpd refused: config file
// F: While parsing config: yaml: line 2: mapping values are not allowed in
// this context".
func TestReloadRefusalSays(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, config.FileName)
	if err := os.WriteFile(file, []byte("log-level: debug\n  bad: [\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TP_DATA_DIR", dir)
	sock := filepath.Join(dir, "admin.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	reload := reloadFunc(func(context.Context) (ReloadResponse, error) {
		_, err := config.LoadServer(nil)
		return ReloadResponse{}, err
	})
	srv := &http.Server{Handler: (&Server{Reloader: reload}).Handler()}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	_, err = NewClient(sock).Reload(context.Background())
	want := "tpd kept its running configuration: config file " + file + " is not valid YAML: line 2: mapping values are not allowed in this context; fix that and run tpd reload again"
	if err == nil || err.Error() != want {
		t.Fatalf("reload of a broken tpd.yaml:\n\t%v\nwant\n\t%s", err, want)
	}
}
