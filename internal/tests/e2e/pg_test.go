package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// Two real tpd processes on one PostgreSQL database (database: from
// TP_DATABASE, its password from TP_DATABASE_PASSWORD), with the same ca/: a
// device enrolled with `tpd enroll` on A logs in with the real dlogin on B
// (enrollment and ACME on B's CA authority, over the shared CA tables), tp
// dials through A with that certificate, and `tpd revoke` on A makes B refuse
// the device within seconds, as does tpd policy eval beside B.
func TestPGTwoTPDProcesses(t *testing.T) {
	parallel(t)
	raceTPD(t)
	_, dsn := testpg.NewDatabase(t)
	env := []string{"TP_DATABASE=" + dsn, "TP_DATABASE_PASSWORD=" + testpg.Password}
	dirA := initTPD(t, testPolicy)
	dirB := filepath.Join(t.TempDir(), "tpdata")
	if err := os.MkdirAll(filepath.Join(dirB, "ca"), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"root.crt", "root.key", "intermediate.crt", "intermediate.key", "attestation-root.crt", "attestation-root.key"} {
		b, err := os.ReadFile(filepath.Join(dirA, "ca", f))
		if err == nil {
			err = os.WriteFile(filepath.Join(dirB, "ca", f), b, 0o600)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	run(t, nil, binary("tpd"), "init", "--data-dir", dirB)
	if err := os.WriteFile(filepath.Join(dirB, "policy", "tp.rego"), []byte(testPolicy), 0o600); err != nil {
		t.Fatal(err)
	}
	a := startTPD(t, dirA, "127.0.0.1:0", env)
	b := startTPD(t, dirB, "127.0.0.1:0", env)
	a.mustStop, b.mustStop = true, true
	if a.Fingerprint != b.Fingerprint {
		t.Fatalf("A's CA %s, B's %s: the same ca/ gave two CAs", a.Fingerprint, b.Fingerprint)
	}
	for _, s := range []*server{a, b} {
		if !strings.Contains(s.log.String(), "shared state in PostgreSQL") {
			t.Fatalf("tpd on %s does not say it uses the database:\n%s", s.Addr, s.log.String())
		}
	}

	if out := run(t, nil, binary("tpd"), "status", "--data-dir", dirA); !strings.Contains(out, "database postgres@127.0.0.1:") || !strings.Contains(out, ": connected, schema version") {
		t.Fatalf("tpd status on A does not name the database:\n%s", out)
	}
	args := a.enroll(t, "alice", "laptop")
	i := slices.Index(args, "--server")
	if i < 0 || i+1 >= len(args) {
		t.Fatalf("the dlogin line has no --server: %q", args)
	}
	args[i+1] = b.URL // log in on B with A's token
	home := filepath.Join(t.TempDir(), "tp-home")
	tpEnv := []string{"TP_HOME=" + home}
	if out := run(t, tpEnv, binary("dlogin"), args...); !strings.Contains(out, "Login successful!") {
		t.Fatalf("dlogin on B with a token from A:\n%s", out)
	}
	setServer(t, home, a.URL) // and dial through A
	echo := testnet.Echo(t)
	host, port, _ := strings.Cut(echo, ":")
	out, err := runErr(tpEnv, strings.NewReader("hello through A"), binary("tp"), host, port)
	if err != nil || !strings.Contains(out, "hello through A") {
		t.Fatalf("tp through A with the certificate B issued: %v\n%s", err, out)
	}

	run(t, nil, binary("tpd"), "revoke", "--device", "alice@laptop", "--data-dir", dirA)
	setServer(t, home, b.URL)
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err = runErr(tpEnv, strings.NewReader("x"), binary("tp"), host, port)
		if err != nil && strings.Contains(out, "revoked") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("B still lets alice@laptop in 30s after A revoked it: %v\n%s", err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// tpd policy eval beside B reads the same database (without migrating it).
	out, _ = runErr(env, nil, binary("tpd"), "policy", "eval", "--data-dir", dirB, "--user", "alice", "--device", "laptop", "--dest", echo)
	if !strings.Contains(out, "has been revoked") || !strings.Contains(out, "deny list") {
		t.Fatalf("tpd policy eval on B's data dir after A revoked alice@laptop:\n%s", out)
	}
}

// setServer points the client's profile at another instance.
func setServer(t testing.TB, home, url string) {
	t.Helper()
	path := filepath.Join(home, "profile.json")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var p map[string]any
	if err := json.Unmarshal(b, &p); err != nil {
		t.Fatal(err)
	}
	p["server"] = url
	if b, err = json.Marshal(p); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
