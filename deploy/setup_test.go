package deploy

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

// README's "Set up" is two commands, start and test, and the test command is
// the script CI runs for its test step, after clearing the test cache. Before,
// the README said `go test -race ./...`, which fails on a machine without the
// Chromium and NSS tools it did not name, while .ci/run installed them itself.
func TestSetUpCommandIsCIs(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(readme), "\n## Set up\n")
	if !ok {
		t.Fatal("README.md has no \"## Set up\" section")
	}
	_, block, ok := strings.Cut(section, "```sh\n")
	if !ok {
		t.Fatal("README's Set up has no ```sh block")
	}
	block, _, _ = strings.Cut(block, "```")
	var cmds []string
	for _, line := range strings.Split(block, "\n") {
		cmd, _, _ := strings.Cut(line, "#")
		if cmd = strings.TrimSpace(cmd); cmd != "" {
			cmds = append(cmds, cmd)
		}
	}
	if len(cmds) != 2 || cmds[1] != "deploy/test.sh" {
		t.Fatalf("README's Set up runs %q; want two commands, the second deploy/test.sh", cmds)
	}

	ci, err := os.ReadFile("../.ci/run")
	if err != nil {
		t.Fatal(err)
	}
	var cleaned, tested bool
	for _, line := range strings.Split(string(ci), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "go clean -testcache":
			cleaned = true
		case line == cmds[1]:
			if !cleaned {
				t.Errorf(".ci/run runs %s before go clean -testcache", cmds[1])
			}
			tested = true
		case strings.HasPrefix(line, "go test") && !strings.Contains(line, "-fuzz"):
			t.Errorf(".ci/run runs %q beside the README's test command; CI's test step is %s alone", line, cmds[1])
		}
	}
	if !tested {
		t.Errorf(".ci/run never runs the README's test command %s", cmds[1])
	}

	script, err := os.ReadFile("test.sh")
	if err != nil {
		t.Fatal(err)
	}
	// The tests run once, with the race detector, over the caller's
	// arguments, and testreport turns go test's JSON into the summary.
	if !regexp.MustCompile(`(?m)^go test -race (-timeout \S+ )?-json "\$@" \| "\$report_dir/testreport" \$no_skips$`).Match(script) {
		t.Error(`test.sh does not run go test -race [-timeout D] -json "$@" | testreport`)
	}
	if info, err := os.Stat("test.sh"); err != nil || info.Mode()&0o111 == 0 {
		t.Errorf("test.sh is not executable (%v)", err)
	}
}
