package deploy

import (
	"bufio"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

const dockerfile = "container/Dockerfile"

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	line int
	cmd  string // upper case: FROM, RUN, COPY, …
	args string
}

func parseDockerfile(t *testing.T) []instruction {
	t.Helper()
	b, err := os.ReadFile(dockerfile)
	if err != nil {
		t.Fatal(err)
	}
	var out []instruction
	var cur strings.Builder
	start := 0
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if cur.Len() == 0 && (line == "" || strings.HasPrefix(line, "#")) {
			continue
		}
		if cur.Len() == 0 {
			start = n
		}
		if s, ok := strings.CutSuffix(line, "\\"); ok {
			cur.WriteString(s + " ")
			continue
		}
		cur.WriteString(line)
		cmd, args, _ := strings.Cut(cur.String(), " ")
		out = append(out, instruction{line: start, cmd: strings.ToUpper(cmd), args: strings.TrimSpace(args)})
		cur.Reset()
	}
	return out
}

// The image builds its binaries exactly as CI does (deploy/build.sh, which
// TestReleaseBuild checks), with go.mod's Go version, and runs tpd as the
// image's non-root user with the data dir a volume that user owns. Before,
// the Dockerfile had its own go build line on a golang:1.26 image (bad input:
// a second source of truth that could drift) and left /var/lib/tp to be created
// root-owned by Docker, unwritable for nonroot.
func TestDockerfileBuildsAsCI(t *testing.T) {
	ins := parseDockerfile(t)
	goVersion := goModVersion(t)
	var stages int
	var builds []string
	var user, volume, entrypoint, tpdDest string
	env := map[string]string{}
	chowned := map[string]string{} // destination -> owner
	for _, in := range ins {
		switch in.cmd {
		case "FROM":
			stages++
			image := strings.Fields(in.args)[0]
			if strings.HasPrefix(image, "golang:") {
				tag := strings.TrimPrefix(image, "golang:")
				if v, _, _ := strings.Cut(tag, "-"); v != goVersion {
					t.Errorf("%s:%d: builds with %s; go.mod asks for Go %s", dockerfile, in.line, image, goVersion)
				}
			}
		case "RUN":
			if strings.Contains(in.args, "go build") || strings.Contains(in.args, "build.sh") || strings.Contains(in.args, "go install") {
				builds = append(builds, in.args)
			}
		case "USER":
			user = in.args
		case "VOLUME":
			volume = in.args
		case "ENTRYPOINT":
			entrypoint = in.args
		case "ENV":
			for _, kv := range strings.Fields(in.args) {
				if k, v, ok := strings.Cut(kv, "="); ok {
					env[k] = v
				}
			}
		case "COPY":
			f := strings.Fields(in.args)
			if len(f) >= 2 && f[len(f)-2] == "/out/tpd" {
				tpdDest = f[len(f)-1]
			}
			for _, flag := range f {
				if owner, ok := strings.CutPrefix(flag, "--chown="); ok {
					chowned[f[len(f)-1]] = owner
				}
			}
		}
	}
	if stages < 2 {
		t.Errorf("%s has %d stage(s); want a build stage and a runtime stage without the toolchain", dockerfile, stages)
	}
	if len(builds) != 1 || builds[0] != "deploy/build.sh /out" {
		t.Errorf("%s builds with %q; want exactly one build, `deploy/build.sh /out`, the release build CI checks", dockerfile, builds)
	}
	if user == "" || user == "root" || user == "0" {
		t.Errorf("%s runs as %q; want a non-root user", dockerfile, user)
	}
	if user != "nonroot" && user != strconv.Itoa(nonrootUID) {
		t.Errorf("%s runs as %q; the Kubernetes manifest runs uid %d (distroless nonroot)", dockerfile, user, nonrootUID)
	}
	dataDir := env["TP_DATA_DIR"]
	if dataDir == "" || !regexp.MustCompile(`(^|[\s"\[])`+regexp.QuoteMeta(dataDir)+`($|[\s"\]])`).MatchString(volume) {
		t.Errorf("%s: TP_DATA_DIR=%q is not a VOLUME (%q): the CA would live in the container's writable layer", dockerfile, dataDir, volume)
	}
	if owner := chowned[dataDir]; owner != strconv.Itoa(nonrootUID)+":"+strconv.Itoa(nonrootUID) {
		t.Errorf("%s: %s is owned by %q in the image, want %d:%d, so a new volume there is writable by tpd", dockerfile, dataDir, owner, nonrootUID, nonrootUID)
	}
	if tpdDest == "" || !strings.Contains(entrypoint, `"`+tpdDest+`"`) {
		t.Errorf("%s: ENTRYPOINT %s does not run the tpd copied from the build (%q)", dockerfile, entrypoint, tpdDest)
	}
}
