package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// admin-listen: off by default, loopback unless admin-listen-remote, and never
// the public port or the plain-HTTP port. Each bad case names the key.
func TestAdminListen(t *testing.T) {
	for _, c := range []struct {
		name, admin, listen, httpListen string
		remote                          bool
		want                            string // "" accepts
	}{
		{"off", "", "127.0.0.1:8443", "", false, ""},
		{"loopback", "127.0.0.1:9443", "127.0.0.1:8443", "", false, ""},
		{"loopback v6", "[::1]:9443", ":443", "", false, ""},
		{"localhost", "localhost:9443", ":443", "", false, ""},
		{"port 0 (tests)", "127.0.0.1:0", "127.0.0.1:0", "", false, ""},
		{"remote allowed", ":9443", ":443", "", true, ""},
		{"not host:port", "9443", "127.0.0.1:8443", "", false, "admin-listen \"9443\" must be host:port"},
		{"bad port", "127.0.0.1:99999", "127.0.0.1:8443", "", false, "invalid port"},
		{"every address without opt-in", ":9443", ":443", "", false, "not a loopback address"},
		{"public IP without opt-in", "192.0.2.1:9443", ":443", "", false, "admin-listen-remote: true"},
		{"same as listen", "127.0.0.1:8443", "127.0.0.1:8443", "", false, "same address as listen"},
		{"listen on every address", "127.0.0.1:443", ":443", "", false, "same address as listen"},
		{"admin on every address", ":443", "192.0.2.1:443", "", true, "same address as listen"},
		{"same as http-listen", "127.0.0.1:80", ":443", ":80", false, "same address as http-listen"},
		{"remote without address", "", "127.0.0.1:8443", "", true, "admin-listen-remote is set but admin-listen is empty"},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := DefaultServer()
			s.AdminListen, s.AdminListenRemote, s.Listen, s.HTTPListen = c.admin, c.remote, c.listen, c.httpListen
			err := s.Validate()
			switch {
			case c.want == "" && err != nil:
				t.Fatalf("admin-listen %q refused: %v", c.admin, err)
			case c.want != "" && err == nil:
				t.Fatalf("admin-listen %q (listen %q, http-listen %q) accepted", c.admin, c.listen, c.httpListen)
			case c.want != "" && !strings.Contains(err.Error(), c.want):
				t.Fatalf("error %q does not say %q", err, c.want)
			}
		})
	}
}

// The keys load from tpd.yaml, and tpd init's file lists them.
func TestAdminListenLoads(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, FileName), []byte("admin-listen: \"0.0.0.0:9443\"\nadmin-listen-remote: true\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TP_DATA_DIR", dir)
	s, err := LoadServer(nil)
	if err != nil {
		t.Fatal(err)
	}
	if s.AdminListen != "0.0.0.0:9443" || !s.AdminListenRemote {
		t.Fatalf("loaded admin-listen %q remote %t", s.AdminListen, s.AdminListenRemote)
	}
	y := string(ServerYAML(s))
	if !strings.Contains(y, "admin-listen: \"0.0.0.0:9443\"") || !strings.Contains(y, "admin-listen-remote: true") {
		t.Fatalf("tpd.yaml lacks the admin keys:\n%s", y)
	}
}
