package bench

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// TP's multiplexing peers. tpbench never downloads them: the user builds them from
// their releases or sources and names the binaries (Peers). Each runs with its
// defaults apart from the addresses, certificates and the one proxy it serves.
//
//	ghostunnel: a TLS connection per tunnel, client and server halves, the device's
//	            certificate on the client, tpbench's server certificate on the server
//	chisel:     SSH over WebSocket; each tunnel an SSH channel on the client's open connection
//	frp tcp:    frpc (the agent, beside the service) holds a connection to frps; each
//	            tunnel enters at frps's public port and is a stream on that connection
//	frp stcp:   secret mode: a second frpc (the visitor, on the dialer's side) opens
//	            streams to frps, which pairs them with the agent's by name and key
//	wireguard-go: the userspace WireGuard (go install golang.zx2c4.com/wireguard@latest
//	            builds it as "wireguard"; name it wireguard-go), a tun in each of two
//	            network namespaces: the yardstick of `tp ip` (the ip scenario)
const (
	peerGhostunnel = "ghostunnel"
	peerChisel     = "chisel"
	peerFrps       = "frps"
	peerFrpc       = "frpc"
	peerWireGuard  = "wireguard-go"
)

// peerBinaries are the names --peers DIR looks for.
var peerBinaries = []string{peerGhostunnel, peerChisel, peerFrps, peerFrpc, peerWireGuard}

// Peers names the peer binaries for a run. A field left empty is looked up in Dir
// under its binary's name; without either, that peer's rows say "not given".
type Peers struct {
	Dir        string
	Ghostunnel string
	Chisel     string
	Frps       string
	Frpc       string
	WireGuard  string
}

func (p Peers) explicit() map[string]string {
	return map[string]string{peerGhostunnel: p.Ghostunnel, peerChisel: p.Chisel, peerFrps: p.Frps, peerFrpc: p.Frpc, peerWireGuard: p.WireGuard}
}

// peerSet is what a run has of each peer binary: its path, or why there is none.
type peerSet struct {
	path    map[string]string // binary name → path
	missing map[string]string // binary name → why it is not given
	version map[string]string // binary name → what it says of its version
}

// resolvePeers checks every named binary before anything starts (a path that was
// given but cannot run is an error, not a row that quietly says "not given").
func resolvePeers(p Peers, stat func(string) (fs.FileInfo, error)) (peerSet, error) {
	ps := peerSet{path: map[string]string{}, missing: map[string]string{}, version: map[string]string{}}
	if p.Dir != "" {
		fi, err := stat(p.Dir)
		if err != nil {
			return ps, fmt.Errorf("--peers %s: %w", p.Dir, err)
		}
		if !fi.IsDir() {
			return ps, fmt.Errorf("--peers %s is not a directory", p.Dir)
		}
	}
	var errs []error
	for name, path := range p.explicit() {
		if path != "" {
			if err := executable(stat, path); err != nil {
				errs = append(errs, fmt.Errorf("--%s %s: %w", name, path, err))
				continue
			}
			ps.path[name] = path
			continue
		}
		if p.Dir == "" {
			ps.missing[name] = fmt.Sprintf("not given (--peers DIR or --%s PATH)", name)
			continue
		}
		path = filepath.Join(p.Dir, name)
		switch err := executable(stat, path); {
		case errors.Is(err, fs.ErrNotExist):
			ps.missing[name] = fmt.Sprintf("not given (no %s in %s)", name, p.Dir)
		case err != nil:
			errs = append(errs, fmt.Errorf("--peers %s: %s: %w", p.Dir, name, err))
		default:
			ps.path[name] = path
		}
	}
	return ps, errors.Join(errs...)
}

func executable(stat func(string) (fs.FileInfo, error), path string) error {
	fi, err := stat(path)
	switch {
	case err != nil:
		return err
	case !fi.Mode().IsRegular():
		return errors.New("not a regular file")
	case fi.Mode()&0o111 == 0:
		return errors.New("not executable")
	}
	return nil
}

// why says why a peer that needs these binaries cannot run, or "" when it can.
func (ps peerSet) why(names ...string) string {
	for _, n := range names {
		if w, ok := ps.missing[n]; ok {
			return w
		}
		if _, ok := ps.path[n]; !ok {
			return "not given"
		}
	}
	return ""
}

// notGiven marks rows of a peer whose binaries were not given. They are kept, so
// that a table without the peers says so instead of leaving them out.
func notGiven(r *Row, why string) *variant {
	r.Err = why
	return &variant{rows: []*Row{r}}
}

// probeVersions asks each given binary for its version, for the log and the JSON report.
func (e *Env) probeVersions(ctx context.Context) {
	for _, name := range peerBinaries {
		path, ok := e.peers.path[name]
		if !ok {
			continue
		}
		out, err := runCmd(ctx, 30*time.Second, nil, path, "--version")
		v := versionRe.FindString(firstLine(out))
		if v == "" {
			v = strings.TrimSpace(firstLine(out))
		}
		if err != nil || v == "" {
			v = "unknown version"
		}
		e.peers.version[name] = v
		e.log("peer %s: %s (%s)", name, path, v)
	}
}

