package e2e

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// The recipes in the README and docs/ are run here exactly as written: each
// command of the page's sh block goes to one bash, in a network and mount
// namespace of its own (so that 127.0.0.1:8443 and :22 are the recipe's, and
// "~" is a fresh directory bind-mounted over the user's home, which OpenSSH
// reads from the password database rather than $HOME).

// docCommands returns the commands of the nth (from 1) ```sh block after the
// line heading in the repository file name: one per line, a here-document whole.
func docCommands(t *testing.T, name, heading string, nth int) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "..", name))
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	i := strings.Index(text, "\n"+heading+"\n")
	if i < 0 {
		t.Fatalf("%s has no heading %q: the test runs that section's commands", name, heading)
	}
	text = text[i+len(heading)+2:]
	for range nth {
		start := strings.Index(text, "```sh\n")
		if start < 0 {
			t.Fatalf("%s: no ```sh block number %d under %q", name, nth, heading)
		}
		text = text[start+len("```sh\n"):]
	}
	end := strings.Index(text, "```\n")
	if end < 0 {
		t.Fatalf("%s: the sh block under %q does not end", name, heading)
	}
	var cmds []string
	lines := strings.Split(strings.TrimSuffix(text[:end], "\n"), "\n")
	for k := 0; k < len(lines); k++ {
		line := lines[k]
		if strings.TrimSpace(line) == "" || strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		if m := regexp.MustCompile(`<<'?(\w+)'?`).FindStringSubmatch(line); m != nil {
			body := []string{line}
			for k++; k < len(lines) && lines[k] != m[1]; k++ {
				body = append(body, lines[k])
			}
			if k == len(lines) {
				t.Fatalf("%s: the here-document %q under %q does not end", name, m[1], heading)
			}
			line = strings.Join(append(body, m[1]), "\n")
		}
		cmds = append(cmds, line)
	}
	return cmds
}

// nsShell is a bash in namespaces of its own that runs commands one at a time.
type nsShell struct {
	cmd   *exec.Cmd
	cmds  io.WriteCloser // the shell's descriptor 3
	mu    sync.Mutex
	lines []string
	more  chan struct{} // signalled after each line
	steps int
}

