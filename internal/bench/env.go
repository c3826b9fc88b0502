package bench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tp-proxy/tp/clients"
)

// benchPolicy lets every enrolled device dial loopback, the only place tpbench sends traffic.
const benchPolicy = `package tp.authz

default allow := false

allow if {
	input.action == "dial"
	input.destination.host == "127.0.0.1"
}

reason := sprintf("tpbench allows only 127.0.0.1, not %s", [input.destination.host]) if not allow
`

// Env is everything a run starts: binaries, tpd, an enrolled device, servers and
// baselines. Close stops every process it started.
type Env struct {
	dir  string // throwaway root for binaries, data dir, keys
	bin  string
	self string // the tpbench executable, for helper processes
	log  func(format string, args ...any)

	mu    sync.Mutex
	procs []*proc
	stops []func()

	tpd     *proc
	tpdAddr string
	home    string // TP_HOME of the enrolled device

	sink, echo string // in-process servers
	csink      string // the counted sink (servers.go), for tunnels that cannot half-close
	source     string // the source (download.go): sends what it is asked for

	benchCA *benchCA // server certificates for the baselines

	sshd *sshd

	compare string // a directory with older tp, dlogin and tpd binaries (--compare)

	quic      bool // tp forward has --transport
	quicStdio bool // tp HOST PORT has --transport

	reverse     bool   // the reverse scenario runs: reversePolicy, public ports, agent device
	publicPorts []int  // TCP ports tpd may open for tp expose --public
	agentHome   string // TP_HOME of the device that runs tp expose

	peers  peerSet    // the peer binaries given (peers.go)
	frps   *frpServer // the run's one frps, started by the first frp variant
	frpSeq int        // numbers frpc configurations and proxy names

	stress *stressTPD // the tpd of scenarios 8–10 (stress.go), started by the first of them
	ck     string     // the checksum server of scenarios 8–10 (workload.go)
}

func (e *Env) binary(name string) string { return filepath.Join(e.bin, name) }

func (e *Env) tpEnv() []string { return []string{"TP_HOME=" + e.home} }

// Close stops every process in reverse start order and removes the temp dir.
func (e *Env) Close() {
	e.mu.Lock()
	procs, stops := e.procs, e.stops
	e.procs, e.stops = nil, nil
	e.mu.Unlock()
	for i := len(stops) - 1; i >= 0; i-- {
		stops[i]()
	}
	for i := len(procs) - 1; i >= 0; i-- {
		procs[i].stop()
	}
	if e.dir != "" {
		os.RemoveAll(e.dir)
	}
}

func (e *Env) onClose(f func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.stops = append(e.stops, f)
}

// moduleRoot is the directory of the main module's go.mod.
func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("run tpbench inside the TP module (go run ./cmd/tpbench)")
	}
	return filepath.Dir(gomod), nil
}

// build compiles tpd, tp and dlogin without -race into the temp dir.
func (e *Env) build(ctx context.Context) error {
	root, err := moduleRoot(ctx)
	if err != nil {
		return err
	}
	e.bin = filepath.Join(e.dir, "bin")
	start := time.Now()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", e.bin+string(os.PathSeparator), "./cmd/tpd", "./cmd/tp", "./cmd/dlogin")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/tpd ./cmd/tp ./cmd/dlogin: %w\n%s", err, out)
	}
	e.log("built tpd, tp and dlogin in %s", time.Since(start).Round(time.Millisecond))
	return nil
}

// reversePolicy is added (as a second file) when the reverse or http scenario
// runs: the agent device (user benchrev) may register names, open public ports
// and hold reverse HTTP names (http), and the bench device may dial every
// reverse name.
const reversePolicy = `package tp.authz

allow if {
	input.action in {"listen", "expose_public", "expose_http"}
	input.identity.user == "benchrev"
}

allow if {
	input.action == "dial"
	input.destination.reverse != ""
	input.identity.user == "bench"
}
`

