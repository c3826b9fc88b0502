package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// testPolicy lets alice (and group ops) reach loopback; everyone else is refused
// with a reason that names who they are.
const testPolicy = `package tp.authz

default allow := false

allow if {
	input.action == "dial"
	input.identity.user == "alice"
	input.destination.host == "127.0.0.1"
}

allow if {
	input.action == "dial"
	"ops" in input.identity.groups
}

reason := sprintf("%s:%d is limited to alice and group ops (you: %s, groups: %v)", [
	input.destination.host, input.destination.port, input.identity.device_id, input.identity.groups,
]) if not allow
`

// A race-instrumented tpd (raceTPD) evaluates policy far slower than a release build;
// a production-sized 100 ms bound would turn that into denials these tests are not about.
func init() { os.Setenv("TP_POLICY_TIMEOUT", "5s") }

// sshd is a real OpenSSH server on a free loopback port with throwaway keys.
type sshd struct {
	Port      int
	ClientKey string
	User      string
}

func startSSHD(t *testing.T) *sshd {
	t.Helper()
	return startSSHDIn(t, "")
}

// startSSHDIn is startSSHD in the network namespace ns ("": the test's own).
func startSSHDIn(t *testing.T, ns string) *sshd {
	t.Helper()
	path := "/usr/sbin/sshd"
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("OpenSSH server not installed at %s (apt-get install openssh-server; deploy/test.sh does this, run as root): %v", path, err)
	}
	dir := t.TempDir()
	for _, k := range []string{"host_key", "client_key"} {
		run(t, nil, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", filepath.Join(dir, k))
	}
	pub, err := os.ReadFile(filepath.Join(dir, "client_key.pub"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "authorized_keys"), pub, 0o600); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		// sshd's privilege separation directory; Debian creates it only from its service unit.
		if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
			t.Fatal(err)
		}
	}
	port := testnet.FreePort(t, "tcp")
	cfg := fmt.Sprintf(`Port %d
ListenAddress 127.0.0.1
HostKey %s
AuthorizedKeysFile %s
PidFile none
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
LogLevel ERROR
`, port, filepath.Join(dir, "host_key"), filepath.Join(dir, "authorized_keys"))
	cfgPath := filepath.Join(dir, "sshd_config")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	log := &testlog.Buffer{}
	cmd := command(path, "-D", "-e", "-f", cfgPath)
	if ns != "" {
		cmd = command("ip", "netns", "exec", ns, path, "-D", "-e", "-f", cfgPath)
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("sshd log:\n%s", log.String())
		}
	})
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	if ns == "" {
		waitTCP(t, addr, 30*time.Second)
	} else {
		waitFor(t, 30*time.Second, "sshd listening in "+ns, func() bool {
			var c net.Conn
			inNS(t, ns, func() { c, _ = net.DialTimeout("tcp", addr, time.Second) })
			if c != nil {
				_ = c.Close()
			}
			return c != nil
		})
	}
	user := os.Getenv("USER")
	if user == "" {
		user = "root"
	}
	return &sshd{Port: port, ClientKey: filepath.Join(dir, "client_key"), User: user}
}