// versionRe finds the version in what a peer prints for --version (ghostunnel:
// "rev v1.11.1 built with go1.26.8 (…)", chisel: "v1.11.5", frp: "0.70.1").
var versionRe = regexp.MustCompile(`v?[0-9]+\.[0-9]+(\.[0-9]+)?`)

// peerNote is the note a peer's rows carry: the versions measured.
func (e *Env) peerNote(names ...string) string {
	var parts []string
	for _, n := range names {
		if v := e.peers.version[n]; v != "" {
			parts = append(parts, n+" "+v)
		}
	}
	return strings.Join(parts, ", ")
}

// spawn starts a long-running peer process that the Env stops at the end; its
// output goes to the process's tail, for error messages.
func (e *Env) spawn(label, path string, args ...string) (*proc, error) {
	p := &proc{name: label, cmd: command(path, args, nil), out: &tail{}, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", label, err)
	}
	e.mu.Lock()
	e.procs = append(e.procs, p)
	e.mu.Unlock()
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	return p, nil
}

// reachable polls until a tunnel through addr reaches its destination (the sink
// answers its ready byte, the echo server a byte), bounded by warm's deadline.
// A peer is measured only once a first tunnel went through end to end.
func (e *Env) reachable(addr, target string, procs ...*proc) error {
	err := warm(func() error {
		for _, p := range procs {
			select {
			case <-p.done:
				return fmt.Errorf("%s exited (%v): %s", p.name, p.err, firstLine(lastLine(p.out.String())))
			default:
			}
		}
		if target == e.sink || target == e.csink {
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			var b [1]byte
			if _, err := c.Read(b[:]); err != nil || b[0] != sinkReady {
				return fmt.Errorf("no ready byte from the sink through %s: %v", addr, err)
			}
			return nil
		}
		_, err := roundTrip(addr)
		return err
	})
	if err != nil {
		var out []string
		for _, p := range procs {
			out = append(out, p.name+": "+lastLine(p.out.String()))
		}
		return fmt.Errorf("%w (%s)", err, strings.Join(out, "; "))
	}
	return nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return s
}

// peerChain is a running peer path to one destination: tunnels enter at addr.
type peerChain struct {
	addr           string
	server, client *proc // the processes whose memory scenario 4 reads
}

// ghostunnelChain runs a ghostunnel server in front of target (tpbench's server
// certificate; clients verified against TP's root, as tpd does) and a ghostunnel
// client that dials it with the enrolled device's certificate: a new TLS
// connection per tunnel, like tp forward over TLS.
func (e *Env) ghostunnelChain(ctx context.Context, target string) (peerChain, error) {
	ca, err := e.ca()
	if err != nil {
		return peerChain{}, err
	}
	ports, err := freePorts(2)
	if err != nil {
		return peerChain{}, err
	}
	bin := e.peers.path[peerGhostunnel]
	srvAddr, cliAddr := loopback(ports[0]), loopback(ports[1])
	srv, err := e.spawn("ghostunnel server", bin, "server", "--listen", srvAddr, "--target", target,
		"--cert", ca.certFile, "--key", ca.keyFile, "--cacert", filepath.Join(e.home, "root.pem"), "--allow-all")
	if err != nil {
		return peerChain{}, err
	}
	cli, err := e.spawn("ghostunnel client", bin, "client", "--listen", cliAddr, "--target", srvAddr,
		"--cert", filepath.Join(e.home, "cert.pem"), "--key", filepath.Join(e.home, "key.pem"), "--cacert", ca.rootFile)
	if err != nil {
		return peerChain{}, err
	}
	return peerChain{addr: cliAddr, server: srv, client: cli}, e.reachable(cliAddr, target, srv, cli)
}

// chiselChain runs a chisel server and a chisel client that forwards a local port
// to target: each tunnel is an SSH channel on the client's one connection.
func (e *Env) chiselChain(ctx context.Context, target string) (peerChain, error) {
	ports, err := freePorts(2)
	if err != nil {
		return peerChain{}, err
	}
	bin := e.peers.path[peerChisel]
	srv, err := e.spawn("chisel server", bin, "server", "--host", "127.0.0.1", "--port", strconv.Itoa(ports[0]))
	if err != nil {
		return peerChain{}, err
	}
	if err := waitTCP(ctx, loopback(ports[0]), 30*time.Second); err != nil {
		return peerChain{}, fmt.Errorf("chisel server: %w: %s", err, lastLine(srv.out.String()))
	}
	local := loopback(ports[1])
	cli, err := e.spawn("chisel client", bin, "client", "http://"+loopback(ports[0]), local+":"+target)
	if err != nil {
		return peerChain{}, err
	}
	return peerChain{addr: local, server: srv, client: cli}, e.reachable(local, target, srv, cli)
}

// frpServer is a running frps.
type frpServer struct {
	p    *proc
	port int
}

