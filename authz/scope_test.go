package authz

import (
	"strings"
	"testing"
)

// Bad input: scopes that are not expose:LABEL or expose-public:LABEL with a
// DNS label are refused, and a stored scope TP does not know allows nothing.
func TestParseScope(t *testing.T) {
	for _, ok := range []string{"", "expose:ssh", "expose-public:blog-1", "guest:ssh", "expose:" + strings.Repeat("a", 63)} {
		if _, err := ParseScope(ok); err != nil {
			t.Errorf("ParseScope(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"expose", "expose:", "dial:db", "expose:SSH", "expose:a.b", "expose:-x", "expose:x-",
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
	} {
		ok, why := tc.scope.Allows(tc.req)
		if ok != tc.want || !strings.Contains(why, tc.says) {
			t.Errorf("scope %q, %s: allowed %v (%q); want %v, saying %q", tc.scope, tc.req.Asked(), ok, why, tc.want, tc.says)
		}
	}
}
