package conformance

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"
)

// TestCorpusWellFormed checks the corpus files themselves: they decode
// strictly, ids are unique, each step has one action, and every case names a
// section that docs/PROTOCOL.md has.
func TestCorpusWellFormed(t *testing.T) {
	files := loadCorpus(t)
	spec, err := os.ReadFile("../../docs/PROTOCOL.md")
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
