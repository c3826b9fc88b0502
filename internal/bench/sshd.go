package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// sshd is a throwaway OpenSSH server on a free loopback port.
type sshd struct {
	port      string
	clientKey string
	user      string
}

func (e *Env) startSSHD(ctx context.Context) (*sshd, error) {
	if e.sshd != nil {
		return e.sshd, nil
	}
	const path = "/usr/sbin/sshd"
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("OpenSSH server not installed at %s (apt-get install openssh-server): %w", path, err)
	}
	dir := filepath.Join(e.dir, "sshd")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	for _, k := range []string{"host_key", "client_key"} {
		if _, err := runCmd(ctx, 30*time.Second, nil, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", filepath.Join(dir, k)); err != nil {
			return nil, err
		}
	}
	pub, err := os.ReadFile(filepath.Join(dir, "client_key.pub"))
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "authorized_keys"), pub, 0o600); err != nil {
		return nil, err
	}
	if os.Geteuid() == 0 {
		// Privilege separation directory; Debian creates it only from its service unit.
		if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
			return nil, err
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := portOf(ln.Addr().String())
	ln.Close()
	cfg := fmt.Sprintf(`Port %s
ListenAddress 127.0.0.1
HostKey %s
AuthorizedKeysFile %s
PidFile none
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
MaxStartups 100:30:200
LogLevel ERROR
`, port, filepath.Join(dir, "host_key"), filepath.Join(dir, "authorized_keys"))
	cfgPath := filepath.Join(dir, "sshd_config")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	p := &proc{name: "sshd", cmd: command(path, []string{"-D", "-e", "-f", cfgPath}, nil), out: &tail{}, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start sshd: %w", err)
	}
	e.mu.Lock()
	e.procs = append(e.procs, p)
	e.mu.Unlock()
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	if err := waitTCP(ctx, "127.0.0.1:"+port, 30*time.Second); err != nil {
		return nil, fmt.Errorf("sshd: %w\n%s", err, p.out.String())
	}
	user := os.Getenv("USER")
	if user == "" {
		user = "root"
	}
	e.sshd = &sshd{port: port, clientKey: filepath.Join(dir, "client_key"), user: user}
	e.log("sshd pid %d on 127.0.0.1:%s", p.pid(), port)
	return e.sshd, nil
}

// sshArgs are the client options shared by every OpenSSH variant (default ciphers:
// what a user gets without tuning).
func (s *sshd) sshArgs(extra ...string) []string {
	args := []string{"-F", "/dev/null",
		"-o", "BatchMode=yes",
		"-o", "StrictHostKeyChecking=no",
		"-o", "UserKnownHostsFile=/dev/null",
		"-o", "LogLevel=ERROR",
		"-i", s.clientKey,
		"-p", s.port}
	args = append(args, extra...)
	return append(args, s.user+"@127.0.0.1")
}

// sshW is a fresh `ssh -W target` process: ssh's stdio becomes a stream to target
// through sshd, exactly what ProxyCommand="ssh -W %h:%p jump" does.
func (s *sshd) sshW(target string) *exec.Cmd {
	return command("ssh", s.sshArgs("-W", target), nil)
}

// startLocalForward runs `ssh -N -L 127.0.0.1:PORT:target` and returns the local address.
func (e *Env) startLocalForward(ctx context.Context, target string) (string, error) {
	s, err := e.startSSHD(ctx)
	if err != nil {
		return "", err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	local := ln.Addr().String()
	ln.Close()
	args := s.sshArgs("-N", "-o", "ExitOnForwardFailure=yes", "-L", local+":"+target)
	p := &proc{name: "ssh -L", cmd: command("ssh", args, nil), out: &tail{}, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		return "", fmt.Errorf("start ssh -L: %w", err)
	}
	e.mu.Lock()
	e.procs = append(e.procs, p)
	e.mu.Unlock()
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	if err := waitTCP(ctx, local, 30*time.Second); err != nil {
		return "", fmt.Errorf("ssh -L: %w\n%s", err, p.out.String())
	}
	return local, nil
}

// waitTCP polls until addr accepts connections, bounded by within.
func waitTCP(ctx context.Context, addr string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not accept connections within %s: %w", addr, within, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}
