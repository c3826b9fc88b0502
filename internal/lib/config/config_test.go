package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

func TestDefaultsValidate(t *testing.T) {
	if err := DefaultServer().Validate(); err != nil {
		t.Fatal(err)
	}
}

// Every bad setting is reported, each naming the setting.
func TestValidateReportsEveryProblem(t *testing.T) {
	s := DefaultServer()
	s.Listen = "nonsense"
	s.CertLifetime = time.Minute
	s.URL = "http://plain"
	s.MaxConns = 0
	s.LogLevel = "loud"
	s.PolicyTimeout = 0
	err := s.Validate()
	if err == nil {
		t.Fatal("invalid configuration accepted")
	}
	for _, want := range []string{"listen", "cert-lifetime", "url", "max-conns", "log-level", "policy-timeout"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %s:\n%v", want, err)
		}
	}
}

// File, then TP_* environment, then flags: each later source wins.
func TestLoadServerPrecedence(t *testing.T) {
	dir := t.TempDir()
	yaml := "listen: \"127.0.0.1:1111\"\ntoken-ttl: 2h\nmax-conns: 7\n"
	if err := os.WriteFile(filepath.Join(dir, FileName), []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TP_DATA_DIR", dir)
	t.Setenv("TP_MAX_CONNS", "9")
	t.Setenv("TP_LISTEN", "127.0.0.1:2222")
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	ServerFlags(fs)
	if err := fs.Parse([]string{"--listen", "127.0.0.1:3333"}); err != nil {
		t.Fatal(err)
	}
	s, err := LoadServer(fs)
	if err != nil {
		t.Fatal(err)
	}
	if s.Listen != "127.0.0.1:3333" {
		t.Errorf("listen %q: the flag should win", s.Listen)
	}
	if s.MaxConns != 9 {
		t.Errorf("max-conns %d: the environment should beat the file", s.MaxConns)
	}
	if s.TokenTTL != 2*time.Hour {
		t.Errorf("token-ttl %s: the file should beat the default", s.TokenTTL)
	}
	if s.DataDir != dir {
		t.Errorf("data-dir %q from TP_DATA_DIR", s.DataDir)
	}
}

// A config file that is not YAML is an error naming the file and the line,
// not a silent default. Bad input: an unclosed list, a key indented under a
// scalar, a key given twice. tpd once said "config file F: While parsing
// config: yaml: line 2: mapping values are not allowed in this context".
func TestLoadServerBadFile(t *testing.T) {
	for _, tc := range []struct{ yaml, want string }{
		{"listen: [unclosed", "is not valid YAML: line 1: did not find expected ',' or ']'"},
		{"log-level: debug\n  bad: [\n", "is not valid YAML: line 2: mapping values are not allowed in this context"},
		{"log-level: debug\nlog-level: info\n", `is not valid YAML: line 2: mapping key "log-level" already defined at line 1`},
	} {
		dir := t.TempDir()
		file := filepath.Join(dir, FileName)
		if err := os.WriteFile(file, []byte(tc.yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Setenv("TP_DATA_DIR", dir)
		_, err := LoadServer(nil)
		if err == nil || !strings.HasPrefix(err.Error(), "config file "+file+" ") || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "While parsing") {
			t.Errorf("malformed YAML %q: %v; want the file and %q", tc.yaml, err, tc.want)
		}
	}
}

func TestPublicURL(t *testing.T) {
	for _, c := range []struct {
		listen, url, want string
		names             []string
	}{
		{"127.0.0.1:8443", "", "https://127.0.0.1:8443", nil},
		{":443", "", "https://localhost", nil},
		{"0.0.0.0:8443", "", "https://localhost:8443", nil},
		{"[::1]:8443", "", "https://[::1]:8443", nil},
		{":443", "https://tp.example.org/", "https://tp.example.org", nil},
		// tpd init --name tp.example.org, then serve --listen 127.0.0.1:8443: the
		// URL once said 127.0.0.1, which the certificate does not name (dlogin got 421).
		{"127.0.0.1:8443", "", "https://tp.example.org:8443", []string{"tp.example.org"}},
		{"10.0.0.5:443", "", "https://tp.example.org", []string{"tp.example.org"}},
		{"TP.example.org:443", "", "https://TP.example.org", []string{"tp.example.org"}},
		{"[::1]:8443", "", "https://[::1]:8443", []string{"tp.example.org", "::1"}},
	} {
		s := DefaultServer()
		s.Listen, s.URL = c.listen, c.url
		if len(c.names) > 0 {
			s.Names = c.names
		}
		if got := s.PublicURL(); got != c.want {
			t.Errorf("listen %q url %q: PublicURL %q, want %q", c.listen, c.url, got, c.want)
		}
	}
}

func TestLoadClient(t *testing.T) {
	t.Setenv("TP_HOME", "/somewhere/tp")
	t.Setenv("TP_TIMEOUT", "5s")
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	ClientFlags(fs)
	c, err := LoadClient(fs)
	if err != nil {
		t.Fatal(err)
	}
	if c.Home != "/somewhere/tp" || c.Timeout != 5*time.Second {
		t.Errorf("client config from the environment: %+v", c)
	}
	t.Setenv("TP_TIMEOUT", "-1s")
	if _, err := LoadClient(fs); err == nil || !strings.Contains(err.Error(), "timeout") {
		t.Errorf("negative timeout accepted: %v", err)
	}
}

// A reverse zone that contains tpd's own name or a site (bad input:
// reverse-zone example.org with names [tp.example.org]) would let devices claim
// those names; a zone below them is fine.
func TestReverseZoneMustNotContainOwnNames(t *testing.T) {
	s := DefaultServer()
	s.Names = []string{"tp.example.org"}
	s.ReverseZone = "example.org"
	if err := s.Validate(); err == nil || !strings.Contains(err.Error(), "reverse-zone") {
		t.Fatalf("zone above tpd's name accepted: %v", err)
	}
	s.ReverseZone = "tp.example.org"
	if err := s.Validate(); err == nil {
		t.Fatal("zone equal to tpd's name accepted")
	}
	s.ReverseZone = "rev.tp.example.org"
	if err := s.Validate(); err != nil {
		t.Fatalf("zone below tpd's name refused: %v", err)
	}
	s.Sites = []Site{{Name: "blog.rev.tp.example.org", Root: t.TempDir()}}
	if err := s.Validate(); err == nil || !strings.Contains(err.Error(), "blog.rev.tp.example.org") {
		t.Fatalf("site under the zone accepted: %v", err)
	}
}

// A misspelled key in tpd.yaml (bad input: "max-con: 5") is an error naming it,
// not a silently ignored setting.
func TestLoadServerUnknownKey(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, FileName), []byte("max-con: 5\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TP_DATA_DIR", dir)
	_, err := LoadServer(nil)
	if err == nil || !strings.Contains(err.Error(), "max-con") {
		t.Fatalf("unknown key: %v", err)
	}
}

// public-ports: ranges and single ports, for both networks or one (suffix).
func TestPublicPorts(t *testing.T) {
	s := DefaultServer()
	s.PublicPorts = "20000-20010, 8080/tcp, 27015/UDP"
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		net  string
		port int
		want bool
	}{
		{"tcp", 20005, true}, {"udp", 20005, true}, {"tcp", 20011, false},
		{"tcp", 8080, true}, {"udp", 8080, false},
		{"udp", 27015, true}, {"tcp", 27015, false},
	} {
		if got := s.PublicPortAllowed(c.net, c.port); got != c.want {
			t.Errorf("%s port %d allowed: %v, want %v", c.net, c.port, got, c.want)
		}
	}
	// Bad input: each is refused with the entry and what it should be.
	for _, bad := range []string{"0", "70000", "30-20", "80/sctp", "http", "80/"} {
		s.PublicPorts = bad
		err := s.Validate()
		if err == nil || !strings.Contains(err.Error(), "public-ports") {
			t.Errorf("public-ports %q: %v; want an error naming public-ports", bad, err)
		}
	}
}