// sharedFrps is the run's one frps (like tpd, shared by every frp variant).
func (e *Env) sharedFrps(ctx context.Context) (*frpServer, error) {
	if e.frps != nil {
		return e.frps, nil
	}
	s, err := e.startFrps(ctx, "frps")
	if err == nil {
		e.frps = s
	}
	return s, err
}

// startFrps starts an frps with its defaults on a free loopback port.
func (e *Env) startFrps(ctx context.Context, name string) (*frpServer, error) {
	ports, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(e.dir, "frp")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	cfg := filepath.Join(dir, name+".toml")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, "bindAddr = \"127.0.0.1\"\nbindPort = %d\n", ports[0]), 0o600); err != nil {
		return nil, err
	}
	p, err := e.spawn(name, e.peers.path[peerFrps], "-c", cfg)
	if err != nil {
		return nil, err
	}
	if err := waitTCP(ctx, loopback(ports[0]), 30*time.Second); err != nil {
		return nil, fmt.Errorf("%s: %w: %s", name, err, lastLine(p.out.String()))
	}
	e.log("%s pid %d on 127.0.0.1:%d", name, p.pid(), ports[0])
	return &frpServer{p: p, port: ports[0]}, nil
}

// frpChain runs an frpc agent with one proxy per target. With stcp false each
// proxy is frp's `tcp` type: tunnels enter at a public port of frps. With stcp
// true each is frp's `stcp` (secret mode) and a second frpc, the visitor, listens
// for the dialer. It returns the entry address of each target, in order. srv is
// the frps to use; nil means the run's shared one.
func (e *Env) frpChain(ctx context.Context, srv *frpServer, stcp bool, targets ...string) ([]string, peerChain, error) {
	if srv == nil {
		var err error
		if srv, err = e.sharedFrps(ctx); err != nil {
			return nil, peerChain{}, err
		}
	}
	frps, port := srv.p, srv.port
	ports, err := freePorts(len(targets))
	if err != nil {
		return nil, peerChain{}, err
	}
	e.mu.Lock()
	e.frpSeq++
	seq := e.frpSeq
	e.mu.Unlock()
	head := fmt.Sprintf("serverAddr = \"127.0.0.1\"\nserverPort = %d\nloginFailExit = true\n", port)
	agent, visitor := head, head
	addrs := make([]string, len(targets))
	for i, t := range targets {
		host, tport, err := net.SplitHostPort(t)
		if err != nil {
			return nil, peerChain{}, err
		}
		name := fmt.Sprintf("bench%d-%d", seq, i)
		addrs[i] = loopback(ports[i])
		if !stcp {
			agent += fmt.Sprintf("\n[[proxies]]\nname = %q\ntype = \"tcp\"\nlocalIP = %q\nlocalPort = %s\nremotePort = %d\n", name, host, tport, ports[i])
			continue
		}
		key := fmt.Sprintf("tpbench-%d-%d", seq, i)
		agent += fmt.Sprintf("\n[[proxies]]\nname = %q\ntype = \"stcp\"\nsecretKey = %q\nlocalIP = %q\nlocalPort = %s\n", name, key, host, tport)
		visitor += fmt.Sprintf("\n[[visitors]]\nname = %q\ntype = \"stcp\"\nserverName = %q\nsecretKey = %q\nbindAddr = \"127.0.0.1\"\nbindPort = %d\n", name+"-visitor", name, key, ports[i])
	}
	write := func(role, cfg string) (string, error) {
		path := filepath.Join(e.dir, "frp", fmt.Sprintf("frpc-%d-%s.toml", seq, role))
		return path, os.WriteFile(path, []byte(cfg), 0o600)
	}
	agentCfg, err := write("agent", agent)
	if err != nil {
		return nil, peerChain{}, err
	}
	ag, err := e.spawn("frpc agent", e.peers.path[peerFrpc], "-c", agentCfg)
	if err != nil {
		return nil, peerChain{}, err
	}
	pc := peerChain{addr: addrs[0], server: frps, client: ag}
	procs := []*proc{frps, ag}
	if stcp {
		visitorCfg, err := write("visitor", visitor)
		if err != nil {
			return nil, peerChain{}, err
		}
		vis, err := e.spawn("frpc visitor", e.peers.path[peerFrpc], "-c", visitorCfg)
		if err != nil {
			return nil, peerChain{}, err
		}
		procs = append(procs, vis)
	}
	for i, a := range addrs {
		if err := e.reachable(a, targets[i], procs...); err != nil {
			return nil, peerChain{}, err
		}
	}
	return addrs, pc, nil
}

func loopback(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

// peerReport is the JSON report's account of the peers.
func (e *Env) peerReport() map[string]string {
	m := map[string]string{}
	for _, n := range peerBinaries {
		if p, ok := e.peers.path[n]; ok {
			m[n] = p
			if v := e.peers.version[n]; v != "" {
				m[n] += " (" + v + ")"
			}
		} else if w, ok := e.peers.missing[n]; ok {
			m[n] = w
		}
	}
	return m
}
