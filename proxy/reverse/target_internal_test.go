package reverse

import (
	"net/http"
	"strings"
	"testing"
)

func TestParseALPN(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		field   []string // nil: absent
		want    []string
		present bool
		bad     bool
	}{
		{nil, nil, false, false},
		{[]string{"h2, http%2F1.1"}, []string{"h2", "http/1.1"}, true, false},
		{[]string{"h2", "http%2f1.1"}, []string{"h2", "http/1.1"}, true, false},
		{[]string{" , h2 ,"}, []string{"h2"}, true, false},
		{[]string{"http%2"}, nil, true, true}, // truncated escape
		{[]string{"http%zz1.1"}, nil, true, true},
	} {
		h := http.Header{}
		for _, v := range tc.field {
			h.Add("ALPN", v)
		}
		got, present, err := ParseALPN(h)
		if (err != nil) != tc.bad || present != tc.present || strings.Join(got, "|") != strings.Join(tc.want, "|") && !tc.bad {
			t.Errorf("ALPN %q: got %q, present %v, err %v; want %q, present %v, bad %v", tc.field, got, present, err, tc.want, tc.present, tc.bad)
		}
	}
}

func TestALPNTokenRoundTrip(t *testing.T) {
	t.Parallel()
	for _, id := range []string{"h2", "http/1.1", "a b", "x%y", "ü"} {
		tok := ALPNToken(id)
		if strings.ContainsAny(tok, " ,/") {
			t.Errorf("ALPNToken(%q) = %q is no token", id, tok)
		}
		h := http.Header{"Alpn": {tok}}
		got, _, err := ParseALPN(h)
		if err != nil || len(got) != 1 || got[0] != id {
			t.Errorf("ALPNToken(%q) = %q decodes to %q, %v", id, tok, got, err)
		}
	}
}

func TestChooseALPN(t *testing.T) {
	t.Parallel()
	app, tcp := Target{Label: "blog", Full: "blog.z"}, Target{Port: 25}
	for _, tc := range []struct {
		t       Target
		offered []string
		has     bool
		want    string
	}{
		{app, nil, false, "http/1.1"},
		{app, []string{"http/1.1", "h2"}, true, "h2"},
		{app, []string{"http/1.1"}, true, "http/1.1"},
		{app, []string{"smtp"}, true, ""},
		{tcp, nil, false, ""},
		{tcp, []string{"smtp"}, true, ""},
		{tcp, []string{"h2"}, true, "h2"},
	} {
		if got := ChooseALPN(tc.t, tc.offered, tc.has); got != tc.want {
			t.Errorf("ChooseALPN(%+v, %q) = %q, want %q", tc.t, tc.offered, got, tc.want)
		}
	}
}

func TestParseTarget(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		path   string
		key    string
		status int
	}{
		{"/.well-known/tp/reverse-http/Blog", "blog.rev.test", 0},
		{"/.well-known/tp/reverse-http/blog/", "blog.rev.test", 0},
		{"/.well-known/tp/reverse-http/", "", 400},
		{"/.well-known/tp/reverse-http/a.b", "", 400},
		{"/.well-known/tp/reverse-http/-a", "", 400},
		{"/.well-known/tp/reverse-http/" + strings.Repeat("a", 64), "", 400},
		{"/.well-known/listen-tcp/0.0.0.0/25/", "tcp/25", 0},
		{"/.well-known/listen-tcp/::/25/", "tcp/25", 0},
		{"/.well-known/listen-tcp/[::]/25/", "tcp/25", 0},
		{"/.well-known/listen-tcp/192.0.2.1/25/", "tcp/25", 0},
		{"/.well-known/reverse/tcp/*/2525/", "tcp/2525", 0},
		{"/.well-known/listen-tcp/198.51.100.9/25/", "", 400}, // TP does not listen there
		{"/.well-known/listen-tcp/0.0.0.0/0/", "", 400},
		{"/.well-known/listen-tcp/0.0.0.0/65536/", "", 400},
		{"/.well-known/listen-tcp/0.0.0.0/", "", 400},
		{"/.well-known/listen-tcp/0.0.0.0/25/x/", "", 400},
		{"/other", "", 404},
	} {
		got, ref := ParseTarget(tc.path, "rev.test", "192.0.2.1")
		switch {
		case tc.status == 0 && ref != nil:
			t.Errorf("%s: refused %d %s", tc.path, ref.Status, ref.Reason)
		case tc.status == 0 && got.Key() != tc.key:
			t.Errorf("%s: key %q, want %q", tc.path, got.Key(), tc.key)
		case tc.status != 0 && (ref == nil || ref.Status != tc.status):
			t.Errorf("%s: got %+v, %+v; want status %d", tc.path, got, ref, tc.status)
		}
	}
}

// FuzzParseALPN: the ALPN field comes from the network; whatever it holds,
// parsing must not panic, and what it accepts must survive alpnToken.
func FuzzParseALPN(f *testing.F) {
	f.Add("h2, http%2F1.1")
	f.Add("%")
	f.Add("%%%41,,")
	f.Fuzz(func(t *testing.T, v string) {
		ids, _, err := ParseALPN(http.Header{"Alpn": {v}})
		if err != nil {
			return
		}
		for _, id := range ids {
			if id == "" { // an empty element is skipped by the parser, so it cannot round-trip
				continue
			}
			back, _, err := ParseALPN(http.Header{"Alpn": {ALPNToken(id)}})
			if err != nil || len(back) != 1 || back[0] != id {
				t.Fatalf("%q: ALPNToken(%q) = %q parses back as %q, %v", v, id, ALPNToken(id), back, err)
			}
		}
	})
}