// The CA's bounds are validated, each out-of-range value named; the file tpd
// init writes carries them and loads back. Bad input: a zero rate, a burst too
// small for one login, a nonce bound of 1, a retention shorter than the longest
// certificate, a prune interval of a second.
func TestCABounds(t *testing.T) {
	s := DefaultServer()
	s.CARateLimit = 0
	s.CARateBurst = 5
	s.CAMaxNonces = 1
	s.CARetention = time.Hour
	s.CAPruneInterval = time.Second
	err := s.Validate()
	for _, want := range []string{"ca-rate-limit 0 must", "ca-rate-burst 5 must", "ca-max-nonces 1 must", "ca-retention 1h0m0s must", "ca-prune-interval 1s must"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error does not say %q:\n%v", want, err)
		}
	}

	dir := t.TempDir()
	s = DefaultServer()
	s.DataDir = dir
	s.CARateLimit, s.CARateBurst, s.CAMaxNonces, s.CARetention, s.CAPruneInterval = 2.5, 40, 5000, 72*time.Hour, 10*time.Minute
	if err := os.WriteFile(filepath.Join(dir, FileName), ServerYAML(s), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TP_DATA_DIR", dir)
	got, err := LoadServer(nil)
	if err != nil {
		t.Fatal(err)
	}
	if got.CARateLimit != 2.5 || got.CARateBurst != 40 || got.CAMaxNonces != 5000 || got.CARetention != 72*time.Hour || got.CAPruneInterval != 10*time.Minute {
		t.Errorf("tpd.yaml round trip: %+v", got)
	}
}

