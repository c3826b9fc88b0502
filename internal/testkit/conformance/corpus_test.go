package conformance

import (
	"encoding/json"
	"maps"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/proxy"
)

// TestCorpusWellFormed checks the corpus files themselves: they decode
// strictly, ids are unique, each step has one action, and every case names a
// section that docs/PROTOCOL.md has.
func TestCorpusWellFormed(t *testing.T) {
	files := loadCorpus(t)
	spec, err := os.ReadFile("../../../docs/PROTOCOL.md")
	if err != nil {
		t.Fatal(err)
	}
	sections := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^#{2,3} ([0-9]+(?:\.[0-9]+)?)\.? `).FindAllSubmatch(spec, -1) {
		sections[string(m[1])] = true
	}
	for _, f := range files {
		for _, c := range f.Cases {
			if !sections[c.Section] {
				t.Errorf("%s: case %s names section %q, which docs/PROTOCOL.md does not have", f.Name, c.ID, c.Section)
			}
		}
		for _, c := range f.AgentCases {
			if !sections[c.Section] {
				t.Errorf("%s: case %s names section %q, which docs/PROTOCOL.md does not have", f.Name, c.ID, c.Section)
			}
		}
		for _, c := range f.ClientCases {
			if !sections[c.Section] {
				t.Errorf("%s: case %s names section %q, which docs/PROTOCOL.md does not have", f.Name, c.ID, c.Section)
			}
		}
	}
}

// TestCheckRejects feeds the corpus checker corpora that break its rules:
// each must be reported.
func TestCheckRejects(t *testing.T) {
	for name, c := range map[string]Case{
		"two actions in a step": {ID: "a", Section: "2", Transport: "tls", Summary: "s",
			Steps: []Step{{SendRaw: ptr("00"), CloseWrite: true}}},
		"no action": {ID: "a", Section: "2", Transport: "tls", Summary: "s", Steps: []Step{{On: "x"}}},
		"bad hex":   {ID: "a", Section: "2", Transport: "tls", Summary: "s", Steps: []Step{{SendRaw: ptr("0g")}}},
		"transport": {ID: "a", Section: "2", Transport: "udp", Summary: "s", Steps: []Step{{CloseWrite: true}}},
		"end kind":  {ID: "a", Section: "2", Transport: "tls", Summary: "s", Steps: []Step{{ExpectEnd: "maybe"}}},
	} {
		if err := Check([]File{{Name: "x.json", Cases: []Case{c}}}); err == nil {
			t.Errorf("%s: Check accepted it", name)
		}
	}
	dup := Case{ID: "a", Section: "2", Transport: "tls", Summary: "s", Steps: []Step{{CloseWrite: true}}}
	if err := Check([]File{{Name: "x.json", Cases: []Case{dup, dup}}}); err == nil || !strings.Contains(err.Error(), `"a"`) {
		t.Errorf("two cases with id a: Check said %v", err)
	}
}

// TestFrameExpect checks the frame matcher on frames that match and frames
// that differ; a difference must name the field.
func TestFrameExpect(t *testing.T) {
	vars := Vars{"port": 22, "name": "conf-t1"}
	for _, tc := range []struct {
		name, frame, expect string
		wantErr             string // "" when the frame matches
	}{
		{"equal", `{"v":1,"ok":false,"code":"bad_request","reason":"r"}`, `{"match":{"v":1,"ok":false,"code":"bad_request"},"present":["reason"]}`, ""},
		{"other code", `{"v":1,"ok":false,"code":"unknown_op","reason":"r"}`, `{"match":{"code":"bad_request"}}`, `"code"`},
		{"number as written", `{"v":1.0}`, `{"match":{"v":1}}`, `"v"`},
		{"number from a variable", `{"port":22}`, `{"match":{"port":"${port}"}}`, ""},
		{"text from a variable", `{"names":["conf-t1.zone"]}`, `{"match":{"names":["${name}.zone"]}}`, ""},
		{"array differs", `{"names":["a","b"]}`, `{"match":{"names":["a"]}}`, `"names"`},
		{"nested partial", `{"end":{"code":"peer_reset","by":"agent","reason":"r"}}`, `{"match":{"end":{"by":"agent"}}}`, ""},
		{"nested differs", `{"end":{"code":"peer_reset","by":"agent"}}`, `{"match":{"end":{"by":"destination"}}}`, `"end.by"`},
		{"missing", `{"v":1}`, `{"match":{"ok":true}}`, `"ok" is missing`},
		{"absent", `{"v":1,"session":"ab"}`, `{"absent":["session"]}`, `"session" is present`},
		{"present", `{"v":1}`, `{"present":["end.reason"]}`, `"end.reason" is missing`},
		{"pattern", `{"session":"ABC"}`, `{"pattern":{"session":"^[0-9a-f]{32}$"}}`, `"session"`},
		{"exact", `{"v":1,"op":"dial","extra":1}`, `{"match":{"v":1,"op":"dial"},"exact":true}`, `"extra"`},
		{"not an object", `[1]`, `{"match":{"v":1}}`, "not one JSON object"},
		{"trailing bytes", `{"v":1} `, `{"match":{"v":1}}`, "not one JSON object"},
	} {
		var e FrameExpect
		if err := json.Unmarshal([]byte(tc.expect), &e); err != nil {
			t.Fatal(err)
		}
		err := e.Check([]byte(tc.frame), vars)
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("%s: frame %s, expectation %s: %v", tc.name, tc.frame, tc.expect, err)
		case tc.wantErr != "" && err == nil:
			t.Errorf("%s: frame %s matched expectation %s", tc.name, tc.frame, tc.expect)
		case tc.wantErr != "" && !strings.Contains(err.Error(), tc.wantErr):
			t.Errorf("%s: error %q does not mention %s", tc.name, err, tc.wantErr)
		}
	}
	var e FrameExpect
	_ = json.Unmarshal([]byte(`{"capture":{"session":"sid"}}`), &e)
	if err := e.Check([]byte(`{"session":"abc"}`), vars); err != nil || vars["sid"] != "abc" {
		t.Errorf("capture: %v, sid=%v", err, vars["sid"])
	}
	if _, err := (Vars{}).FrameBody(json.RawMessage(`{"port":"${nope}"}`)); err == nil {
		t.Error("an unknown variable was substituted")
	}
}

