package testpg

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Versions are the PostgreSQL major versions looked for, newest first; Debian 12 ships 15.
var Versions = []string{"17", "16", "15"}

// Password is the superuser's password over TCP (scram-sha-256); the unix socket
// trusts local connections, which only the server's own user and root can open.
const Password = "tp-test-password"

// User is the superuser the cluster is made with.
const User = "postgres"

const template = "tp_template"

// startTimeout bounds initdb and each start of the server.
const startTimeout = 60 * time.Second

// Server is one running PostgreSQL cluster. Its methods are safe for concurrent use.
type Server struct {
	bin  string // directory of initdb and postgres
	dir  string // temporary directory: data/, the socket, the log
	port int
	cred *syscall.Credential // nil when not root

	mu   sync.Mutex
	cmd  *exec.Cmd     // the running postmaster, nil when stopped
	done chan struct{} // closed when cmd has exited
	dbs  atomic.Int64
}

const ownerFile = "owner.pid"

// baseDir is where server directories go: the temporary directory, unless the
// server runs as another user who cannot reach it (TMPDIR under /root) or the
// unix socket's path would pass its 107-byte limit; then /tmp.
func baseDir(otherUser bool) string {
	d := os.TempDir()
	if len(d) > 60 {
		return "/tmp"
	}
	if otherUser {
		for p := d; p != "/" && p != "."; p = filepath.Dir(p) {
			if fi, err := os.Stat(p); err != nil || fi.Mode().Perm()&0o001 == 0 {
				return "/tmp"
			}
		}
	}
	return d
}

// sweep removes server directories whose test binary is gone.
func sweep(base string) {
	dirs, _ := filepath.Glob(filepath.Join(base, "testpg-*"))
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, ownerFile))
		if err != nil {
			continue // not ours, or still being made
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid != os.Getpid() {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); errors.Is(err, os.ErrNotExist) {
				os.RemoveAll(d)
			}
		}
	}
}

// binDir finds Debian's PostgreSQL binaries.
// BinDir is the directory of the PostgreSQL server's programs (initdb,
// postgres, pg_isready, psql), for a test that runs a server of its own.
func BinDir() (string, error) { return binDir() }

func binDir() (string, error) {
	for _, v := range Versions {
		d := filepath.Join("/usr/lib/postgresql", v, "bin")
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	return "", errors.New("PostgreSQL's server binaries (initdb, postgres) are not installed under /usr/lib/postgresql/{" +
		strings.Join(Versions, ",") + "}/bin; install Debian's package: apt-get install postgresql (deploy/test.sh --deps does)")
}

// New makes a fresh cluster in a temporary directory and starts it. Close stops
// it and removes the directory.
func New() (*Server, error) {
	bin, err := binDir()
	if err != nil {
		return nil, err
	}
	s := &Server{bin: bin}
	if os.Geteuid() == 0 {
		u, err := user.Lookup(User)
		if err != nil {
			return nil, fmt.Errorf("PostgreSQL refuses to run as root, and there is no %q user to run it as (the postgresql package creates it): %w", User, err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		s.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	base := baseDir(s.cred != nil)
	sweep(base)
	if s.dir, err = os.MkdirTemp(base, "testpg-"); err != nil {
		return nil, err
	}
	// Whose directory this is, for sweep: a test binary killed outright
	// (its server dies with it, see command) leaves it behind.
	if err := os.WriteFile(filepath.Join(s.dir, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		os.RemoveAll(s.dir)
		return nil, err
	}
	if s.cred != nil {
		if err := os.Chown(s.dir, int(s.cred.Uid), int(s.cred.Gid)); err != nil {
			os.RemoveAll(s.dir)
			return nil, err
		}
	}
	if err := s.initdb(); err != nil {
		os.RemoveAll(s.dir)
		return nil, err
	}
	var lastErr error
	for range 5 { // a free port can be taken between choosing and binding it
		if s.port, err = freePort(); err != nil {
			os.RemoveAll(s.dir)
			return nil, err
		}
		if lastErr = s.Start(); lastErr == nil {
			break
		}
	}
	if lastErr != nil {
		os.RemoveAll(s.dir)
		return nil, lastErr
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := s.exec(ctx, "postgres", "CREATE DATABASE "+template); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func (s *Server) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(s.bin, name), args...)
	cmd.Dir = s.dir
	cmd.Env = []string{"LANG=C.UTF-8", "LC_ALL=C.UTF-8", "PATH=/usr/bin:/bin"}
	// The server dies with the test binary, even when a test's timeout panics
	// past every cleanup (SIGQUIT is PostgreSQL's immediate shutdown).
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred, Pdeathsig: syscall.SIGQUIT}
	return cmd
}

func (s *Server) initdb() error {
	pw := filepath.Join(s.dir, "pwfile")
	if err := os.WriteFile(pw, []byte(Password+"\n"), 0o600); err != nil {
		return err
	}
	if s.cred != nil {
		if err := os.Chown(pw, int(s.cred.Uid), int(s.cred.Gid)); err != nil {
			return err
		}
	}
	cmd := s.command("initdb", "-D", filepath.Join(s.dir, "data"), "-U", User, "--pwfile", pw,
		"--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("initdb: %w\n%s", err, out)
	}
	return os.Remove(pw)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Start starts the server again after Stop (New starts it the first time); the
// data survive. It returns once the server accepts connections.
func (s *Server) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return errors.New("testpg: the server is already running")
	}
	logPath := filepath.Join(s.dir, "postgres.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := s.command("postgres", "-D", filepath.Join(s.dir, "data"),
		"-c", "listen_addresses=127.0.0.1", "-p", strconv.Itoa(s.port), "-c", "unix_socket_directories="+s.dir,
		// A throwaway cluster: durability costs time and buys nothing here.
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
		"-c", "max_connections=300", "-c", "shared_buffers=32MB")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start postgres: %w", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	deadline := time.Now().Add(startTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		c, err := pgx.Connect(ctx, s.socketDSN("postgres"))
		cancel()
		if err == nil {
			c.Close(context.Background())
			break
		}
		select {
		case <-done:
			b, _ := os.ReadFile(logPath)
			return fmt.Errorf("postgres exited at start (%v); its log:\n%s", cmd.ProcessState, tail(b))
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			cmd.Process.Signal(syscall.SIGQUIT)
			<-done
			b, _ := os.ReadFile(logPath)
			return fmt.Errorf("postgres did not accept connections within %s (%v); its log:\n%s", startTimeout, err, tail(b))
		}
	}
	s.cmd, s.done = cmd, done
	return nil
}

// Stop shuts the server down (fast shutdown: clients are disconnected) and
// waits for it to exit. Stopping a stopped server does nothing.
func (s *Server) Stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return nil
	}
	s.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-s.done:
	case <-time.After(startTimeout):
		s.cmd.Process.Kill()
		<-s.done
	}
	s.cmd, s.done = nil, nil
	return nil
}