// startTPD initialises a throwaway data dir with benchPolicy and serves on a free
// loopback port, then enrolls a device with the real dlogin. With e.reverse it
// also allows reverse listeners (reversePolicy), opens e.publicPorts and enrolls
// the agent device.
func (e *Env) startTPD(ctx context.Context) error {
	data := filepath.Join(e.dir, "tpdata")
	if _, err := runCmd(ctx, time.Minute, nil, e.binary("tpd"), "init", "--data-dir", data); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(data, "policy", "tp.rego"), []byte(benchPolicy), 0o600); err != nil {
		return err
	}
	// One enrolled device opens every tunnel of the capacity scenarios (1000s at
	// once): lift the bound per device, which would refuse them past 512.
	env := []string{"TP_MAX_SESSIONS_PER_IDENTITY=1000000"}
	if e.reverse {
		if err := os.WriteFile(filepath.Join(data, "policy", "reverse.rego"), []byte(reversePolicy), 0o600); err != nil {
			return err
		}
		ports := make([]string, len(e.publicPorts))
		for i, p := range e.publicPorts {
			ports[i] = strconv.Itoa(p)
		}
		env = append(env, "TP_PUBLIC_PORTS="+strings.Join(ports, ","))
	}
	listening := regexp.MustCompile(`listening on (\S+) \(`)
	cmd := command(e.binary("tpd"), []string{"serve", "--data-dir", data, "--listen", "127.0.0.1:0"}, env)
	var addr string
	p, err := e.startProc(ctx, "tpd", cmd, false, time.Minute, func(line string) bool {
		if m := listening.FindStringSubmatch(line); m != nil {
			addr = m[1]
		}
		return strings.HasPrefix(line, "CA fingerprint: ")
	})
	if err != nil {
		return err
	}
	e.tpd, e.tpdAddr = p, addr
	e.home = filepath.Join(e.dir, "tp-home")
	if err := e.enroll(ctx, data, "bench", "tpbench", "bench", e.home); err != nil {
		return err
	}
	if e.reverse {
		e.agentHome = filepath.Join(e.dir, "tp-home-agent")
		if err := e.enroll(ctx, data, "benchrev", "agent", "benchrev", e.agentHome); err != nil {
			return err
		}
	}
	e.log("tpd pid %d on %s; device enrolled in %s", p.pid(), addr, e.home)
	return nil
}

// tpdExited says, once the bench's own tpd has exited, that it did and how
// (nil while it runs, or when none was started).
func (e *Env) tpdExited() error {
	if e.tpd == nil {
		return nil
	}
	select {
	case <-e.tpd.done:
		return fmt.Errorf("the bench's tpd exited (%v), so nothing more can be measured through it; the end of its log:\n%s", e.tpd.err, e.tpd.out.String())
	default:
		return nil
	}
}

// startFreshTPD starts another tpd, with a data dir of its own under name, the
// bench policy and the per-device bound lifted, and enrolls a device for it: a
// server that has served nothing yet, like the peers' servers a scenario starts.
// It returns the tpd and the device's TP_HOME.
func (e *Env) startFreshTPD(ctx context.Context, name string) (*proc, string, error) {
	return e.startFreshTPDWith(ctx, e.binary("tpd"), name)
}

// startFreshTPDWith is startFreshTPD with the tpd binary bin (one of --compare's).
func (e *Env) startFreshTPDWith(ctx context.Context, bin, name string) (*proc, string, error) {
	data := filepath.Join(e.dir, name+"-data")
	if _, err := runCmd(ctx, time.Minute, nil, bin, "init", "--data-dir", data); err != nil {
		return nil, "", err
	}
	if err := os.WriteFile(filepath.Join(data, "policy", "tp.rego"), []byte(benchPolicy), 0o600); err != nil {
		return nil, "", err
	}
	cmd := command(bin, []string{"serve", "--data-dir", data, "--listen", "127.0.0.1:0"}, []string{"TP_MAX_SESSIONS_PER_IDENTITY=1000000"})
	p, err := e.startProc(ctx, "tpd ("+name+")", cmd, false, time.Minute, func(line string) bool {
		return strings.HasPrefix(line, "CA fingerprint: ")
	})
	if err != nil {
		return nil, "", err
	}
	home := filepath.Join(e.dir, name+"-home")
	if err := e.enroll(ctx, data, "bench", name, "bench", home); err != nil {
		return nil, "", err
	}
	e.log("tpd (%s) pid %d; device enrolled in %s", name, p.pid(), home)
	return p, home, nil
}

// enroll enrolls user's device with tpd enroll and the real dlogin into home.
func (e *Env) enroll(ctx context.Context, data, user, device, groups, home string) error {
	out, err := runCmd(ctx, time.Minute, nil, e.binary("tpd"), "enroll", user, "--device", device, "--groups", groups, "--data-dir", data)
	if err != nil {
		return err
	}
	var dl []string
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "dlogin ") {
			dl = strings.Fields(line)[1:]
		}
	}
	if dl == nil {
		return fmt.Errorf("tpd enroll printed no dlogin line:\n%s", out)
	}
	if out, err := runCmd(ctx, 2*time.Minute, []string{"TP_HOME=" + home}, e.binary("dlogin"), dl...); err != nil {
		return err
	} else if !strings.Contains(out, "Login successful!") {
		return fmt.Errorf("dlogin did not report success:\n%s", out)
	}
	return nil
}

