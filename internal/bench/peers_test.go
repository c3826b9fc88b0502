package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"io/fs"
	"net"
	"strings"
	"testing"
	"testing/fstest"
)

// statIn stats absolute paths in a MapFS, standing in for os.Stat.
func statIn(m fstest.MapFS) func(string) (fs.FileInfo, error) {
	return func(p string) (fs.FileInfo, error) { return fs.Stat(m, strings.TrimPrefix(p, "/")) }
}

func TestResolvePeers(t *testing.T) {
	exe := &fstest.MapFile{Mode: 0o755}
	tree := fstest.MapFS{
		"peers/ghostunnel": exe,
		"peers/chisel":     exe,
		"peers/frps":       exe,
		"peers/frpc":       {Mode: 0o644}, // built, but not executable
		"only/frps":        exe,
		"bin/my-frpc":      exe,
		"bin/notes.txt":    {Mode: 0o644},
		"bin/adir/x":       exe,
	}
	for _, tc := range []struct {
		name    string
		p       Peers
		err     string            // a substring of the error; "" for none
		path    map[string]string // binaries expected found
		missing map[string]string // substrings of the expected reasons
	}{
		{name: "nothing given: every peer says how to give it", p: Peers{},
			missing: map[string]string{"ghostunnel": "--ghostunnel PATH", "chisel": "--chisel PATH", "frps": "--frps PATH", "frpc": "--frpc PATH"}},
		{name: "a directory with only frps", p: Peers{Dir: "/only"},
			path:    map[string]string{"frps": "/only/frps"},
			missing: map[string]string{"ghostunnel": "no ghostunnel in /only", "chisel": "no chisel in /only", "frpc": "no frpc in /only"}},
		{name: "a flag overrides the directory's non-executable frpc", p: Peers{Dir: "/peers", Frpc: "/bin/my-frpc"},
			path: map[string]string{"ghostunnel": "/peers/ghostunnel", "chisel": "/peers/chisel", "frps": "/peers/frps", "frpc": "/bin/my-frpc"}},
		{name: "a non-executable binary in the directory is an error", p: Peers{Dir: "/peers"}, err: "frpc: not executable"},
		{name: "a missing directory is an error", p: Peers{Dir: "/nowhere"}, err: "--peers /nowhere"},
		{name: "a file given as the directory is an error", p: Peers{Dir: "/bin/notes.txt"}, err: "not a directory"},
		{name: "a named binary that does not exist is an error", p: Peers{Chisel: "/bin/chisel"}, err: "--chisel /bin/chisel"},
		{name: "a named binary that is a text file is an error", p: Peers{Frps: "/bin/notes.txt"}, err: "--frps /bin/notes.txt: not executable"},
		{name: "a named binary that is a directory is an error", p: Peers{Ghostunnel: "/bin/adir"}, err: "not a regular file"},
	} {
		ps, err := resolvePeers(tc.p, statIn(tree))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: %+v gave error %v, want one containing %q", tc.name, tc.p, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %+v: %v", tc.name, tc.p, err)
			continue
		}
		for _, n := range peerBinaries {
			got, want := ps.path[n], tc.path[n]
			if got != want {
				t.Errorf("%s: path of %s = %q, want %q", tc.name, n, got, want)
			}
			if want == "" && !strings.Contains(ps.missing[n], tc.missing[n]) || want == "" && !strings.HasPrefix(ps.missing[n], "not given") {
				t.Errorf("%s: reason for %s = %q, want \"not given …%s…\"", tc.name, n, ps.missing[n], tc.missing[n])
			}
		}
	}
}

func TestPeerSetWhy(t *testing.T) {
	ps, err := resolvePeers(Peers{Dir: "/only"}, statIn(fstest.MapFS{"only/frps": {Mode: 0o755}}))
	if err != nil {
		t.Fatal(err)
	}
	if w := ps.why(peerFrps); w != "" {
		t.Errorf("frps was given, yet why = %q", w)
	}
	// frp needs both halves: the missing one is named.
	if w := ps.why(peerFrps, peerFrpc); !strings.Contains(w, "no frpc") {
		t.Errorf("frp without frpc: why = %q, want it to name frpc", w)
	}
	if w := (peerSet{}).why(peerChisel); w != "not given" {
		t.Errorf("an empty set: why = %q, want \"not given\"", w)
	}
}

