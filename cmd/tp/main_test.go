package main

import (
	"bytes"
	"context"
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
	if err == nil || !strings.Contains(err.Error(), "tp takes HOST PORT, or a command") {
		t.Errorf("tp a b c: %v", err)
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
