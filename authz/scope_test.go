package authz

import (
	"strings"
	"testing"
)

// Bad input: scopes that are not expose:LABEL or expose-public:LABEL with a
// DNS label are refused, and a stored scope TP does not know allows nothing.
func TestParseScope(t *testing.T) {
	for _, ok := range []string{"", "expose:ssh", "expose-public:blog-1", "guest:ssh", "dial:ssh", "dial:*", "dial:*@https://tp.example.org", "dial:ssh@https://tp.example.org:8443", "expose:" + strings.Repeat("a", 63)} {
		if _, err := ParseScope(ok); err != nil {
			t.Errorf("ParseScope(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"expose", "expose:", "dial:", "dial:a.b", "dial:**", "expose:*", "guest:*", "expose:SSH",
		"dial:*@http://tp.example.org", "dial:*@https://TP.example.org", "dial:*@https://tp.example.org/", "dial:*@https://tp.example.org/x",
		"dial:*@https://u@tp.example.org", "dial:*@", "dial:ssh@tp.example.org", "expose:ssh@https://tp.example.org", "dial:*@https://" + strings.Repeat("a", 250) + ".org", "expose:a.b", "expose:-x", "expose:x-",
		"expose:a_b", "expose:" + strings.Repeat("a", 64), "expose-public", ":ssh", "expose:ssh:extra", "guest:", "guest:a.b"} {
		if _, err := ParseScope(bad); err == nil {
			t.Errorf("ParseScope(%q) accepted it", bad)
		}
	}
	alice := Identity{DeviceID: "alice@ci"}
	if ok, why := Scope("admin:all").Allows(Request{Action: ActionListen, Identity: alice, Destination: Destination{Reverse: "all"}}); ok || !strings.Contains(why, "enrol it again") {
		t.Errorf("an unknown stored scope: allowed %v, %q; want nothing allowed and a way out", ok, why)
	}
}

// A scoped device may keep its one name exposed and nothing else: no dial,
// no other name, no public exposure unless the scope says so.
func TestScopeAllows(t *testing.T) {
	alice := Identity{DeviceID: "alice@ci"}
	listen := func(label string) Request {
		return Request{Action: ActionListen, Identity: alice, Destination: Destination{Host: label + ".rev.tp.internal", Reverse: label}}
	}
	public := Request{Action: ActionExposePublic, Identity: alice, Destination: Destination{Reverse: "blog", Port: 20005, Network: "tcp"}}
	openPort := Request{Action: ActionExposePublic, Identity: alice, Destination: Destination{Port: 20006, Network: "tcp"}}
	httpTun := Request{Action: ActionExposeHTTP, Identity: alice, Destination: Destination{Host: "blog.rev.tp.internal", Reverse: "blog"}}
	dial := Request{Action: ActionDial, Identity: alice, Destination: Destination{Host: "127.0.0.1", Port: 22, Network: "tcp"}}
	ip := Request{Action: ActionIP, Identity: alice}
	guestDial := func(label, action string) Request {
		return Request{Action: action, Identity: alice, Destination: Destination{Host: label + ".rev.tp.internal", Port: 22, Network: "tcp", Reverse: label}}
	}
	for _, tc := range []struct {
		scope Scope
		req   Request
		want  bool
		says  string
	}{
		{"", dial, true, ""},
		{"expose:blog", listen("blog"), true, ""},
		{"expose:blog", httpTun, false, "to devices only"},
		{"expose-public:blog", httpTun, true, ""},
		{"expose:blog", listen("wiki"), false, "may only keep blog exposed (scope expose:blog), not listen as wiki.rev.tp.internal"},
		{"expose:blog", dial, false, "not dial 127.0.0.1:22"},
		{"expose:blog", ip, false, "not open an IP tunnel"},
		{"expose:blog", public, false, "to devices only"},
		{"expose-public:blog", public, true, ""},
		{"expose-public:blog", openPort, false, "not open public TCP port 20006"},
		{"expose-public:blog", dial, false, "not dial"},
		// A guest dials its one name, over TCP or UDP, and nothing else.
		{"guest:blog", guestDial("blog", ActionDial), true, ""},
		{"guest:blog", guestDial("blog", ActionDialUDP), true, ""},
		{"guest:blog", guestDial("wiki", ActionDial), false, "is a guest that may only connect to blog (scope guest:blog), not dial wiki.rev.tp.internal:22"},
		{"guest:blog", dial, false, "may only connect to blog"},
		{"guest:blog", listen("blog"), false, "not listen as blog.rev.tp.internal"},
		{"guest:blog", httpTun, false, "may only connect to blog"},
		{"guest:blog", ip, false, "not open an IP tunnel"},
		// A person's own credential to dial one name, or whatever the policy
		// lets the person dial; never listen, expose or open an IP tunnel.
		{"dial:blog", guestDial("blog", ActionDial), true, ""},
		{"dial:blog", guestDial("blog", ActionDialUDP), true, ""},
		{"dial:blog", guestDial("wiki", ActionDial), false, "may only connect to blog (scope dial:blog), not dial wiki.rev.tp.internal:22"},
		{"dial:blog", dial, false, "may only connect to blog"},
		{"dial:blog", listen("blog"), false, "not listen as blog.rev.tp.internal"},
		{"dial:*", dial, true, ""},
		{"dial:*", guestDial("wiki", ActionDialUDP), true, ""},
		{"dial:*", listen("blog"), false, "may only connect (scope dial:*), not listen as blog.rev.tp.internal"},
		{"dial:*", httpTun, false, "may only connect"},
		{"dial:*", public, false, "may only connect"},
		{"dial:*", ip, false, "not open an IP tunnel"},
		// Bound to an origin: the same rights.
		{"dial:*@https://tp.example.org", dial, true, ""},
		{"dial:blog@https://tp.example.org", guestDial("blog", ActionDial), true, ""},
		{"dial:blog@https://tp.example.org", guestDial("wiki", ActionDial), false, "may only connect to blog (scope dial:blog@https://tp.example.org)"},
		{"dial:*@https://tp.example.org", ip, false, "not open an IP tunnel"},
	} {
		ok, why := tc.scope.Allows(tc.req)
		if ok != tc.want || !strings.Contains(why, tc.says) {
			t.Errorf("scope %q, %s: allowed %v (%q); want %v, saying %q", tc.scope, tc.req.Asked(), ok, why, tc.want, tc.says)
		}
	}
}

// A dial scope names its origin and its name apart, and says both.
func TestScopeOrigin(t *testing.T) {
	for _, tc := range []struct {
		scope         Scope
		label, origin string
		says          string
	}{
		{"dial:*@https://tp.example.org", "*", "https://tp.example.org", "may only connect to what the policy allows its person, from pages of https://tp.example.org"},
		{"dial:ssh@https://a.example:8443", "ssh", "https://a.example:8443", "may only connect to ssh, from pages of https://a.example:8443"},
		{"dial:ssh", "ssh", "", "may only connect to ssh, and"},
		{"expose:ssh", "ssh", "", "exposed"},
	} {
		if tc.scope.Label() != tc.label || tc.scope.Origin() != tc.origin || !strings.Contains(tc.scope.Describe(), tc.says) {
			t.Errorf("%s: label %q origin %q describe %q", tc.scope, tc.scope.Label(), tc.scope.Origin(), tc.scope.Describe())
		}
	}
}