// Bad input: a misspelled key, a duration without a unit and a word for a
// number. Each is named with its value in words a person can act on, without
// mapstructure's internals ("'config.Server' has invalid keys", "time: unknown unit").
func TestLoadServerErrorsNameTheValue(t *testing.T) {
	dir := t.TempDir()
	yaml := "listne: \"127.0.0.1:1\"\ndial-timeout: 10 seconds\nmax-conns: lots\n"
	if err := os.WriteFile(filepath.Join(dir, FileName), []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TP_DATA_DIR", dir)
	_, err := LoadServer(nil)
	if err == nil {
		t.Fatal("LoadServer accepted a misspelled key and two bad values")
	}
	msg := err.Error()
	for _, want := range []string{"unknown setting: listne", `dial-timeout: "10 seconds" is not a duration`, `max-conns: "lots" is not a whole number`, filepath.Join(dir, FileName)} {
		if !strings.Contains(msg, want) {
			t.Errorf("error does not say %q:\n%s", want, msg)
		}
	}
	for _, internal := range []string{"config.Server", "decoding failed", "unknown unit", "strconv"} {
		if strings.Contains(msg, internal) {
			t.Errorf("error shows Go internals %q:\n%s", internal, msg)
		}
	}
}

// Bad input: TP_TIMEOUT=3 (no unit) for tp and dlogin.
func TestLoadClientBadDurationNamesTheValue(t *testing.T) {
	t.Setenv("TP_TIMEOUT", "3")
	_, err := LoadClient(pflag.NewFlagSet("test", pflag.ContinueOnError))
	if err == nil || !strings.Contains(err.Error(), `timeout: "3" is not a duration`) {
		t.Fatalf("TP_TIMEOUT=3: %v", err)
	}
}

// A backquoted word in a flag's usage becomes the value's name in --help
// (pflag's convention): `tpd enroll` in --url's usage rendered "--url tpd enroll".
func TestFlagUsageRendersTypeNames(t *testing.T) {
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	ServerFlags(fs)
	ClientFlags(fs)
	fs.VisitAll(func(f *pflag.Flag) {
		if name, _ := pflag.UnquoteUsage(f); strings.Contains(name, " ") {
			t.Errorf("--%s renders as %q in --help: its usage has a backquoted phrase", f.Name, "--"+f.Name+" "+name)
		}
	})
}

// shutdown-timeout: bad input is a negative or a day-long drain; both are refused
// with the setting named, and the default is 30s.
func TestShutdownTimeout(t *testing.T) {
	if got := DefaultServer().ShutdownTimeout; got != 30*time.Second {
		t.Errorf("default shutdown-timeout = %s, want 30s", got)
	}
	for _, d := range []time.Duration{-time.Second, 24 * time.Hour} {
		s := DefaultServer()
		s.ShutdownTimeout = d
		if err := s.Validate(); err == nil || !strings.Contains(err.Error(), "shutdown-timeout "+d.String()) {
			t.Errorf("shutdown-timeout %s: %v, want a refusal naming it", d, err)
		}
	}
	s := DefaultServer()
	s.ShutdownTimeout = 0 // abort at once is a valid choice
	if err := s.Validate(); err != nil {
		t.Errorf("shutdown-timeout 0 refused: %v", err)
	}
}

// typedKey is one key of tpd.yaml with the Go type it decodes into.
type typedKey struct {
	key string
	typ reflect.Type
}

// serverKeys lists every key of Server, squashed structs included.
func serverKeys(t reflect.Type) []typedKey {
	var out []typedKey
	for i := range t.NumField() {
		f := t.Field(i)
		tag := f.Tag.Get("mapstructure")
		if tag == ",squash" {
			out = append(out, serverKeys(f.Type)...)
			continue
		}
		if name, _, _ := strings.Cut(tag, ","); name != "" && name != "-" {
			out = append(out, typedKey{name, f.Type})
		}
	}
	return out
}

// Bad input, for every typed key of tpd.yaml: a duration without a unit
// (handshake-timeout: 10 was taken as 10 ns, and every handshake failed), a
// fraction for a whole number (cut silently), a number for true or false.
// The file is refused with a sentence that names the key and the value, as
// the same value in the environment is.
func TestLoadServerRefusesLooseTypesInFile(t *testing.T) {
	bad := func(typ reflect.Type) (yaml, env, says string, ok bool) {
		switch k := typ.Kind(); {
		case typ == reflect.TypeFor[time.Duration]():
			return "10", "10", "is not a duration", true
		case k >= reflect.Int && k <= reflect.Uint64:
			return "1.5", "1.5", "is not a whole number", true
		case k == reflect.Bool:
			return "2", "2", "is not true or false", true
		}
		return "", "", "", false
	}
	checked := map[string]bool{}
	for _, k := range serverKeys(reflect.TypeFor[Server]()) {
		yaml, env, says, ok := bad(k.typ)
		if !ok {
			continue
		}
		checked[k.typ.String()] = true
		t.Run(k.key, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, FileName), []byte(k.key+": "+yaml+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			t.Setenv("TP_DATA_DIR", dir)
			_, err := LoadServer(nil)
			if err == nil || !strings.Contains(err.Error(), k.key+": "+yaml+" "+says) {
				t.Errorf("%s: %s in the file: %v; want an error saying %q", k.key, yaml, err, k.key+": "+yaml+" "+says)
			}
			// The same value in the environment is refused too.
			os.Remove(filepath.Join(dir, FileName))
			t.Setenv("TP_"+strings.ToUpper(strings.NewReplacer("-", "_").Replace(k.key)), env)
			if _, err := LoadServer(nil); err == nil || !strings.Contains(err.Error(), k.key+": ") || !strings.Contains(err.Error(), says) {
				t.Errorf("%s=%s in the environment: %v; want an error saying %q", k.key, env, err, says)
			}
		})
	}
	for _, typ := range []string{"time.Duration", "int", "bool"} {
		if !checked[typ] {
			t.Errorf("no key of type %s was checked: the list of keys is wrong", typ)
		}
	}
	// Zero needs no unit, in the file as in the environment; a unit is fine.
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, FileName), []byte("shutdown-timeout: 0\nhandshake-timeout: 10s\nmax-conns: 7.0\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TP_DATA_DIR", dir)
	s, err := LoadServer(nil)
	if err != nil {
		t.Fatalf("shutdown-timeout: 0, handshake-timeout: 10s, max-conns: 7.0: %v", err)
	}
	if s.ShutdownTimeout != 0 || s.HandshakeTimeout != 10*time.Second || s.MaxConns != 7 {
		t.Errorf("got shutdown-timeout %s, handshake-timeout %s, max-conns %d; want 0s, 10s, 7", s.ShutdownTimeout, s.HandshakeTimeout, s.MaxConns)
	}
}