// ssh runs OpenSSH's client through `tp %h %p` and returns stdout, stderr.
func (s *sshd) ssh(t *testing.T, env []string, host, command string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := commandContext(ctx, "ssh", "-F", "/dev/null",
		"-o", "BatchMode=yes",
		"-o", "StrictHostKeyChecking=no",
		"-o", "UserKnownHostsFile=/dev/null",
		"-o", "LogLevel=ERROR",
		"-o", "ProxyCommand="+binary("tp")+" %h %p",
		"-i", s.ClientKey,
		"-p", strconv.Itoa(s.Port),
		s.User+"@"+host, command)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr testlog.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

// The product's first promise: dlogin against the real embedded CA, then OpenSSH
// through ProxyCommand="tp %h %p" to a real sshd, running a command.
func TestSSHThroughProxyCommand(t *testing.T) {
	parallel(t)
	srv := startServer(t, testPolicy)
	sd := startSSHD(t)
	env := srv.login(t, "alice", "laptop", "dev")

	stdout, stderr, err := sd.ssh(t, env, "127.0.0.1", "echo hello-$((6*7))")
	if err != nil {
		t.Fatalf("ssh through tp failed: %v\nstderr:\n%s", err, stderr)
	}
	if strings.TrimSpace(stdout) != "hello-42" {
		t.Fatalf("ssh printed %q, want hello-42\nstderr:\n%s", stdout, stderr)
	}
	want := fmt.Sprintf("Connecting to 127.0.0.1:%d via %s", sd.Port, srv.Addr)
	if !strings.Contains(stderr, want) {
		t.Errorf("tp's stderr line missing %q:\n%s", want, stderr)
	}

	// The certificate dlogin wrote lives 4 hours and is for client authentication only.
	home := strings.TrimPrefix(env[0], "TP_HOME=")
	b, err := os.ReadFile(filepath.Join(home, "cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if life := leaf.NotAfter.Sub(leaf.NotBefore); life < 4*time.Hour-2*time.Minute || life > 4*time.Hour+2*time.Minute {
		t.Errorf("certificate lifetime %s, want 4h", life)
	}
	if len(leaf.ExtKeyUsage) != 1 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageClientAuth {
		t.Errorf("certificate ExtKeyUsage %v, want only clientAuth", leaf.ExtKeyUsage)
	}
	for _, f := range []string{"key.pem", "device.key"} {
		fi, err := os.Stat(filepath.Join(home, f))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", f, fi.Mode().Perm())
		}
	}

	// Later logins need no arguments, and tp whoami shows the identity.
	if out := run(t, env, binary("dlogin")); !strings.Contains(out, "Login successful!") {
		t.Errorf("dlogin without arguments:\n%s", out)
	}
	if out := run(t, env, binary("tp"), "whoami"); !strings.Contains(out, "alice@laptop") || !strings.Contains(out, "Expires:") || !strings.Contains(out, "Groups:      dev") {
		t.Errorf("tp whoami:\n%s", out)
	}
}

// A denial reaches the person as the policy's reason on stderr, before ssh gives up.
func TestSSHDeniedShowsPolicyReason(t *testing.T) {
	parallel(t)
	srv := startServer(t, testPolicy)
	sd := startSSHD(t)
	env := srv.login(t, "bob", "phone", "dev")
	_, stderr, err := sd.ssh(t, env, "127.0.0.1", "true")
	if err == nil {
		t.Fatal("ssh succeeded for a user the policy refuses")
	}
	want := fmt.Sprintf("tp: denied by policy: 127.0.0.1:%d is limited to alice and group ops (you: bob@phone, groups: [\"dev\"])", sd.Port)
	if !strings.Contains(stderr, want) {
		t.Fatalf("stderr lacks the policy's reason %q:\n%s", want, stderr)
	}
}

// A destination that refuses the connection is reported with a code and reason,
// not a bare EOF.
func TestDestinationRefused(t *testing.T) {
	parallel(t)
	srv := startServer(t, testPolicy)
	env := srv.login(t, "alice", "laptop")
	port := testnet.FreePort(t, "tcp") // nothing listens here
	out, err := runErr(env, strings.NewReader(""), binary("tp"), "127.0.0.1", strconv.Itoa(port))
	if err == nil {
		t.Fatal("tp succeeded to a closed port")
	}
	if !strings.Contains(out, "could not reach the destination") || !strings.Contains(out, "refused") {
		t.Fatalf("closed destination port: output %q", out)
	}
}

// Client-side failures each print one sentence that says what to do.
func TestClientErrors(t *testing.T) {
	parallel(t)
	srv := startServer(t, testPolicy)

	t.Run("no certificate", func(t *testing.T) {
		env := []string{"TP_HOME=" + filepath.Join(t.TempDir(), "empty")}
		out, err := runErr(env, nil, binary("tp"), "127.0.0.1", "22")
		if err == nil || !strings.Contains(out, "run dlogin") {
			t.Fatalf("tp without any login: err=%v output %q", err, out)
		}
	})
	t.Run("wrong fingerprint", func(t *testing.T) {
		args := srv.enroll(t, "carol", "laptop")
		for i, a := range args {
			if strings.HasPrefix(a, "SHA256:") {
				args[i] = "SHA256:" + strings.Repeat("00", 32)
			}
		}
		env := []string{"TP_HOME=" + filepath.Join(t.TempDir(), "home")}
		out, err := runErr(env, nil, binary("dlogin"), args...)
		if err == nil || !strings.Contains(out, "refusing it") {
			t.Fatalf("dlogin with a wrong fingerprint: err=%v output %q", err, out)
		}
	})
	t.Run("reused token", func(t *testing.T) {
		args := srv.enroll(t, "dave", "laptop")
		env := []string{"TP_HOME=" + filepath.Join(t.TempDir(), "home")}
		run(t, env, binary("dlogin"), args...)
		env2 := []string{"TP_HOME=" + filepath.Join(t.TempDir(), "home2")}
		out, err := runErr(env2, nil, binary("dlogin"), args...)
		if err == nil || !strings.Contains(out, "already used") {
			t.Fatalf("dlogin with a used token: err=%v output %q", err, out)
		}
		// The failed second enrollment did not damage the first device.
		run(t, env, binary("dlogin"))
	})
	t.Run("server unreachable", func(t *testing.T) {
		env := srv.login(t, "erin", "laptop")
		home := strings.TrimPrefix(env[0], "TP_HOME=")
		profile := filepath.Join(home, "profile.json")
		b, err := os.ReadFile(profile)
		if err != nil {
			t.Fatal(err)
		}
		dead := "https://" + testnet.Refusing(t)
		b = []byte(strings.Replace(string(b), srv.URL, dead, 1))
		if err := os.WriteFile(profile, b, 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := runErr(env, nil, binary("tp"), "127.0.0.1", "22")
		if err == nil || !strings.Contains(out, "cannot reach the TP server") {
			t.Fatalf("unreachable server: err=%v output %q", err, out)
		}
	})
}

// 64 MiB each way through `tp forward`, checksummed, with the upload ending in a
// half-close after which the full reply still arrives.
func TestForwardIntegrity(t *testing.T) {
	parallel(t)
	srv := startServer(t, testPolicy)
	env := srv.login(t, "alice", "laptop")
	const size = 64 << 20

	// The destination: reads until EOF, answers with the SHA-256 of what it read,
	// then sends size bytes of random data followed by their SHA-256.
	dst := testnet.Serve(t, func(c *net.TCPConn) {
		h := sha256.New()
		if _, err := io.Copy(h, c); err != nil {
			return
		}
		fmt.Fprintf(c, "%x\n", h.Sum(nil))
		h.Reset()
		w := io.MultiWriter(c, h)
		if _, err := io.CopyN(w, rand.Reader, size); err != nil {
			return
		}
		fmt.Fprintf(c, "%x", h.Sum(nil))
	})

	fwd, _ := startForward(t, env, dst)
	c, err := net.Dial("tcp", fwd)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Minute))
	up := sha256.New()
	if _, err := io.CopyN(io.MultiWriter(c, up), rand.Reader, size); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReaderSize(c, 1<<20)
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("reading the upload checksum after half-close: %v", err)
	}
	if got, want := strings.TrimSpace(line), hex.EncodeToString(up.Sum(nil)); got != want {
		t.Fatalf("upload checksum: destination saw %s, sent %s", got, want)
	}
	down := sha256.New()
	if _, err := io.CopyN(down, r, size); err != nil {
		t.Fatalf("download: %v", err)
	}
	rest, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("download trailer: %v", err)
	}
	if got, want := hex.EncodeToString(down.Sum(nil)), string(rest); got != want {
		t.Fatalf("download checksum: got %s, destination sent %s", got, want)
	}
}