// deviceTLS is the enrolled device's client certificate and TP's root.
func (e *Env) deviceTLS() (tls.Certificate, *x509.CertPool, error) {
	h := clients.Home{Dir: e.home}
	cert, err := h.Certificate()
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	root, err := h.Root()
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(root)
	return cert, pool, nil
}

// tlsArgs pins tp to the TLS transport once tp has --transport (its default,
// auto, prefers QUIC).
func (e *Env) tlsArgs() []string {
	if e.quic {
		return []string{"--transport", "tls"}
	}
	return nil
}

// forwardRe matches tp forward's ready line.
var forwardRe = regexp.MustCompile(`^Forwarding (\S+) to`)

// startForward runs `tp forward 127.0.0.1:0 target [extra…]` and returns its address.
func (e *Env) startForward(ctx context.Context, target string, extra ...string) (string, *proc, error) {
	return e.startForwardAs(ctx, e.home, target, extra...)
}

// startForwardAs is startForward as the device enrolled in home.
func (e *Env) startForwardAs(ctx context.Context, home, target string, extra ...string) (string, *proc, error) {
	return e.startForwardWith(ctx, e.binary("tp"), home, target, extra...)
}

// startForwardWith is startForwardAs with the tp binary bin (one of --compare's).
func (e *Env) startForwardWith(ctx context.Context, bin, home, target string, extra ...string) (string, *proc, error) {
	args := append([]string{"forward"}, extra...)
	args = append(args, "127.0.0.1:0", target)
	var addr string
	p, err := e.startProc(ctx, "tp forward", command(bin, args, []string{"TP_HOME=" + home}), true, time.Minute, func(line string) bool {
		if m := forwardRe.FindStringSubmatch(line); m != nil {
			addr = m[1]
			return true
		}
		return false
	})
	return addr, p, err
}

// hasTransportFlag reports whether `tp [sub] --help` offers --transport (QUIC).
func (e *Env) hasTransportFlag(ctx context.Context, sub ...string) bool {
	out, _ := runCmd(ctx, 30*time.Second, e.tpEnv(), e.binary("tp"), append(sub, "--help")...)
	return strings.Contains(out, "--transport")
}

// startHelper runs tpbench itself in a helper role (see helper.go) and returns the
// address it printed.
func (e *Env) startHelper(ctx context.Context, role string, args ...string) (string, *proc, error) {
	var addr string
	all := append([]string{helperArg, role}, args...)
	p, err := e.startProc(ctx, "helper "+role, command(e.self, all, nil), false, 30*time.Second, func(line string) bool {
		if m := addrRe.FindStringSubmatch(line); m != nil {
			addr = m[1]
			return true
		}
		return false
	})
	return addr, p, err
}

// relayChain starts the minimal Go mTLS relay (server and client halves) in front
// of target and returns the client half's plain TCP address and the server's proc.
func (e *Env) relayChain(ctx context.Context, target string) (string, *proc, *proc, error) {
	ca, err := e.ca()
	if err != nil {
		return "", nil, nil, err
	}
	srvAddr, srv, err := e.startHelper(ctx, "relay-server", "-cert", ca.certFile, "-key", ca.keyFile,
		"-client-ca", filepath.Join(e.home, "root.pem"), "-target", target)
	if err != nil {
		return "", nil, nil, err
	}
	cliAddr, cli, err := e.startHelper(ctx, "relay-client", "-cert", filepath.Join(e.home, "cert.pem"),
		"-key", filepath.Join(e.home, "key.pem"), "-root", ca.rootFile, "-server", srvAddr)
	if err != nil {
		return "", nil, nil, err
	}
	return cliAddr, srv, cli, nil
}

func (e *Env) ca() (*benchCA, error) {
	if e.benchCA != nil {
		return e.benchCA, nil
	}
	ca, err := newBenchCA(filepath.Join(e.dir, "bench-ca"))
	if err != nil {
		return nil, err
	}
	e.benchCA = ca
	return ca, nil
}

func portOf(addr string) string {
	i := strings.LastIndexByte(addr, ':')
	return addr[i+1:]
}

func atoi(s string) int { n, _ := strconv.Atoi(s); return n }