// reverse-pickup-timeout: bad input is no wait at all and an hour-long one;
// both are refused with the setting named, and the default is 10s.
func TestReversePickupTimeout(t *testing.T) {
	if got := DefaultServer().ReversePickupTimeout; got != 10*time.Second {
		t.Errorf("default reverse-pickup-timeout = %s, want 10s", got)
	}
	for _, d := range []time.Duration{0, time.Hour} {
		s := DefaultServer()
		s.ReversePickupTimeout = d
		if err := s.Validate(); err == nil || !strings.Contains(err.Error(), "reverse-pickup-timeout "+d.String()) {
			t.Errorf("reverse-pickup-timeout %s: %v, want a refusal naming it", d, err)
		}
	}
}

// TP_DIRECT and TP_DIRECT_INTERFACES (a comma-separated list) reach the
// client's configuration; a list with a name that cannot be an interface's
// (bad input: "eth0 wlan0", a space for a comma) is refused with a sentence
// that names the setting.
func TestLoadClientDirect(t *testing.T) {
	t.Setenv("TP_HOME", "/somewhere/tp")
	t.Setenv("TP_DIRECT", "true")
	t.Setenv("TP_DIRECT_INTERFACES", "lo,eth0")
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	ClientFlags(fs)
	c, err := LoadClient(fs)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Direct || strings.Join(c.DirectInterfaces, "+") != "lo+eth0" {
		t.Fatalf("direct settings from the environment: %v %q", c.Direct, c.DirectInterfaces)
	}
	t.Setenv("TP_DIRECT_INTERFACES", "eth0 wlan0")
	if _, err := LoadClient(fs); err == nil || !strings.Contains(err.Error(), "TP_DIRECT_INTERFACES") {
		t.Fatalf("an interface list with a space: %v", err)
	}
}
