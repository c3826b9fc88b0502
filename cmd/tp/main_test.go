package main

import (
	"bytes"
	"context"
	"errors"
	"github.com/tp-proxy/tp/internal/lib/cli"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Bad input: a misspelled subcommand with its arguments ("tp forwrd A B"). tp
// once answered "accepts 2 arg(s), received 3"; it names the command meant.
func TestTypoedSubcommandIsNamed(t *testing.T) {
	for _, args := range [][]string{
		{"forwrd", "127.0.0.1:15432", "db.internal:5432"},
		{"whoamii"},
		{"ssh-confg", "*.internal"},
	} {
		var out bytes.Buffer
		err := run(context.Background(), args, nil, &out, &out)
		if err == nil || strings.Contains(err.Error(), "arg(s)") || !strings.Contains(err.Error(), "did you mean") {
			t.Errorf("tp %s: %v", strings.Join(args, " "), err)
		}
	}
	// Three words that resemble no command: say what tp takes.
	err := run(context.Background(), []string{"a", "b", "c"}, nil, new(bytes.Buffer), new(bytes.Buffer))
	if err == nil || !strings.Contains(err.Error(), `tp takes only HOST and PORT (got "c" after them): tp HOST PORT`) ||
		!strings.Contains(err.Error(), "or a command: ") {
		t.Errorf("tp a b c: %v", err)
	}
}

// Every tp command with positional arguments says which are missing or extra
// by name, with its usage line and an example. Bad input: too few or too many
// arguments. tp once answered cobra's "accepts 2 arg(s), received 1" (forward,
// expose) or "unknown command "x" for "tp whoami"" (the commands that take none).
func TestArgumentsAreNamed(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want []string
	}{
		{[]string{"forward", "127.0.0.1:22960"}, []string{
			`tp forward needs LOCAL and DEST (got only LOCAL "127.0.0.1:22960"): tp forward [--udp] LOCAL DEST, e.g. tp forward 127.0.0.1:15432 db.internal:5432`}},
		{[]string{"forward"}, []string{`tp forward needs LOCAL and DEST (got none): tp forward [--udp] LOCAL DEST`}},
		{[]string{"forward", "--udp", "a", "b", "c"}, []string{`tp forward takes only LOCAL and DEST (got "c" after them): tp forward [--udp] LOCAL DEST`}},
		{[]string{"expose", "web"}, []string{
			`tp expose needs NAME and LOCAL_ADDR (got only NAME "web"): tp expose NAME LOCAL_ADDR, e.g. tp expose laptop-ssh 127.0.0.1:22 --allow-user bob`}},
		{[]string{"expose", "web", "127.0.0.1:80", "x", "y"}, []string{`tp expose takes only NAME and LOCAL_ADDR (got "x" and "y" after them)`}},
		{[]string{"ip", "up"}, []string{`tp ip takes no arguments (got "up"): tp ip, e.g. sudo tp ip --proxy-name proxy.example.org`}},
		{[]string{"whoami", "alice"}, []string{`tp whoami takes no arguments (got "alice"): tp whoami`}},
		{[]string{"status", "alice"}, []string{`tp status takes no arguments (got "alice"): tp status`}},
		{[]string{"version", "x"}, []string{`tp version takes no arguments (got "x"): tp version`}},
		{[]string{"db.internal"}, []string{
			`tp needs HOST and PORT (got only HOST "db.internal"): tp HOST PORT, e.g. ssh -o ProxyCommand="tp %h %p" alice@db.internal`,
			"; or a command: ", "forward", "expose", "whoami"}},
		{nil, []string{`tp needs HOST and PORT (got none): tp HOST PORT`}},
	} {
		err := run(context.Background(), tt.args, nil, new(bytes.Buffer), new(bytes.Buffer))
		if err == nil {
			t.Errorf("tp %s succeeded", strings.Join(tt.args, " "))
			continue
		}
		for _, w := range tt.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("tp %s: %q\n  does not say %q", strings.Join(tt.args, " "), err, w)
			}
		}
		if strings.Contains(err.Error(), "arg(s)") || strings.Contains(err.Error(), "unknown command") {
			t.Errorf("tp %s still counts arguments or calls one a command: %q", strings.Join(tt.args, " "), err)
		}
		if !errors.As(err, new(cli.UsageError)) {
			t.Errorf("tp %s: %q is not a usage error (main would print it after \"tp:\")", strings.Join(tt.args, " "), err)
		}
	}
}

// An unknown flag gets the command's flags it probably meant and a pointer to
// the command's help. Bad input: misspelled flags, of the command and of tp
// itself, and a long flag written with one dash. tp once said only "unknown
// flag: --upd".
func TestUnknownFlagSuggestsOne(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"forward", "--upd", "127.0.0.1:5353", "dns.internal:53"},
			"unknown flag --upd for tp forward: did you mean --udp? (tp forward --help lists its flags)"},
		{[]string{"--trasport", "tls", "db.internal", "22"},
			"unknown flag --trasport for tp: did you mean --transport? (tp --help lists its flags)"},
		{[]string{"forward", "--trasport", "tls", "a", "b"}, // inherited from tp
			"unknown flag --trasport for tp forward: did you mean --transport? (tp forward --help lists its flags)"},
		{[]string{"expose", "--allow-usr", "bob", "web", "127.0.0.1:80"},
			"unknown flag --allow-usr for tp expose: did you mean --allow-user? (tp expose --help lists its flags)"},
		{[]string{"forward", "-udp", "a", "b"},
			"unknown flag -u in -udp for tp forward: did you mean --udp or --udp-idle? (tp forward --help lists its flags)"},
		{[]string{"whoami", "--verbose"}, "unknown flag --verbose for tp whoami (tp whoami --help lists its flags)"},
	} {
		err := run(context.Background(), tt.args, nil, new(bytes.Buffer), new(bytes.Buffer))
		if err == nil || err.Error() != tt.want {
			t.Errorf("tp %s:\n  %v\nwant\n  %s", strings.Join(tt.args, " "), err, tt.want)
		}
	}
}

