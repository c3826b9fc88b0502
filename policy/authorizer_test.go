package policy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/policy"
)

// mapDirectory is a Directory backed by a map; revoked devices are listed separately.
type mapDirectory struct {
	groups  map[string][]string
	revoked map[string]bool
	scopes  map[string]authz.Scope
	calls   atomic.Int64
}

func (d *mapDirectory) Scope(deviceID string) authz.Scope { return d.scopes[deviceID] }

func (d *mapDirectory) Lookup(deviceID string) ([]string, error) {
	d.calls.Add(1)
	if d.revoked[deviceID] {
		return nil, fmt.Errorf("device %s was removed by an administrator: %w", deviceID, authz.ErrRevoked)
	}
	g, ok := d.groups[deviceID]
	if !ok {
		return nil, fmt.Errorf("%w: %s; enroll it with tpd enroll", authz.ErrUnknownDevice, deviceID)
	}
	return g, nil
}

var _ authz.Directory = (*mapDirectory)(nil)

// countingEvaluator counts calls to the evaluator it wraps.
type countingEvaluator struct {
	policy.Evaluator
	calls atomic.Int64
}

func (c *countingEvaluator) Eval(ctx context.Context, in map[string]any) (policy.Result, error) {
	c.calls.Add(1)
	return c.Evaluator.Eval(ctx, in)
}

