package main

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// dlogin --help once rendered "--token tpd enroll": pflag takes a backquoted
// word in a usage as the value's name.
func TestHelpShowsFlagTypes(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"--help"}, &out, &out); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"--token string", "--server string", "--fingerprint string"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("dlogin --help does not show %q:\n%s", want, out.String())
		}
	}
}

// A first dlogin's bad --server, against real loopback sockets: each message
// once showed Go's request and dial errors and said nothing of what to check.
func TestBadServerMessages(t *testing.T) {
	fp := "SHA256:" + strings.Repeat("00", 32)
	httpSrv := httptest.NewServer(http.NotFoundHandler()) // plain HTTP
	defer httpSrv.Close()
	httpAddr := httpSrv.Listener.Addr().String()
	dead := testnet.FreeAddr(t, "tcp").String()
	echo := testnet.Echo(t)
	closer := testnet.Serve(t, func(*net.TCPConn) {}) // closes each connection at once
	for _, tc := range []struct {
		name, server string
		want         []string
	}{
		// Bad input: nothing listens at --server's address. Was `cannot reach
		// TP server at ADDR: Get "https://ADDR/tp/v1/roots": dial tcp ADDR:
		// connect: connection refused`.
		{"server down", "https://" + dead, []string{
			"cannot reach the TP server at " + dead + ": nothing listens there", "is tpd running, and is this its address?"}},
		// Bad input: --server is a plain HTTP server's port. Was `… Get "…":
		// tls: first record does not look like a TLS handshake`.
		{"plain HTTP port", "https://" + httpAddr, []string{
			httpAddr + ` does not speak TLS (it answered "HTTP/1.`, "400 Bad Request\")", "is this tpd's port?", "listening on"}},
		// Bad input: --server is an echo service's port. Was `… tls: received
		// unexpected handshake message of type *tls.clientHelloMsg when
		// waiting for *tls.serverHelloMsg`.
		{"echo port", "https://" + echo, []string{
			echo + " does not speak TLS (it sent back the TLS hello it was sent", "is this tpd's port?", "listening on"}},
		// Bad input: --server is a port that closes each connection at once.
		// Was `… Get "…": EOF`.
		{"port that hangs up", "https://" + closer, []string{
			closer + " closed the connection without a TLS answer", "is this tpd's port?"}},
		// Bad input: a path after the address. Was `… Get
		// "https://ADDR/acme/tp/v1/roots": …`, the path glued to dlogin's own.
		{"URL with a path", "https://" + dead + "/acme", []string{
			"--server takes the server's base URL, https://HOST[:PORT], without a path", `(got "https://` + dead + `/acme")`}},
		// Bad input: no scheme. Was `server "ADDR" must be a URL like
		// https://tp.example.org`.
		{"no scheme", dead, []string{
			"--server takes the server's base URL, https://HOST[:PORT], starting with https://", `(got "` + dead + `")`}},
		// Bad input: http://. Was the same "must be a URL like …".
		{"http scheme", "http://" + dead, []string{
			"--server takes the server's base URL, https://HOST[:PORT], with https://, not http://", `(got "http://` + dead + `")`}},
		// Bad input: a query. Was `… Get "https://ADDR?x=1/tp/v1/roots": …`.
		{"URL with a query", "https://" + dead + "?x=1", []string{"with nothing after HOST[:PORT]"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			home := filepath.Join(t.TempDir(), "tp-home")
			var out bytes.Buffer
			err := run(t.Context(), []string{"--home", home, "--server", tc.server, "--fingerprint", fp, "--token", "x"}, &out, &out)
			if err == nil {
				t.Fatalf("dlogin --server %s succeeded:\n%s", tc.server, out.String())
			}
			msg := err.Error()
			for _, want := range tc.want {
				if !strings.Contains(msg, want) {
					t.Errorf("dlogin --server %s said\n\t%s\nwhich lacks %q", tc.server, msg, want)
				}
			}
			for _, internal := range []string{"Get \"", "dial tcp", "tls:", "EOF", "/tp/v1/"} {
				if strings.Contains(msg, internal) {
					t.Errorf("dlogin --server %s shows Go's %q:\n\t%s", tc.server, internal, msg)
				}
			}
			if _, err := os.Lstat(home); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the failed dlogin left %s behind (%v)", home, err)
			}
		})
	}
}