// startNSShell starts bash in a new network and mount namespace with loopback
// up and home (a directory of the test) mounted over the user's home
// directory, which is also HOME; the binaries under test are first on PATH.
func startNSShell(t *testing.T, home string) *nsShell {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the documentation's recipes run in namespaces of their own, which needs root (deploy/test.sh runs as root)")
	}
	u, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	s := &nsShell{more: make(chan struct{}, 1)}
	// Commands arrive on descriptor 3, each ended by a NUL, and run in this
	// shell (so that cd, variables and background jobs carry over) with
	// standard input from /dev/null, as from a terminal where nobody types.
	loop := `n=0; while IFS= read -r -d '' c <&3; do eval "$c" 3<&-; s=$?; n=$((n+1)); echo "@@step-$n-exit=$s"; done`
	s.cmd = command("unshare", "--mount", "--net", "--propagation", "private", "--", "bash", "--noprofile", "--norc", "-c", loop)
	s.cmd.SysProcAttr.Setpgid = true
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "TP_HOME=") && !strings.HasPrefix(kv, "HOME=") && !strings.HasPrefix(kv, "PATH=") {
			env = append(env, kv)
		}
	}
	s.cmd.Env = append(env, "HOME="+u.HomeDir, "PATH="+bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	cr, cw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmds = cw
	s.cmd.ExtraFiles = []*os.File{cr}
	r, w := io.Pipe()
	s.cmd.Stdout, s.cmd.Stderr = w, w
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	cr.Close()
	go func() {
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			s.mu.Lock()
			s.lines = append(s.lines, sc.Text())
			s.mu.Unlock()
			select {
			case s.more <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() {
		// The shell's background jobs (tpd serve, sshd) share its group.
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		cw.Close()
		_ = s.cmd.Wait()
		w.Close()
		if t.Failed() {
			t.Logf("the shell's output:\n%s", s.output(0))
		}
	})
	s.run(t, "set up the namespace", "ip link set lo up && mount --bind "+home+" "+u.HomeDir+" && cd", "")
	return s
}

// output returns the lines from the nth on.
func (s *nsShell) output(from int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if from > len(s.lines) {
		return ""
	}
	return strings.Join(s.lines[from:], "\n")
}

// waitFor waits until a line from the nth on contains want; it returns the
// index after that line.
func (s *nsShell) waitFor(t *testing.T, what, want string, from int, within time.Duration) int {
	t.Helper()
	deadline := time.After(within)
	for {
		s.mu.Lock()
		for i := from; i < len(s.lines); i++ {
			if strings.Contains(s.lines[i], want) {
				s.mu.Unlock()
				return i + 1
			}
		}
		s.mu.Unlock()
		select {
		case <-s.more:
		case <-deadline:
			t.Fatalf("%s: %q did not appear within %s; the output since:\n%s", what, want, within, s.output(from))
		}
	}
}

// run runs command in the shell and fails the test unless it exits 0. A
// command that ends in "&" must say in its comment what it prints when ready
// (`prints "…" when ready`); run then waits for that line. It returns the
// command's output.
func (s *nsShell) run(t *testing.T, what, command, ready string) string {
	t.Helper()
	s.steps++
	s.mu.Lock()
	from := len(s.lines)
	s.mu.Unlock()
	marker := fmt.Sprintf("@@step-%d-exit", s.steps)
	if _, err := fmt.Fprintf(s.cmds, "%s\x00", command); err != nil {
		t.Fatalf("%s: writing to the shell: %v", what, err)
	}
	end := s.waitFor(t, what, marker+"=", from, 3*time.Minute)
	out := s.output(from)
	last := strings.Split(s.output(end-1), "\n")[0]
	if !strings.HasSuffix(last, marker+"=0") {
		t.Fatalf("%s failed (%s):\n%s\n%s", what, strings.TrimPrefix(last, marker+"="), command, out)
	}
	if ready != "" {
		s.waitFor(t, what, ready, from, 2*time.Minute)
	}
	return out
}

// runDoc runs the commands as written, in order, and returns their outputs.
func (s *nsShell) runDoc(t *testing.T, cmds []string) []string {
	t.Helper()
	readyRE := regexp.MustCompile(`prints "([^"]+)" when ready`)
	var outs []string
	for i, c := range cmds {
		code, comment, _ := strings.Cut(c, "#")
		if strings.Contains(c, "\n") {
			code, comment, _ = strings.Cut(strings.SplitN(c, "\n", 2)[0], "#")
		}
		ready := ""
		if strings.HasSuffix(strings.TrimSpace(code), "&") {
			m := readyRE.FindStringSubmatch(comment)
			if m == nil {
				t.Fatalf("command %d starts a background job but its comment does not say what it prints when ready: %s", i+1, c)
			}
			ready = m[1]
		}
		outs = append(outs, s.run(t, fmt.Sprintf("command %d (%s)", i+1, strings.TrimSpace(code)), c, ready))
	}
	return outs
}

// The README's first ssh: five commands, from nothing to OpenSSH through TP.
func TestReadmeFirstSSH(t *testing.T) {
	parallel(t)
	cmds := docCommands(t, "README.md", "## A first ssh, on one machine", 1)
	if len(cmds) != 5 {
		t.Fatalf("the README's first ssh has %d commands; it promises five:\n%s", len(cmds), strings.Join(cmds, "\n"))
	}
	home := t.TempDir()
	sshdConfig := sshHome(t, home)
	sh := startNSShell(t, home)
	sh.startSSHD(t, sshdConfig)

	outs := sh.runDoc(t, cmds)
	last := outs[len(outs)-1]
	if !strings.Contains(last, "hello through TP") {
		t.Errorf("the ssh session did not print its greeting:\n%s", last)
	}
	if !strings.Contains(last, "Connecting to 127.0.0.1:22 via 127.0.0.1:8443") {
		t.Errorf("tp did not say where it connected:\n%s", last)
	}
	if !strings.Contains(outs[3], "Login successful!") {
		t.Errorf("enroll and dlogin:\n%s", outs[3])
	}
}

// docs/IP.md's recipe: three namespaces, tpd with ip-tunnel, tp ip, and a
// ping through the tunnel; then its undo block.
func TestIPDocOneMachine(t *testing.T) {
	parallel(t)
	recipe := docCommands(t, "docs/IP.md", "## Trying it on one machine", 1)
	undo := docCommands(t, "docs/IP.md", "## Trying it on one machine", 2)
	sh := startNSShell(t, t.TempDir())
	// The recipe's namespace names are fixed; a directory of this shell's own
	// keeps them apart from every other test's.
	sh.run(t, "private namespace names", "mkdir -p /run/netns && mount -t tmpfs tmpfs /run/netns", "")
	outs := sh.runDoc(t, recipe)
	if last := outs[len(outs)-1]; !strings.Contains(last, "3 received") {
		t.Errorf("the ping through the tunnel:\n%s", last)
	}
	sh.runDoc(t, undo)
	if out := sh.run(t, "list namespaces", "ip netns list", ""); strings.Contains(out, "tp-") {
		t.Errorf("the undo block left namespaces behind:\n%s", out)
	}
}

// sshHome makes the machine the README assumes: home/.ssh holds a user key
// that an sshd knows and that sshd's host key in known_hosts, as for a user
// who has met it before. It returns the sshd's configuration, for 127.0.0.1:22.
func sshHome(t *testing.T, home string) string {
	t.Helper()
	etc := t.TempDir()
	ssh := filepath.Join(home, ".ssh")
	if err := os.MkdirAll(ssh, 0o700); err != nil {
		t.Fatal(err)
	}
	run(t, nil, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", filepath.Join(ssh, "id_ed25519"))
	run(t, nil, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", filepath.Join(etc, "host_key"))
	pub, err := os.ReadFile(filepath.Join(ssh, "id_ed25519.pub"))
	if err != nil {
		t.Fatal(err)
	}
	hostPub, err := os.ReadFile(filepath.Join(etc, "host_key.pub"))
	if err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(etc, "sshd_config")
	for name, b := range map[string][]byte{
		filepath.Join(etc, "authorized_keys"): pub,
		filepath.Join(ssh, "known_hosts"):     []byte("127.0.0.1 " + string(hostPub)),
		config: []byte(fmt.Sprintf(`ListenAddress 127.0.0.1:22
HostKey %s
AuthorizedKeysFile %s
PidFile none
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
LogLevel ERROR
`, filepath.Join(etc, "host_key"), filepath.Join(etc, "authorized_keys"))),
	} {
		if err := os.WriteFile(name, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil { // sshd's privilege separation directory
		t.Fatal(err)
	}
	return config
}

// startSSHD runs sshd with config in the shell's namespace and waits for it.
func (s *nsShell) startSSHD(t *testing.T, config string) {
	t.Helper()
	s.run(t, "start sshd", "/usr/sbin/sshd -D -e -f "+config+" &", "")
	s.run(t, "wait for sshd", "for i in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null && break; sleep 0.1; done", "")
}

// docs/SCALE.md's step by step: two tpd on one PostgreSQL database, a token
// from one redeemed on the other, ssh through the second, a revocation on the
// first seen by the second.
func TestScaleDocTwoInstances(t *testing.T) {
	parallel(t)
	cmds := docCommands(t, "docs/SCALE.md", "## Step by step: two instances on one machine", 1)
	bin, err := testpg.BinDir()
	if err != nil {
		t.Fatal(err)
	}
	home := t.TempDir()
	sshdConfig := sshHome(t, home)
	// The database the page assumes, on 127.0.0.1:5432 of the shell's
	// namespace, run as PostgreSQL's own user from a directory it can reach.
	pg, err := os.MkdirTemp("/tmp", "tp-scale-pg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(pg) })
	if err := os.WriteFile(filepath.Join(home, "tp-db-password"), []byte("tp-doc-password\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	sh := startNSShell(t, home)
	sh.startSSHD(t, sshdConfig)
	sh.run(t, "make the database", strings.Join([]string{
		"chown " + testpg.User + " " + pg,
		"runuser -u " + testpg.User + " -- " + bin + "/initdb -D " + pg + "/data -U postgres --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C --no-sync >/dev/null",
		"(runuser -u " + testpg.User + " -- " + bin + "/postgres -D " + pg + "/data -c listen_addresses=127.0.0.1 -p 5432 -c unix_socket_directories=" + pg + " -c fsync=off >" + pg + "/log 2>&1 &)",
		"for i in $(seq 600); do " + bin + "/pg_isready -q -h " + pg + " -p 5432 && break; sleep 0.1; done",
		bin + "/psql -q -h " + pg + " -p 5432 -U postgres -c \"CREATE ROLE tp LOGIN PASSWORD 'tp-doc-password'\" -c 'CREATE DATABASE tp OWNER tp'",
	}, " && "), "")
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(pg, "log"))
			t.Logf("PostgreSQL's log:\n%s", b)
		}
	})

	outs := sh.runDoc(t, cmds)
	if ssh := outs[len(outs)-3]; !strings.Contains(ssh, "hello through B") || !strings.Contains(ssh, "via 127.0.0.1:8444") {
		t.Errorf("ssh through B:\n%s", ssh)
	}
	if users := outs[len(outs)-1]; !strings.Contains(users, "revoked") {
		t.Errorf("B does not show the device A revoked:\n%s", users)
	}
}
