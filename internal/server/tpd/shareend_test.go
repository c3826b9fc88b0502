package tpd

import (
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/server/users"
)

// A share's end changes what live sessions were checked against, with no
// change in the user store, so that tpd re-checks them then (maintain asks
// every 2 s); the store is looked at again only when it changed or the next
// end came. Bad input: a share whose end passes while nothing else changes.
func TestSharesEndedCounts(t *testing.T) {
	var off atomic.Int64 // the store's clock runs behind by off, so a share can be made to end soon
	st, err := users.Open(filepath.Join(t.TempDir(), "users.json"), users.WithClock(func() time.Time {
		return time.Now().Add(-time.Duration(off.Load()))
	}))
	if err != nil {
		t.Fatal(err)
	}
	e, err := st.Enroll("alice", "laptop", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Redeem(e.Token, []byte("laptop key")); err != nil {
		t.Fatal(err)
	}
	d := &Daemon{users: st}
	if n := d.sharesEnded(st.Generation()); n != 0 {
		t.Fatalf("no shares: %d ended", n)
	}
	// A share made a minute ago in the store's time that ends 300 ms from now.
	end := time.Now().Add(300 * time.Millisecond)
	sh := users.Share{ID: users.NewShareID(), Name: "web", Guest: "bob@partner.example", User: "alice", By: "alice@laptop",
		Created: end.Add(-time.Minute), Until: end}
	off.Store(int64(time.Minute))
	if err := st.AddShare(sh, 0); err != nil {
		t.Fatal(err)
	}
	gen := st.Generation()
	if n := d.sharesEnded(gen); n != 0 {
		t.Fatalf("a share that has not ended counted: %d", n)
	}
	if !d.nextShareEnd.Equal(end) {
		t.Fatalf("the next end looked for is %s; want the share's %s", d.nextShareEnd, end)
	}
	for time.Now().Before(end) {
		time.Sleep(20 * time.Millisecond) // waiting for the share's end, which is 300 ms away
	}
	if st.Generation() != gen {
		t.Fatal("the store changed on its own")
	}
	if n := d.sharesEnded(gen); n != 1 {
		t.Fatalf("after the share's end, with the store unchanged: %d ended; want 1", n)
	}
	// Revoked, it counts no more as ended by time (the revocation changed the
	// store, which re-checks anyway).
	if _, err := st.RevokeShare(sh.ID); err != nil {
		t.Fatal(err)
	}
	if n := d.sharesEnded(st.Generation()); n != 0 {
		t.Fatalf("a revoked share counted as ended by time: %d", n)
	}
}