func ptr[T any](v T) *T { return &v }

// loadCorpus reads docs/conformance and fails the test when a case is malformed.
func loadCorpus(t *testing.T) []File {
	t.Helper()
	files, err := Load(corpusDir)
	if err != nil {
		t.Fatal(err)
	}
	if err := Check(files); err != nil {
		t.Fatalf("the corpus is malformed:\n%v", err)
	}
	return files
}

// TestCasesNameWhatTheyNeed: a case's needs list follows from its steps. A
// hello whose host is a valid name outside the reverse zone makes a server
// resolve it, so the case needs the fixture's resolver; a case that expects
// policy_denied needs the fixture's policy. dial-host-name-canonical once sent
// Echo.Conf.Test. unmarked, so a runner that skipped resolver cases by their
// variables still made the server ask the machine's resolver.
func TestCasesNameWhatTheyNeed(t *testing.T) {
	// The fixture's values of the variables that can stand for a host; the
	// others only fill ports and labels.
	vars := Vars{"echo_host": "127.0.0.1", "echo_name": "echo.conf.test", "missing_name": "missing.conf.test",
		"zone": "rev.tp.internal", "uniq": "u1", "alice_id": "alice@laptop"}
	hostsIn := func(t *testing.T, s Step) []string {
		var bodies [][]byte
		if s.Send != nil {
			bodies = append(bodies, s.Send)
		}
		if s.SendBody != nil {
			bodies = append(bodies, []byte(*s.SendBody))
		}
		if s.SendRaw != nil { // framed hellos sent byte for byte
			b, err := Hex(*s.SendRaw)
			if err != nil {
				t.Fatal(err)
			}
			for len(b) >= 2 {
				n := int(b[0])<<8 | int(b[1])
				if len(b) < 2+n {
					break
				}
				bodies = append(bodies, b[2:2+n])
				b = b[2+n:]
			}
		}
		var hosts []string
		for _, body := range bodies {
			var hello struct{ Host *string }
			if json.Unmarshal(body, &hello) == nil && hello.Host != nil {
				h, err := vars.Subst(*hello.Host)
				if err != nil {
					t.Fatalf("host %q: %v", *hello.Host, err)
				}
				hosts = append(hosts, h)
			}
		}
		return hosts
	}
	marked := 0
	for _, f := range loadCorpus(t) {
		for _, c := range f.Cases {
			want := map[string]bool{}
			for _, s := range c.Steps {
				for _, h := range hostsIn(t, s) {
					canon, err := proxy.CanonicalHost(h)
					if err != nil || strings.HasSuffix(canon, "."+vars["zone"].(string)) {
						continue // refused before any lookup, or a reverse name
					}
					if _, err := netip.ParseAddr(canon); err != nil {
						want[NeedsResolver] = true
					}
				}
				if s.Expect != nil {
					var m struct{ Code string }
					if json.Unmarshal(s.Expect.Match, &m) == nil && m.Code == "policy_denied" {
						want[NeedsPolicy] = true
					}
				}
			}
			got := map[string]bool{}
			for _, n := range c.Needs {
				got[n] = true
			}
			if !maps.Equal(got, want) {
				t.Errorf("%s: case %s has needs %v; its steps need %v", f.Name, c.ID, slices.Sorted(maps.Keys(got)), slices.Sorted(maps.Keys(want)))
			}
			if len(want) > 0 {
				marked++
			}
		}
	}
	if marked == 0 {
		t.Error("no case needs the resolver or the policy: the derivation above found nothing to check")
	}
}
