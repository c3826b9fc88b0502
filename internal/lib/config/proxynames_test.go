package config

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// Each bad proxy name is refused with a sentence naming proxy-names and the
// name; good ones pass.
func TestProxyNamesValidate(t *testing.T) {
	for _, tc := range []struct {
		bad  []string
		want string
	}{
		{[]string{"127.0.0.1"}, "IP address"},
		{[]string{"Proxy.Example.org"}, "lower case"},
		{[]string{"proxy.example.org:443"}, "DNS name"},
		{[]string{"*.example.org"}, "DNS name"},
		{[]string{""}, "empty entry"},
		{[]string{"p.example.org", "p.example.org"}, "twice"},
		{[]string{"localhost"}, "also in names"},
		{[]string{"www.example.org"}, "also a site"},
		{[]string{"p.rev.tp.internal"}, "reverse-zone"},
	} {
		s := DefaultServer()
		s.Sites = []Site{{Name: "www.example.org", Root: t.TempDir()}}
		s.ProxyNames = tc.bad
		err := s.Validate()
		if err == nil || !strings.Contains(err.Error(), "proxy-names") || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("proxy-names %q: error %v, want one naming proxy-names and saying %q", tc.bad, err, tc.want)
		}
	}
	s := DefaultServer()
	s.ProxyNames = []string{"proxy.example.org", "connect.example.org"}
	if err := s.Validate(); err != nil {
		t.Errorf("good proxy names refused: %v", err)
	}
	s.ProxyNames = nil // no CONNECT at all
	if err := s.Validate(); err != nil {
		t.Errorf("no proxy names refused: %v", err)
	}
}

// The default is proxy.localhost; tpd init's file carries the key, and an
// empty list written there stays empty when loaded again.
func TestProxyNamesFile(t *testing.T) {
	if got := DefaultServer().ProxyNames; !slices.Equal(got, []string{"proxy.localhost"}) {
		t.Fatalf("default proxy-names %q", got)
	}
	for _, names := range [][]string{{"proxy.localhost"}, {}, {"a.example.org", "b.example.org"}} {
		s := DefaultServer()
		s.DataDir = t.TempDir()
		s.ProxyNames = names
		y := ServerYAML(s)
		if !strings.Contains(string(y), "proxy-names:") {
			t.Fatalf("sample config has no proxy-names:\n%s", y)
		}
		if err := os.WriteFile(filepath.Join(s.DataDir, FileName), y, 0o600); err != nil {
			t.Fatal(err)
		}
		t.Setenv("TP_DATA_DIR", s.DataDir)
		got, err := LoadServer(nil)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got.ProxyNames, names) {
			t.Errorf("wrote proxy-names %q, loaded %q", names, got.ProxyNames)
		}
	}
}