func loadPolicy(t testing.TB, src string) *policy.Engine {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "tp.rego"), []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	// A generous timeout: a busy machine running -race must not turn slowness into
	// denials. The policy package tests the timeout itself.
	e, err := policy.Load(context.Background(), dir, policy.WithTimeout(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	return e
}

const dbaPolicy = `package tp.authz

default allow := false

allow if {
	input.action == "dial"
	input.destination.host == "db.internal"
	input.destination.port == 5432
	"dba" in input.identity.groups
}

reason := "postgres is for the dba group" if {
	not allow
	input.destination.port == 5432
}
`

func identity(user, device string, groups ...string) authz.Identity {
	return authz.Identity{
		DeviceID: authz.DeviceID(user, device),
		User:     user,
		Device:   device,
		Groups:   groups,
		Serial:   "0abc",
		NotAfter: time.Now().Add(time.Hour),
	}
}

func dial(id authz.Identity, host string, port int, ips ...string) authz.Request {
	req := authz.Request{
		Action:      authz.ActionDial,
		Identity:    id,
		Destination: authz.Destination{Host: host, Port: port, Network: "tcp"},
		Source:      authz.Source{Address: "192.0.2.7:50000", Transport: "quic"},
	}
	for _, ip := range ips {
		req.Destination.IPs = append(req.Destination.IPs, netip.MustParseAddr(ip))
	}
	return req
}

func TestInputContract(t *testing.T) {
	req := authz.Request{
		Action: authz.ActionDialUDP,
		Identity: authz.Identity{
			DeviceID: "alice@laptop", User: "alice", Device: "laptop",
			Groups: []string{"dba", "ops"}, Serial: "0a1b",
			NotAfter: time.Date(2030, 1, 2, 3, 4, 5, 0, time.FixedZone("CET", 3600)),
		},
		Destination: authz.Destination{
			Host: "dns.internal", Port: 53, Network: "udp",
			IPs: []netip.Addr{netip.MustParseAddr("::ffff:10.0.0.53"), netip.MustParseAddr("fd00::53"), netip.MustParseAddr("64:ff9b::a9fe:a9fe"), netip.MustParseAddr("2002:0a00:0001::1")},
		},
		Source: authz.Source{Address: "192.0.2.7:50000", Transport: "quic"},
		Time:   time.Date(2030, 1, 1, 12, 0, 0, 123456789, time.FixedZone("X", -7200)),
	}
	got, err := json.Marshal(authz.Input(req))
	if err != nil {
		t.Fatal(err)
	}
	const want = `{"action":"dial_udp",` +
		`"destination":{"embedded_ipv4":["169.254.169.254","10.0.0.1"],"host":"dns.internal","ips":["10.0.0.53","fd00::53","64:ff9b::a9fe:a9fe","2002:a00:1::1"],"network":"udp","port":53},` +
		`"identity":{"device":"laptop","device_id":"alice@laptop","expiry":"2030-01-02T02:04:05Z","groups":["dba","ops"],"serial":"0a1b","user":"alice"},` +
		`"source":{"address":"192.0.2.7:50000","transport":"quic"},` +
		`"time":"2030-01-01T14:00:00.123456789Z"}`
	if string(got) != want {
		t.Errorf("input\n got %s\nwant %s", got, want)
	}

	// Arrays are never null, even for an empty request.
	got, err = json.Marshal(authz.Input(authz.Request{}))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(got, []byte(`"groups":[]`)) || !bytes.Contains(got, []byte(`"ips":[]`)) || !bytes.Contains(got, []byte(`"embedded_ipv4":[]`)) || bytes.Contains(got, []byte("null")) {
		t.Errorf("empty request input has nulls: %s", got)
	}
}

// TestInputContractInRego checks every documented field name from inside Rego, so a
// renamed field fails here and not in someone's policy.
func TestInputContractInRego(t *testing.T) {
	e := loadPolicy(t, `package tp.authz

default allow := false

allow if {
	input.action == "dial"
	input.identity.user == "alice"
	input.identity.device == "laptop"
	input.identity.device_id == "alice@laptop"
	input.identity.groups == ["dba"]
	input.identity.serial == "0abc"
	time.parse_rfc3339_ns(input.identity.expiry) > time.now_ns()
	input.destination.host == "db.internal"
	input.destination.port == 5432
	is_number(input.destination.port)
	input.destination.network == "tcp"
	input.destination.ips == ["10.0.0.5"]
	input.destination.embedded_ipv4 == []
	input.source.address == "192.0.2.7:50000"
	input.source.transport == "quic"
	abs(time.parse_rfc3339_ns(input.time) - time.now_ns()) < 60 * 1000000000
}
`)
	p := &policy.Authorizer{Directory: &mapDirectory{}, Evaluator: e}
	d, err := p.Authorize(context.Background(), dial(identity("alice", "laptop", "dba"), "db.internal", 5432, "10.0.0.5"))
	if err != nil {
		t.Fatal(err)
	}
	if !d.Allow {
		t.Fatalf("contract policy denied: %q", d.Reason)
	}
}

func TestAuthorize(t *testing.T) {
	ctx := context.Background()
	engine := loadPolicy(t, dbaPolicy)
	ev := &countingEvaluator{Evaluator: engine}
	deny := &authz.DenyList{}
	deny.Add(authz.DenyUser, "mallory")
	deny.Add(authz.DenyDevice, "bob@stolen")
	deny.Add(authz.DenySerial, "0A:BD")
	var logs bytes.Buffer
	p := &policy.Authorizer{
		Directory: &mapDirectory{},
		Evaluator: ev,
		DenyList:  deny,
		Logger:    slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	stolenSerial := identity("bob", "pc", "dba")
	stolenSerial.Serial = "abd"
	expired := identity("bob", "pc", "dba")
	expired.NotAfter = time.Now().Add(-time.Minute)

	tests := []struct {
		name     string
		req      authz.Request
		allow    bool
		reason   string // substring
		evaluate bool
	}{
		{"dba allowed", dial(identity("bob", "pc", "dev", "dba"), "db.internal", 5432, "10.0.0.5"), true, "", true},
		{"dev denied with policy reason", dial(identity("carol", "pc", "dev"), "db.internal", 5432, "10.0.0.5"), false, "postgres is for the dba group", true},
		{"no groups denied", dial(identity("carol", "pc"), "db.internal", 5432, "10.0.0.5"), false, "postgres is for the dba group", true},
		{"denied without policy reason", dial(identity("bob", "pc", "dba"), "db.internal", 22, "10.0.0.5"), false,
			"policy does not allow bob@pc to dial db.internal:22", true},
		{"ipv6 destination reason", dial(identity("bob", "pc", "dba"), "fd00::1", 22, "fd00::1"), false,
			"policy does not allow bob@pc to dial [fd00::1]:22", true},
		{"revoked user", dial(identity("mallory", "pc", "dba"), "db.internal", 5432, "10.0.0.5"), false, "access for user mallory has been revoked", false},
		{"revoked device", dial(identity("bob", "stolen", "dba"), "db.internal", 5432, "10.0.0.5"), false, "device bob@stolen has been revoked", false},
		{"revoked serial", dial(stolenSerial, "db.internal", 5432, "10.0.0.5"), false, "certificate abd of bob@pc has been revoked", false},
		{"expired certificate", dial(expired, "db.internal", 5432, "10.0.0.5"), false, "expired at", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := ev.calls.Load()
			d, err := p.Authorize(ctx, tt.req)
			if err != nil {
				t.Fatal(err)
			}
			if d.Allow != tt.allow {
				t.Errorf("allow = %v, want %v (reason %q)", d.Allow, tt.allow, d.Reason)
			}
			if !strings.Contains(d.Reason, tt.reason) {
				t.Errorf("reason %q does not contain %q", d.Reason, tt.reason)
			}
			if evaluated := ev.calls.Load() > before; evaluated != tt.evaluate {
				t.Errorf("policy evaluated = %v, want %v", evaluated, tt.evaluate)
			}
		})
	}
	if !strings.Contains(logs.String(), "revision="+engine.Revision()) {
		t.Errorf("debug log lacks the policy revision:\n%s", logs.String())
	}
	// The same request again is answered by the decision cache, and the
	// Decision says so (tpd's metrics time the two apart).
	again := dial(identity("bob", "pc", "dev", "dba"), "db.internal", 5432, "10.0.0.5")
	first, err := p.Authorize(ctx, again)
	if err != nil {
		t.Fatal(err)
	}
	second, err := p.Authorize(ctx, again)
	if err != nil || !second.Allow || !second.Cached || first.Allow != second.Allow {
		t.Fatalf("a repeated request: %+v, %v; want the same allow, from the cache (Cached)", second, err)
	}
}

func TestAuthorizeFailsClosed(t *testing.T) {
	ctx := context.Background()
	req := dial(identity("bob", "pc", "dba"), "db.internal", 5432, "10.0.0.5")

	for _, tt := range []struct {
		name string
		ev   policy.Evaluator
	}{
		{"non-boolean allow", loadPolicy(t, "package tp.authz\n\nallow := \"yes\"\n")},
		{"undefined allow", loadPolicy(t, "package tp.authz\n\nallow if input.action == \"listen\"\n")},
		{"nil evaluator", nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := &policy.Authorizer{Directory: &mapDirectory{}, Evaluator: tt.ev}
			d, err := p.Authorize(ctx, req)
			if err == nil {
				t.Fatalf("no error; decision %+v", d)
			}
			if d.Allow || d.Reason != policy.ReasonFailed {
				t.Errorf("decision %+v, want a denial with %q", d, policy.ReasonFailed)
			}
		})
	}

	// A cancelled request context denies too.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	p := &policy.Authorizer{Evaluator: loadPolicy(t, dbaPolicy)}
	if d, err := p.Authorize(cctx, req); err == nil || d.Allow {
		t.Errorf("cancelled context: %+v, %v", d, err)
	}
}

