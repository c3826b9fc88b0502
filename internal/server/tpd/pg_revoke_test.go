package tpd

import (
	"context"
	"errors"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/internal/server/admin"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// tpd revoke on one of two instances on a database, through the admin socket
// as the command asks: what it prints names the database as where the entry is
// kept, counts the live session it closed as this instance's, and names the
// other instance as closing its own, which it does. Bad input: alice@laptop
// revoked while she has a live session on each instance. tpd revoke once said
// "1 live session(s) were closed. The entry is kept in DATA_DIR/denylist.json"
// (a file that does not exist then, and a count of one instance's sessions as if
// it were all).
func TestPGRevokeSaysWhereAndWhoElse(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	cfgA := pgDataDir(t, dsn, nil)
	a := runDaemon(t, cfgA)
	cfgB := pgDataDir(t, dsn, &cfgA)
	b := runDaemon(t, cfgB)
	echo := testnet.Echo(t)
	ctx := context.Background()

	c, _, _ := enrollClient(t, a.d, a.url, "alice", "laptop")
	onA := openSession(t, c, echo)
	c.Profile.Server = b.url
	onB := openSession(t, c, echo)
	waitFor(t, "A to see B's heartbeat", func() bool { return slices.Equal(a.d.otherInstances(ctx), []string{b.d.instance}) })

	res, err := admin.NewClient(cfgA.AdminSocket()).Revoke(ctx, admin.RevokeRequest{Kind: "device", Value: "alice@laptop"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Closed != 1 || res.KeptIn != admin.KeptInDatabase || !slices.Equal(res.OtherInstances, []string{b.d.instance}) {
		t.Errorf("A's answer %+v: want 1 session closed, kept in the database, the other instance %s", res, b.d.instance)
	}
	want := "Revoked device alice@laptop: new connections are refused on every instance, and 1 live session on this instance was closed; " +
		"the other instance, " + b.d.instance + ", closes its own within seconds. " +
		"The entry is kept in the database (database: in tpd.yaml), which every instance reads."
	got := res.Summary()
	if got != want {
		t.Errorf("tpd revoke prints:\n%s\nwant:\n%s", got, want)
	}
	if strings.Contains(got, "denylist.json") || strings.Contains(got, "session(s)") {
		t.Errorf("tpd revoke names the deny list file of a tpd without one, or counts sessions as session(s):\n%s", got)
	}
	if _, err := os.Stat(cfgA.DenyListFile()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s: %v; with a database the deny list has no file", cfgA.DenyListFile(), err)
	}
	waitClosed(t, onA)
	waitClosed(t, onB) // what the message promises of the other instance

	// Revoked again: nothing changes, and the other instances are not told to
	// re-check (they hold the entry already), so the message does not say they do.
	res, err = admin.NewClient(cfgB.AdminSocket()).Revoke(ctx, admin.RevokeRequest{Kind: "device", Value: "alice@laptop"})
	if err != nil {
		t.Fatal(err)
	}
	if got := res.Summary(); !strings.Contains(got, "was already revoked") || !strings.Contains(got, "0 live sessions on this instance were closed.") || strings.Contains(got, "other instance") {
		t.Errorf("tpd revoke of a revoked device on B prints:\n%s", got)
	}
}

// Without a database, tpd revoke names the deny list file and counts the
// sessions it closed, in words. Bad input: alice@laptop revoked with one live
// session. It once said "1 live session(s) were closed".
func TestRevokeSaysTheFile(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, allowAlice)
	c, _, _ := enrollClient(t, d, url, "alice", "laptop")
	live := openSession(t, c, testnet.Echo(t))
	res, err := admin.NewClient(d.cfg.AdminSocket()).Revoke(context.Background(), admin.RevokeRequest{Kind: "device", Value: "alice@laptop"})
	if err != nil {
		t.Fatal(err)
	}
	want := "Revoked device alice@laptop: new connections are refused, and 1 live session was closed. The entry is kept in " + d.cfg.DenyListFile() + "."
	if got := res.Summary(); got != want || res.OtherInstances != nil {
		t.Errorf("tpd revoke prints:\n%s\nwant:\n%s\n(other instances %q; want none without a database)", got, want, res.OtherInstances)
	}
	if _, err := os.Stat(d.cfg.DenyListFile()); err != nil {
		t.Errorf("the file tpd revoke names: %v", err)
	}
	waitClosed(t, live)
}
