package deploy

import (
	"bufio"
	"bytes"
	"context"
	"debug/buildinfo"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/lib/config"
)

// drainBound is the longest a stopping tpd drains: shutdown-timeout's default,
// which neither the unit nor the manifest overrides. systemd's stop timeout and
// Kubernetes' grace period must exceed it, or a drain is cut by SIGKILL.
var drainBound = config.DefaultServer().ShutdownTimeout

// nonrootUID is the distroless image's nonroot user, whom the Dockerfile runs
// tpd as and the Kubernetes manifest names.
const nonrootUID = 65532

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
	buildOut  []byte
)

// released builds tpd, tp and dlogin once with deploy/build.sh, the release
// build the Dockerfile runs, and returns the directory holding them.
func released(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds the release binaries with deploy/build.sh (minutes); skipped under -short")
	}
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "tp-deploy-build-")
		if buildErr != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "./build.sh", buildDir)
		buildOut, buildErr = cmd.CombinedOutput()
	})
	if buildErr != nil {
		t.Fatalf("deploy/build.sh: %v\n%s", buildErr, buildOut)
	}
	return buildDir
}

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// goModVersion is the Go version go.mod asks for (its toolchain line if any).
func goModVersion(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	var goLine, toolchain string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == "go" {
			goLine = f[1]
		}
		if len(f) == 2 && f[0] == "toolchain" {
			toolchain = strings.TrimPrefix(f[1], "go")
		}
	}
	if toolchain != "" {
		return toolchain
	}
	if goLine == "" {
		t.Fatal("go.mod has no go line")
	}
	return goLine
}

// The release build is what CI, the Dockerfile and the README's install use:
// each binary static (no cgo, no ELF interpreter), paths trimmed, symbols
// stripped, built by go.mod's Go version. Before deploy/build.sh the Dockerfile
// had its own go build line and a golang:1.26 image that could drift from go.mod.
func TestReleaseBuild(t *testing.T) {
	dir := released(t)
	want := "go" + goModVersion(t)
	for _, name := range []string{"tpd", "tp", "dlogin"} {
		path := filepath.Join(dir, name)
		info, err := buildinfo.ReadFile(path)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if info.GoVersion != want {
			t.Errorf("%s was built by %s; go.mod asks for %s", name, info.GoVersion, want)
		}
		settings := map[string]string{}
		for _, s := range info.Settings {
			settings[s.Key] = s.Value
		}
		// Go leaves -ldflags out of the build info under -trimpath: -s shows as no .symtab below.
		for k, v := range map[string]string{"CGO_ENABLED": "0", "-trimpath": "true"} {
			if settings[k] != v {
				t.Errorf("%s built with %s=%q, want %q", name, k, settings[k], v)
			}
		}
		f, err := elf.Open(path)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				t.Errorf("%s is dynamically linked (it has an ELF interpreter); the image it goes into has no libc", name)
			}
		}
		if f.Section(".symtab") != nil {
			t.Errorf("%s keeps its symbol table; the release build strips it (-ldflags=-s)", name)
		}
		f.Close()
	}
}

// runTPD runs the released tpd with args and env and returns its output.
func runTPD(t *testing.T, env []string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(released(t), "tpd"), args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}