// startForward runs `tp forward [flags] 127.0.0.1:0 target` (TCP, or UDP with
// --udp) until the test ends, and returns the local address it reports and its
// standard error, which is shown when the test fails.
func startForward(t testing.TB, env []string, target string, flags ...string) (string, *testlog.Buffer) {
	t.Helper()
	_, addr, log := startForwardProc(t, env, target, flags...)
	return addr, log
}

// startForwardProc is startForward that also returns the tp forward process,
// for a test that signals it.
func startForwardProc(t testing.TB, env []string, target string, flags ...string) (*exec.Cmd, string, *testlog.Buffer) {
	t.Helper()
	cmd := command(binary("tp"), append(append([]string{"forward"}, flags...), "127.0.0.1:0", target)...)
	cmd.Env = append(os.Environ(), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	log := &testlog.Buffer{}
	t.Cleanup(func() {
		// Ctrl-C, as a person ends it: tp closes its connections, so that
		// tpd's drain at the test's end does not wait on them (a killed
		// tp's QUIC connection stays open at tpd until its idle timeout).
		cmd.Process.Signal(syscall.SIGCONT) // in case the test stopped it
		cmd.Process.Signal(os.Interrupt)
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
			t.Errorf("tp forward did not stop within 10s of Ctrl-C")
		}
		if t.Failed() {
			t.Logf("tp forward log:\n%s", log.String())
		}
	})
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		re := regexp.MustCompile(`^Forwarding (?:UDP )?(\S+) to`)
		for sc.Scan() {
			log.Write([]byte(sc.Text() + "\n"))
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				addr <- m[1]
			}
		}
		close(addr)
	}()
	select {
	case a, ok := <-addr:
		if !ok {
			t.Fatalf("tp forward exited:\n%s", log.String())
		}
		return cmd, a, log
	case <-time.After(60 * time.Second):
		t.Fatalf("tp forward did not start:\n%s", log.String())
	}
	return nil, "", nil
}
