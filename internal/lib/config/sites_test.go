package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// Sites come from tpd.yaml as a list of {name, root} or {name, upstream}.
func TestLoadSites(t *testing.T) {
	dir := t.TempDir()
	www := filepath.Join(dir, "www")
	if err := os.Mkdir(www, 0o755); err != nil {
		t.Fatal(err)
	}
	yaml := "sites:\n  - {name: www.example.org, root: " + www + "}\n  - {name: app.example.org, upstream: \"http://127.0.0.1:3000\"}\n" +
		"default-site: www.example.org\nhttp-listen: \":80\"\nacme-email: admin@example.org\n"
	if err := os.WriteFile(filepath.Join(dir, FileName), []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TP_DATA_DIR", dir)
	s, err := LoadServer(pflag.NewFlagSet("test", pflag.ContinueOnError))
	if err != nil {
		t.Fatal(err)
	}
	want := []Site{{Name: "www.example.org", Root: www}, {Name: "app.example.org", Upstream: "http://127.0.0.1:3000"}}
	if len(s.Sites) != 2 || s.Sites[0] != want[0] || s.Sites[1] != want[1] {
		t.Fatalf("sites = %+v, want %+v", s.Sites, want)
	}
	if s.DefaultSite != "www.example.org" || s.HTTPListen != ":80" || s.ACMEEmail != "admin@example.org" || s.SiteMaxBody != DefaultSiteMaxBody {
		t.Errorf("site settings not loaded: %+v", s)
	}
	// What tpd init writes loads back to the same sites.
	if err := os.WriteFile(filepath.Join(dir, FileName), ServerYAML(s), 0o600); err != nil {
		t.Fatal(err)
	}
	again, err := LoadServer(pflag.NewFlagSet("test", pflag.ContinueOnError))
	if err != nil {
		t.Fatalf("rendered tpd.yaml does not load: %v\n%s", err, ServerYAML(s))
	}
	if len(again.Sites) != 2 || again.Sites[1] != want[1] || again.DefaultSite != s.DefaultSite {
		t.Errorf("round trip lost sites: %+v", again.Sites)
	}
}

func TestValidateSites(t *testing.T) {
	root := t.TempDir()
	file := filepath.Join(root, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name  string
		mod   func(*Server)
		wants []string // each must appear in the error; none means valid
	}{
		{"static and upstream", func(s *Server) {
			s.Sites = []Site{{Name: "www.example.org", Root: root}, {Name: "app.example.org", Upstream: "https://10.0.0.1:8443/base"}}
			s.DefaultSite = "app.example.org"
		}, nil},
		{"site on tpd's own name", func(s *Server) { s.Sites = []Site{{Name: "localhost", Root: root}} }, nil},
		{"no name", func(s *Server) { s.Sites = []Site{{Root: root}} }, []string{"sites[0]: name must be set"}},
		{"bad names", func(s *Server) {
			s.Sites = []Site{{Name: "10.0.0.1", Root: root}, {Name: "*.example.org", Root: root}, {Name: "WWW.example.org", Root: root}, {Name: "a.example.org:443", Root: root}}
		}, []string{"sites[0] (10.0.0.1)", "sites[1]", "sites[2]", "sites[3]", "must be a DNS name"}},
		{"twice", func(s *Server) { s.Sites = []Site{{Name: "a.org", Root: root}, {Name: "a.org", Root: root}} }, []string{"configured twice"}},
		{"neither", func(s *Server) { s.Sites = []Site{{Name: "a.org"}} }, []string{"set root (a directory to serve) or upstream"}},
		{"both", func(s *Server) { s.Sites = []Site{{Name: "a.org", Root: root, Upstream: "http://x"}} }, []string{"not both"}},
		{"missing root", func(s *Server) { s.Sites = []Site{{Name: "a.org", Root: filepath.Join(root, "nope")}} }, []string{"no such file"}},
		{"root is a file", func(s *Server) { s.Sites = []Site{{Name: "a.org", Root: file}} }, []string{"is not a directory"}},
		{"bad upstream", func(s *Server) {
			s.Sites = []Site{{Name: "a.org", Upstream: "ftp://x"}, {Name: "b.org", Upstream: "127.0.0.1:3000"}}
		}, []string{"sites[0] (a.org): upstream", "sites[1] (b.org): upstream"}},
		{"default not a site", func(s *Server) { s.DefaultSite = "x.org" }, []string{"default-site \"x.org\""}},
		{"acme settings", func(s *Server) {
			s.ACMECA, s.ACMEEmail, s.HTTPListen, s.SiteMaxBody, s.SiteUpstreamTimeout = "http://ca", "nobody", "80", 0, 0
		}, []string{"acme-ca", "acme-email", "http-listen", "site-max-body", "site-upstream-timeout"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := DefaultServer()
			tt.mod(&s)
			err := s.Validate()
			if len(tt.wants) == 0 {
				if err != nil {
					t.Fatalf("valid sites refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("invalid sites accepted")
			}
			for _, w := range tt.wants {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not mention %q:\n%v", w, err)
				}
			}
		})
	}
}