func TestParseOpen(t *testing.T) {
	for _, tc := range []struct {
		line string
		room int
		addr string
		n    int
		err  string
	}{
		{"open 127.0.0.1:80 1000", 5000, "127.0.0.1:80", 1000, ""},
		{"open 127.0.0.1:80 0", 5000, "", 0, "bad count"},
		{"open 127.0.0.1:80 -3", 5000, "", 0, "bad count"},
		{"open 127.0.0.1:80 many", 5000, "", 0, "bad count"},
		{"open 127.0.0.1:80 1001", 1000, "", 0, "exceed"},
		{"open 127.0.0.1 10", 5000, "", 0, "bad address"},
		{"close 127.0.0.1:80 10", 5000, "", 0, "bad command"},
		{"open 127.0.0.1:80", 5000, "", 0, "bad command"},
		{"", 5000, "", 0, "bad command"},
	} {
		addr, n, err := parseOpen(tc.line, tc.room)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("parseOpen(%q, %d) = %q, %d, %v; want an error containing %q", tc.line, tc.room, addr, n, err, tc.err)
			}
			continue
		}
		if err != nil || addr != tc.addr || n != tc.n {
			t.Errorf("parseOpen(%q, %d) = %q, %d, %v; want %q, %d", tc.line, tc.room, addr, n, err, tc.addr, tc.n)
		}
	}
}

// A row's note and a peer's "not given" reach both printed forms of the table.
func TestTableShowsNotesAndNotGiven(t *testing.T) {
	rows := []Row{
		{Scenario: "3 handshake", Variant: "tpd, resumed", Transport: "tls", Unit: "/s", Runs: []float64{10}, Note: "only 40% resumed"},
		{Scenario: "1 bulk forward", Variant: peerGhostName, Transport: "tls", Unit: "MB/s", Err: "not given (--peers DIR or --ghostunnel PATH)"},
		{Scenario: "1 bulk forward", Variant: "a | b", Transport: "tls", Unit: "MB/s", Runs: []float64{1}, Note: "x|y"},
	}
	for i := range rows {
		rows[i].summarise()
	}
	for _, md := range []bool{false, true} {
		var b bytes.Buffer
		if err := WriteTable(&b, rows, md); err != nil {
			t.Fatal(err)
		}
		out := b.String()
		for _, want := range []string{"only 40% resumed", "not given", "--ghostunnel PATH", "NOTE"} {
			if md && want == "NOTE" {
				want = "| note |"
			}
			if !strings.Contains(out, want) {
				t.Errorf("markdown=%v: table lacks %q:\n%s", md, want, out)
			}
		}
		if md {
			// A "|" inside a cell must not split it into two columns.
			for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
				if got := strings.Count(line, "|") - strings.Count(line, `\|`); got != len(header)+1 {
					t.Errorf("markdown line has %d cell borders, want %d: %s", got, len(header)+1, line)
				}
			}
		}
	}
}

// A peer binary that was named but cannot run stops the run before anything is
// built or started.
func TestRunRefusesAMissingPeerBinary(t *testing.T) {
	var out bytes.Buffer
	err := Run(context.Background(), Options{Only: []string{"bulk"}, Peers: Peers{Frps: "/nonexistent/frps"}, Stdout: &out, Stderr: &out})
	if err == nil || !strings.Contains(err.Error(), "--frps /nonexistent/frps") {
		t.Fatalf("Run with --frps /nonexistent/frps: %v, want an error naming the flag", err)
	}
	if strings.Contains(out.String(), "built") {
		t.Errorf("Run built binaries before refusing: %s", out.String())
	}
}