// A misspelled flag gets the flags dlogin has that it probably meant, and a
// stray argument is named (dlogin takes none). Before: cobra's bare "unknown
// flag: --sever" and `unknown command "x" for "dlogin"`.
func TestCommandLineMistakes(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--sever", "https://127.0.0.1:8443"},
			"unknown flag --sever for dlogin: did you mean --server? (dlogin --help lists its flags)"},
		{[]string{"--token", "abc", "laptop"},
			`dlogin takes no arguments (got "laptop"): dlogin [--server URL --fingerprint SHA256:… (--token TOKEN | --sso [--device NAME])], e.g. dlogin --server https://tp.example.org --fingerprint SHA256:… --token …`},
		{[]string{"--sso", "--token", "abc"},
			"--sso and --token are two ways to enrol: give one (--sso signs in with your organisation's identity provider, --token uses what `tpd enroll` printed)"},
		{[]string{"--device", "laptop", "--token", "abc"},
			"--device names the device for --sso; with --token the name is the one `tpd enroll` was given"},
		{[]string{"--sso", "--device", "My Laptop", "--server", "https://127.0.0.1:1", "--fingerprint", "SHA256:00"},
			`--device "My Laptop": a device name is lowercase letters, digits, '.', '_' and '-', e.g. laptop`},
		{[]string{"--sso"},
			"dlogin --sso needs --server and --fingerprint; your TP administrator publishes both (tpd prints the whole dlogin --sso line when it starts)"},
		{[]string{"--no-browser", "--token", "abc"},
			"--no-browser is for signing in (--sso, or a later dlogin on a server whose renewals need a sign-in), not for --token: it signs in with a code instead of this machine's browser"},
	} {
		t.Setenv("TP_HOME", t.TempDir())
		err := run(context.Background(), tt.args, new(bytes.Buffer), new(bytes.Buffer))
		if err == nil || err.Error() != tt.want {
			t.Errorf("dlogin %s:\n  %v\nwant\n  %s", strings.Join(tt.args, " "), err, tt.want)
		}
	}
}

// dlogin --sso opens this machine's browser only where the person sits at
// it: $BROWSER when set (even over ssh: a text browser there reaches this
// machine's loopback), never in an ssh session or a Unix session without a
// display, where a code on another device is the way; and it says why.
func TestBrowserOpener(t *testing.T) {
	found := func(string) (string, error) { return "/usr/bin/xdg-open", nil }
	missing := func(string) (string, error) { return "", errors.New("not found") }
	for _, tt := range []struct {
		name    string
		env     map[string]string
		goos    string
		look    func(string) (string, error)
		opens   bool
		whyPart string
	}{
		{"a Linux desktop", map[string]string{"DISPLAY": ":0"}, "linux", found, true, ""},
		{"Wayland", map[string]string{"WAYLAND_DISPLAY": "wayland-0"}, "linux", found, true, ""},
		{"no display", map[string]string{}, "linux", found, false, "no graphical session"},
		{"no xdg-open", map[string]string{"DISPLAY": ":0"}, "linux", missing, false, "xdg-open is not installed"},
		{"over ssh", map[string]string{"DISPLAY": ":0", "SSH_CONNECTION": "10.0.0.1 50000 10.0.0.2 22"}, "linux", found, false, "ssh session"},
		{"a Mac over ssh", map[string]string{"SSH_TTY": "/dev/ttys001"}, "darwin", found, false, "ssh session"},
		{"a Mac", map[string]string{}, "darwin", missing, true, ""},
		{"Windows", map[string]string{}, "windows", missing, true, ""},
		{"$BROWSER over ssh", map[string]string{"BROWSER": "w3m", "SSH_CONNECTION": "10.0.0.1 50000 10.0.0.2 22"}, "linux", missing, true, ""},
	} {
		open, why := browserOpener(func(k string) string { return tt.env[k] }, tt.goos, tt.look)
		if (open != nil) != tt.opens || !strings.Contains(why, tt.whyPart) || (open == nil && why == "") {
			t.Errorf("%s: opens %v (%q); want %v (%q)", tt.name, open != nil, why, tt.opens, tt.whyPart)
		}
	}
	// An opener that fails (xdg-open with no browser to hand the page to)
	// is an error, so that dlogin signs in with a code instead.
	openerWait = 10 * time.Minute // the script's exit decides, however slow the machine
	t.Cleanup(func() { openerWait = 3 * time.Second })
	failing := filepath.Join(t.TempDir(), "xdg-open")
	if err := os.WriteFile(failing, []byte("#!/bin/sh\necho 'no method available for opening' >&2\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	open, _ := browserOpener(func(k string) string {
		if k == "DISPLAY" {
			return ":0"
		}
		return ""
	}, "linux", func(string) (string, error) { return failing, nil })
	if err := open("http://127.0.0.1:1/authorize"); err == nil || !strings.Contains(err.Error(), "exit status 3") {
		t.Errorf("an xdg-open that exits 3: %v; want its failure", err)
	}

	// $BROWSER runs with the page as its last argument.
	dir := t.TempDir()
	script, out := filepath.Join(dir, "browser"), filepath.Join(dir, "page")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho \"$2\" >"+out+".tmp && mv "+out+".tmp "+out+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	open, _ = browserOpener(func(k string) string {
		if k == "BROWSER" {
			return script + " --new-tab"
		}
		return ""
	}, "linux", missing)
	if err := open("http://127.0.0.1:1/authorize?state=x"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, err := os.ReadFile(out)
		if err == nil {
			if got := strings.TrimSpace(string(b)); got != "http://127.0.0.1:1/authorize?state=x" {
				t.Fatalf("$BROWSER was given %q; want the page", got)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("$BROWSER did not run within 20s")
		}
		time.Sleep(10 * time.Millisecond) // polling for the script's file, bounded by the deadline
	}
}
