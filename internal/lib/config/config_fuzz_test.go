package config

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// FuzzServerYAML: any tpd.yaml. Loading never panics; a file that loads is a
// valid configuration; and the file `tpd init` would write for it (ServerYAML)
// loads back to the same settings, so rewriting a configuration never changes
// or breaks it.
func FuzzServerYAML(f *testing.F) {
	for _, name := range []string{"../../../deploy/examples/tpd.yaml"} {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add(ServerYAML(DefaultServer()))
	for _, s := range []string{
		"listen: \"127.0.0.1:1111\"\ntoken-ttl: 2h\nmax-conns: 7\n",
		"max-con: 5\n",
		"public-ports: \"20000-20010, 8080/tcp, 27015/UDP\"\n",
		"reverse-zone: rev.tp.example.org\nnames: [tp.example.org]\nsites:\n  - {name: blog.rev.tp.example.org, root: /srv}\n",
		"sites:\n  - {name: www.example.org, root: /srv/www}\n  - {name: app.example.org, upstream: \"http://127.0.0.1:3000\"}\ndefault-site: www.example.org\n",
		"cert-lifetime: 1m\nurl: http://plain\nlog-level: loud\n",
		"names: \"x\"\n", "listen: [1, 2]\n", "quic: maybe\n", "- a\n", "{", "\x00",
		"url: \"https://tp.example.org\\u0000\"\n",
	} {
		f.Add([]byte(s))
	}
	dir := f.TempDir()
	file := filepath.Join(dir, FileName)
	f.Setenv("TP_CONFIG", file)
	load := func(t *testing.T, b []byte) (Server, error) {
		if err := os.WriteFile(file, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return LoadServer(nil)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		s, err := load(t, in)
		if err != nil {
			return
		}
		if err := s.Validate(); err != nil {
			t.Fatalf("loaded an invalid configuration from %q: %v", in, err)
		}
		out := ServerYAML(s)
		s2, err := load(t, out)
		if err != nil {
			t.Fatalf("the file written for %q does not load: %v\n%s", in, err, out)
		}
		if again := ServerYAML(s2); !bytes.Equal(again, out) {
			t.Fatalf("the file written for %q loads to other settings:\n%s\nthen\n%s", in, out, again)
		}
	})
}