func TestVersionRe(t *testing.T) {
	for out, want := range map[string]string{
		"rev v1.11.1 built with go1.26.8 (pkcs11: false, keychain: false)": "v1.11.1",
		"v1.11.5":        "v1.11.5",
		"0.70.1":         "0.70.1",
		"rev master":     "",
		"chisel 2.3 dev": "2.3",
	} {
		if got := versionRe.FindString(out); got != want {
			t.Errorf("version in %q = %q, want %q", out, got, want)
		}
	}
}

// bulkOnce reaches the full count through the counted sink without a half-close,
// and through the sink with one; a count that falls short is an error.
func TestBulkOnceCountedSink(t *testing.T) {
	listen := func(h func(net.Conn)) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(serve(ln, h))
		return ln.Addr().String()
	}
	sink, csink := listen(sinkHandler), listen(countedSinkHandler)
	const size = 3<<20 + 17 // not a multiple of the chunk
	for _, tc := range []struct {
		addr    string
		counted bool
	}{{sink, false}, {csink, true}} {
		if v, err := bulkOnce(func() (*stream, error) { return tcpStream(tc.addr) }, size, tc.counted); err != nil || len(v) != 1 || v[0] <= 0 {
			t.Errorf("bulkOnce(counted=%v) = %v, %v; want one positive rate", tc.counted, v, err)
		}
	}
	// A stream that ends early: the counted sink acknowledges what it got, and
	// bulkOnce reports the shortfall.
	short := func() (*stream, error) {
		s, err := tcpStream(csink)
		if err != nil {
			return nil, err
		}
		w := s.w
		s.w = writerFunc(func(p []byte) (int, error) {
			if len(p) == 8 { // the count: claim one byte less than will be sent
				var hdr [8]byte
				binary.BigEndian.PutUint64(hdr[:], size-1)
				return w.Write(hdr[:])
			}
			return w.Write(p)
		})
		return s, nil
	}
	if _, err := bulkOnce(short, size, true); err == nil || !strings.Contains(err.Error(), "received") {
		t.Errorf("a count one byte short of the bytes sent: %v, want an error saying what the sink received", err)
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// The idle holder opens tunnels to its own echo server on command, counts what it
// holds and refuses bad commands without dying.
func TestIdleHelper(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	done := make(chan error, 1)
	go func() { done <- runIdleHelper(ctx, inR, outW); outW.Close() }()
	lines := bufio.NewScanner(outR)
	next := func() string {
		if !lines.Scan() {
			t.Fatalf("the holder stopped answering: %v", lines.Err())
		}
		return lines.Text()
	}
	m := addrRe.FindStringSubmatch(next())
	if m == nil {
		t.Fatal("the holder did not print its address first")
	}
	for _, step := range []struct{ cmd, want string }{
		{"open " + m[1] + " 5", "OK 5"},
		{"open " + m[1] + " 0", "ERR bad count"},
		{"hold on", "ERR bad command"},
		{"open " + m[1] + " 3", "OK 8"},
	} {
		fmt.Fprintln(inW, step.cmd)
		if got := next(); !strings.HasPrefix(got, step.want) {
			t.Errorf("%q: holder said %q, want %q…", step.cmd, got, step.want)
		}
	}
	inW.Close() // stdin ends: the holder closes its tunnels and returns
	if err := <-done; err != nil {
		t.Errorf("holder returned %v after stdin ended", err)
	}
}

// freePorts gives distinct ports that can be listened on, outside the kernel's
// ephemeral range when there is room below it.
func TestFreePorts(t *testing.T) {
	ports, err := freePorts(6)
	if err != nil {
		t.Fatal(err)
	}
	lo, hi := portsBelowEphemeral()
	seen := map[int]bool{}
	for _, p := range ports {
		if seen[p] {
			t.Errorf("port %d given twice in %v", p, ports)
		}
		seen[p] = true
		if hi > lo && (p < lo || p >= hi) {
			t.Errorf("port %d outside [%d, %d), below the ephemeral range", p, lo, hi)
		}
		ln, err := net.Listen("tcp", loopback(p))
		if err != nil {
			t.Errorf("port %d from freePorts cannot be listened on: %v", p, err)
			continue
		}
		ln.Close()
	}
}