// A mistyped help topic names the command meant and fails. Bad input: "tp
// help forwrd". cobra printed tp's whole usage for it and exited 0.
func TestHelpTopicMistake(t *testing.T) {
	var out bytes.Buffer
	err := run(context.Background(), []string{"help", "forwrd"}, nil, &out, &out)
	want := `tp help: tp has no command "forwrd": did you mean "tp help forward"? (tp --help lists the commands)`
	if err == nil || err.Error() != want {
		t.Fatalf("tp help forwrd:\n  %v\nwant\n  %s", err, want)
	}
	if out.Len() != 0 {
		t.Errorf("tp help forwrd also printed %q", out.String())
	}
	out.Reset()
	if err := run(context.Background(), []string{"help", "forward"}, nil, &out, &out); err != nil || !strings.Contains(out.String(), "tp forward [--udp] LOCAL DEST") {
		t.Errorf("tp help forward: %v, printed %q", err, out.String())
	}
}

// A flag given a value it cannot take, or none, says what it takes. Bad input:
// a duration without a unit, a port that is not a number, a flag with its
// value left out. tp once said `invalid argument "abc" for "--public" flag:
// strconv.ParseInt: parsing "abc": invalid syntax` and `flag needs an
// argument: --public`.
func TestFlagValueMistakes(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"forward", "--udp-idle", "5", "a:1", "b:2"},
			`--udp-idle takes a duration with a unit, e.g. 30s, 5m or 1h30m, not "5" (tp forward --help lists its flags)`},
		{[]string{"expose", "game", "127.0.0.1:27015", "--public", "abc"},
			`--public takes a whole number, not "abc" (tp expose --help lists its flags)`},
		{[]string{"expose", "game", "127.0.0.1:27015", "--public"},
			"--public needs a value: a whole number (tp expose --help lists its flags)"},
		{[]string{"expose", "web", "127.0.0.1:80", "--allow-user"},
			"--allow-user needs a value: users whose devices may connect (repeatable) (tp expose --help lists its flags)"},
		{[]string{"--timeout", "10", "db.internal", "22"},
			`--timeout takes a duration with a unit, e.g. 30s, 5m or 1h30m, not "10" (tp --help lists its flags)`},
	} {
		err := run(context.Background(), tt.args, nil, new(bytes.Buffer), new(bytes.Buffer))
		if err == nil || err.Error() != tt.want {
			t.Errorf("tp %s:\n  %v\nwant\n  %s", strings.Join(tt.args, " "), err, tt.want)
		}
	}
}

// tp ssh-config --write puts one marked block into the ssh config, keeps what
// the file held, and replaces (not repeats) the block when run again.
func TestSSHConfigWriteIsIdempotent(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if p, err := filepath.EvalSymlinks(exe); err == nil {
		exe = p
	}
	file := filepath.Join(t.TempDir(), "ssh", "config")
	if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
		t.Fatal(err)
	}
	mine := "Host old\n    User bob" // no final newline
	if err := os.WriteFile(file, []byte(mine), 0o640); err != nil {
		t.Fatal(err)
	}
	sshConfig := func(args ...string) string {
		t.Helper()
		var stdout, stderr bytes.Buffer
		if err := run(context.Background(), append([]string{"ssh-config"}, args...), nil, &stdout, &stderr); err != nil {
			t.Fatalf("tp ssh-config %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
		}
		return stdout.String()
	}
	block := func(hosts string) string {
		return sshBlockBegin + "\nHost " + hosts + "\n    ProxyCommand " + exe + " %h %p\n" + sshBlockEnd + "\n"
	}
	if got, want := sshConfig("db*.internal"), block("*.rev.tp.internal db*.internal"); got != want {
		t.Fatalf("printed block:\n%s\nwant:\n%s", got, want)
	}
	for range 2 {
		sshConfig("--write", "--file", file, "db*.internal")
	}
	want := mine + "\n\n" + block("*.rev.tp.internal db*.internal")
	if b, _ := os.ReadFile(file); string(b) != want {
		t.Fatalf("after two writes the file holds:\n%s\nwant:\n%s", b, want)
	}
	sshConfig("--write", "--file", file, "--zone", "rev.example.org", "web1")
	want = mine + "\n\n" + block("*.rev.example.org web1")
	if b, _ := os.ReadFile(file); string(b) != want {
		t.Fatalf("a new write did not replace the block:\n%s\nwant:\n%s", b, want)
	}
	if fi, err := os.Stat(file); err != nil || fi.Mode().Perm() != 0o640 {
		t.Errorf("the file's mode changed: %v %v", fi.Mode(), err)
	}
	// A missing file is created, private.
	fresh := filepath.Join(t.TempDir(), "new", "config")
	sshConfig("--write", "--file", fresh, "web1")
	if fi, err := os.Stat(fresh); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("new ssh config: %v %v", fi, err)
	}
}