func TestVerify(t *testing.T) {
	ca := testpki.New(t)
	dir := &mapDirectory{
		groups:  map[string][]string{"alice@laptop": {"ops", "dba", "ops"}, "bob@pc": nil, "carol@gone": {"x"}},
		revoked: map[string]bool{"carol@gone": true},
	}
	deny := &authz.DenyList{}
	p := &policy.Authorizer{Directory: dir, DenyList: deny}

	alice := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{}).Leaf
	id, err := p.Verify(alice)
	if err != nil {
		t.Fatal(err)
	}
	if id.DeviceID != "alice@laptop" || strings.Join(id.Groups, ",") != "dba,ops" {
		t.Errorf("identity %+v, want alice@laptop with groups dba,ops", id)
	}
	if got := dir.groups["alice@laptop"]; strings.Join(got, ",") != "ops,dba,ops" {
		t.Errorf("Verify modified the directory's slice: %v", got)
	}

	id, err = p.Verify(ca.ClientCert(t, "bob@pc", testpki.LeafOptions{}).Leaf)
	if err != nil {
		t.Fatal(err)
	}
	if id.Groups == nil {
		t.Error("groups are nil for a user without groups")
	}

	if _, err := p.Verify(ca.ClientCert(t, "eve@pc", testpki.LeafOptions{}).Leaf); !errors.Is(err, authz.ErrUnknownDevice) {
		t.Errorf("unknown device: err = %v, want ErrUnknownDevice", err)
	}
	if _, err := p.Verify(ca.ClientCert(t, "carol@gone", testpki.LeafOptions{}).Leaf); !errors.Is(err, authz.ErrRevoked) {
		t.Errorf("device revoked in directory: err = %v, want ErrRevoked", err)
	}
	if _, err := p.Verify(ca.ServerCert(t, "tp.example").Leaf); err == nil || !strings.Contains(err.Error(), "run dlogin") {
		t.Errorf("server certificate: err = %v", err)
	}

	// The deny list is checked before the directory.
	for _, tt := range []struct {
		kind  authz.DenyKind
		value string
	}{
		{authz.DenyUser, "alice"},
		{authz.DenyDevice, "alice@laptop"},
		{authz.DenySerial, "0x" + strings.ToUpper(alice.SerialNumber.Text(16))},
	} {
		deny.Add(tt.kind, tt.value)
		before := dir.calls.Load()
		_, err := p.Verify(alice)
		if !errors.Is(err, authz.ErrRevoked) || !strings.Contains(err.Error(), "revoked") {
			t.Errorf("deny-listed %v %s: err = %v", tt.kind, tt.value, err)
		}
		if dir.calls.Load() != before {
			t.Errorf("deny-listed %v: directory was consulted", tt.kind)
		}
		deny.Remove(tt.kind, tt.value)
	}
	if _, err := p.Verify(alice); err != nil {
		t.Errorf("after removing deny entries: %v", err)
	}

	if _, err := (&policy.Authorizer{}).Verify(alice); err == nil {
		t.Error("a Policy without a Directory accepted a device")
	}
}