// Close stops the server and removes its directory.
func (s *Server) Close() error {
	err := s.Stop()
	return errors.Join(err, os.RemoveAll(s.dir))
}

// Port is the loopback TCP port the server listens on.
func (s *Server) Port() int { return s.port }

// DSN is a URL for database db over TCP, without the password (which is
// Password), in the form tpd's `database:` setting takes.
func (s *Server) DSN(db string) string {
	return fmt.Sprintf("postgres://%s@127.0.0.1:%d/%s?sslmode=disable", User, s.port, db)
}

// DSNWithPassword is DSN with the password in it, for tools in tests that
// take no separate password.
func (s *Server) DSNWithPassword(db string) string {
	return fmt.Sprintf("postgres://%s:%s@127.0.0.1:%d/%s?sslmode=disable", User, Password, s.port, db)
}

func (s *Server) socketDSN(db string) string {
	return fmt.Sprintf("host=%s port=%d user=%s dbname=%s sslmode=disable", s.dir, s.port, User, db)
}

func (s *Server) exec(ctx context.Context, db, sql string) error {
	c, err := pgx.Connect(ctx, s.socketDSN(db))
	if err != nil {
		return fmt.Errorf("testpg: connect: %w", err)
	}
	defer c.Close(context.Background())
	if _, err := c.Exec(ctx, sql); err != nil {
		return fmt.Errorf("testpg: %s: %w", sql, err)
	}
	return nil
}

// CreateDatabase makes an empty database with a fresh name and returns the name.
func (s *Server) CreateDatabase(ctx context.Context) (string, error) {
	name := fmt.Sprintf("t%d_%d", os.Getpid(), s.dbs.Add(1))
	if err := s.exec(ctx, "postgres", "CREATE DATABASE "+name+" TEMPLATE "+template); err != nil {
		return "", err
	}
	return name, nil
}

// DropDatabase drops a database, disconnecting whoever still uses it.
func (s *Server) DropDatabase(ctx context.Context, name string) error {
	return s.exec(ctx, "postgres", "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
}

func tail(b []byte) string {
	const max = 4000
	if len(b) > max {
		b = b[len(b)-max:]
	}
	return string(b)
}

var (
	shared    *Server
	sharedErr error
	sharedMu  sync.Mutex
)

// Main runs a test binary's tests (call it from TestMain) and stops the shared
// server, if a test started one, when they end, failed or not.
func Main(m *testing.M) int {
	code := m.Run()
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if shared != nil {
		shared.Close()
		shared = nil
	}
	return code
}

// SkipIfShort skips the calling test under go test -short, which runs without
// PostgreSQL: the test needs its server binaries to start a server of its
// own. Shared and NewDatabase call it; a test that calls New calls it first.
func SkipIfShort(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs PostgreSQL (Debian's postgresql package: initdb and postgres for a throwaway server); skipped under -short")
	}
}

// Shared is the test binary's server, started on first use. Without Main in
// TestMain, the server still dies with the test binary, but its directory stays.
func Shared(t testing.TB) *Server {
	t.Helper()
	SkipIfShort(t)
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if shared == nil && sharedErr == nil {
		shared, sharedErr = New()
	}
	if sharedErr != nil {
		t.Fatalf("testpg: %v", sharedErr)
	}
	return shared
}

// NewDatabase gives the test an empty database of its own on the shared server,
// dropped when the test ends, and returns its DSN (without the password, which
// is Password).
func NewDatabase(t testing.TB) (srv *Server, dsn string) {
	t.Helper()
	srv = Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	name, err := srv.CreateDatabase(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// A test that stopped the server and failed before starting it again
		// leaves it stopped; later tests need it running.
		if err := srv.ensureRunning(); err != nil {
			t.Errorf("testpg: %v", err)
			return
		}
		if err := srv.DropDatabase(ctx, name); err != nil {
			t.Errorf("testpg: %v", err)
		}
	})
	return srv, srv.DSN(name)
}

func (s *Server) ensureRunning() error {
	s.mu.Lock()
	running := s.cmd != nil
	s.mu.Unlock()
	if running {
		return nil
	}
	return s.Start()
}
