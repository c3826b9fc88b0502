package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Bad input: the bounds per device identity set to 0 ("unlimited"), negative
// or absurdly high are refused, each naming its key; no bound is left out.
func TestPerIdentityBoundsValidate(t *testing.T) {
	for _, c := range []struct {
		key string
		set func(*Server, int)
	}{
		{"max-sessions-per-identity", func(s *Server, v int) { s.MaxSessionsPerIdentity = v }},
		{"max-reverse-names-per-identity", func(s *Server, v int) { s.MaxReverseNamesPerIdentity = v }},
		{"max-pending-per-identity", func(s *Server, v int) { s.MaxPendingPerIdentity = v }},
	} {
		for _, v := range []int{0, -1, 10_000_000} {
			s := DefaultServer()
			c.set(&s, v)
			if err := s.Validate(); err == nil || !strings.Contains(err.Error(), c.key) {
				t.Errorf("%s %d: %v; want a refusal naming the key", c.key, v, err)
			}
		}
	}
}

// The bounds come from tpd.yaml and TP_* like every key, and tpd init writes them.
func TestPerIdentityBoundsLoad(t *testing.T) {
	dir := t.TempDir()
	yaml := "max-sessions-per-identity: 7\nmax-reverse-names-per-identity: 3\n"
	if err := os.WriteFile(filepath.Join(dir, FileName), []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TP_DATA_DIR", dir)
	t.Setenv("TP_MAX_PENDING_PER_IDENTITY", "5")
	s, err := LoadServer(nil)
	if err != nil {
		t.Fatal(err)
	}
	if s.MaxSessionsPerIdentity != 7 || s.MaxReverseNamesPerIdentity != 3 || s.MaxPendingPerIdentity != 5 {
		t.Fatalf("loaded %d sessions, %d names, %d pending; want 7, 3, 5", s.MaxSessionsPerIdentity, s.MaxReverseNamesPerIdentity, s.MaxPendingPerIdentity)
	}
	written := string(ServerYAML(DefaultServer()))
	for _, want := range []string{"max-sessions-per-identity: 512", "max-reverse-names-per-identity: 64", "max-pending-per-identity: 128"} {
		if !strings.Contains(written, want) {
			t.Errorf("tpd init's file has no %q", want)
		}
	}
}