func TestDenyList(t *testing.T) {
	var d authz.DenyList // zero value is usable
	if d.Contains(authz.DenyUser, "alice") {
		t.Fatal("empty list contains alice")
	}
	d.Add(authz.DenyUser, " Alice ")
	d.Add(authz.DenySerial, "00:0A:BC")
	d.Add(authz.DenyDevice, "bob@pc")
	for _, tt := range []struct {
		kind  authz.DenyKind
		value string
		want  bool
	}{
		{authz.DenyUser, "alice", true},
		{authz.DenyDevice, "alice", false},
		{authz.DenySerial, "abc", true},
		{authz.DenySerial, "0xABC", true},
		{authz.DenySerial, "abcd", false},
		{authz.DenyDevice, "bob@pc", true},
		{authz.DenyUser, "bob", false},
	} {
		if got := d.Contains(tt.kind, tt.value); got != tt.want {
			t.Errorf("Contains(%v, %q) = %v, want %v", tt.kind, tt.value, got, tt.want)
		}
	}
	if got := d.Entries(authz.DenySerial); len(got) != 1 || got[0] != "abc" {
		t.Errorf("Entries(serial) = %v", got)
	}
	d.Remove(authz.DenyUser, "ALICE")
	if d.Contains(authz.DenyUser, "alice") {
		t.Error("Remove did not remove")
	}
	d.Remove(authz.DenyUser, "nobody") // no-op

	var nilList *authz.DenyList
	if nilList.Contains(authz.DenyUser, "alice") {
		t.Error("nil list denies")
	}
	if _, denied := nilList.Denies(identity("alice", "laptop")); denied {
		t.Error("nil list denies an identity")
	}

	// Concurrent use, for -race.
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 200 {
				v := fmt.Sprintf("u%d-%d", i, j)
				d.Add(authz.DenyUser, v)
				if !d.Contains(authz.DenyUser, v) {
					t.Errorf("lost %s", v)
				}
				d.Denies(identity(v, "pc"))
				d.Remove(authz.DenyUser, v)
			}
		}()
	}
	wg.Wait()
}

func BenchmarkAuthorize(b *testing.B) {
	ctx := context.Background()
	for _, bc := range []struct{ name, src string }{
		{"default", policy.DefaultPolicy},
		{"dba", dbaPolicy},
	} {
		for _, cached := range []bool{true, false} {
			name := bc.name + "/cached"
			var opts []policy.Option
			if !cached {
				name, opts = bc.name+"/uncached", []policy.Option{policy.WithoutCache()}
			}
			b.Run(name, func(b *testing.B) {
				eng := load(b, writePolicy(b, map[string]string{"tp.rego": bc.src}), opts...)
				p := &policy.Authorizer{Directory: &mapDirectory{}, Evaluator: eng, DenyList: &authz.DenyList{}}
				req := dial(identity("bob", "pc", "dev", "dba"), "db.internal", 5432, "10.0.0.5")
				b.ReportAllocs()
				for b.Loop() {
					// A new time for every request, as tpd's: the policy does
					// not read it, so the cache answers all but the first.
					req.Time = time.Now()
					if _, err := p.Authorize(ctx, req); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// A device's scope is checked before the policy: with a policy that allows
// everything, a device scoped to expose "blog" keeps "blog" (the policy is
// asked) and is refused a dial, another name and an IP tunnel without the
// policy being asked. Bad input: requests outside the scope; MayAllow says no
// to them too, so the proxy resolves nothing for them.
func TestScopeBeforePolicy(t *testing.T) {
	ctx := context.Background()
	ev := &countingEvaluator{Evaluator: loadPolicy(t, "package tp.authz\nimport rego.v1\ndefault allow := true\n")}
	dir := &mapDirectory{scopes: map[string]authz.Scope{"alice@ci": "expose:blog"}}
	p := &policy.Authorizer{Directory: dir, Evaluator: ev}
	ci := identity("alice", "ci")
	listen := func(label string) authz.Request {
		return authz.Request{Action: authz.ActionListen, Identity: ci,
			Destination: authz.Destination{Host: label + ".rev.tp.internal", Network: "tcp", Reverse: label}}
	}
	if d, err := p.Authorize(ctx, listen("blog")); err != nil || !d.Allow {
		t.Fatalf("listen as blog inside the scope: %+v, %v; want allowed", d, err)
	}
	if n := ev.calls.Load(); n != 1 {
		t.Fatalf("the policy was asked %d times for a request inside the scope; want once", n)
	}
	for _, req := range []authz.Request{
		dial(ci, "127.0.0.1", 22, "127.0.0.1"),
		listen("wiki"),
		{Action: authz.ActionIP, Identity: ci},
	} {
		d, err := p.Authorize(ctx, req)
		if err != nil || d.Allow || !strings.Contains(d.Reason, "may only keep blog exposed") {
			t.Errorf("%s outside the scope: %+v, %v; want refused, naming the scope", req.Asked(), d, err)
		}
		if may, err := p.MayAllow(ctx, req); may || err != nil {
			t.Errorf("MayAllow(%s) outside the scope: %v, %v; want false", req.Asked(), may, err)
		}
	}
	if n := ev.calls.Load(); n != 1 {
		t.Fatalf("the policy was asked %d times in all; want once: requests outside the scope never reach it", n)
	}
	// Without a scope the same device does what the policy allows.
	dir.scopes = nil
	if d, err := p.Authorize(ctx, dial(ci, "127.0.0.1", 22, "127.0.0.1")); err != nil || !d.Allow {
		t.Fatalf("dial without a scope: %+v, %v; want allowed", d, err)
	}
}
