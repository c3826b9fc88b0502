package admin

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/server/users"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// TestMain stops the PostgreSQL server the PostgreSQL variants start.
func TestMain(m *testing.M) { os.Exit(testpg.Main(m)) }

// tpd users unbind through the admin socket, on the file store and on
// PostgreSQL: a bound user is unbound (the answer and the audit act say
// which account it was bound to), after which another account binds it;
// the bad inputs are a user bound to nothing (unchanged), one that does not
// exist and a name that is not one (refused), each audited.
func TestUnbind(t *testing.T) {
	for _, store := range []string{"file", "postgres"} {
		t.Run(store, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			var st users.Store
			if store == "file" {
				f, err := users.Open(filepath.Join(dir, "users.json"))
				if err != nil {
					t.Fatal(err)
				}
				st = f
			} else {
				_, dsn := testpg.NewDatabase(t)
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				db, err := pgstore.Open(ctx, pgstore.Config{DSN: dsn, Password: testpg.Password})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(db.Close)
				if st, err = pgstore.OpenUsers(ctx, db); err != nil {
					t.Fatal(err)
				}
			}
			var mu sync.Mutex
			var acts []Act
			sock := filepath.Join(dir, "admin.sock")
			ln, err := Listen(sock)
			if err != nil {
				t.Fatal(err)
			}
			srv := &http.Server{Handler: (&Server{Users: st, OnAct: func(a Act) { mu.Lock(); acts = append(acts, a); mu.Unlock() }}).Handler()}
			go srv.Serve(ln)
			t.Cleanup(func() { srv.Close() })
			lastAct := func() Act {
				mu.Lock()
				defer mu.Unlock()
				if len(acts) == 0 {
					t.Fatal("nothing audited")
				}
				return acts[len(acts)-1]
			}
			c := NewClient(sock)
			ctx := context.Background()

			if err := st.BindUser("alice", "s-old"); err != nil {
				t.Fatal(err)
			}
			res, err := c.Unbind(ctx, "alice")
			if err != nil || res.User != "alice" || res.Subject != "s-old" {
				t.Fatalf("unbind alice: %+v, %v; want it to say s-old was cleared", res, err)
			}
			if s := res.Summary(); !strings.Contains(s, `User alice was bound to the identity provider's account "s-old"`) || !strings.Contains(s, "binding is cleared") {
				t.Fatalf("summary %q does not say what changed", s)
			}
			if a := lastAct(); a.Act != "unbind_user" || a.Subject != "alice" || a.Result != "ok" || len(a.Changed) != 1 || a.Changed[0] != `sso-subject: "s-old" → none` {
				t.Fatalf("audited %+v; want unbind_user of alice, ok, naming s-old", a)
			}
			if err := st.BindUser("alice", "s-new"); err != nil {
				t.Fatalf("another account after the unbind: %v", err)
			}

			if err := st.BindUser("bob", "s-bob"); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Unbind(ctx, "bob"); err != nil {
				t.Fatal(err)
			}
			res, err = c.Unbind(ctx, "bob")
			if err != nil || res.Subject != "" || !strings.Contains(res.Summary(), "User bob is not bound to an account at the identity provider; nothing changed") {
				t.Fatalf("unbind bob again: %+v (%q), %v; want nothing changed", res, res.Summary(), err)
			}
			if a := lastAct(); a.Act != "unbind_user" || a.Result != "unchanged" {
				t.Fatalf("audited %+v; want unbind_user unchanged", a)
			}

			if _, err := c.Unbind(ctx, "nobody"); err == nil || !strings.Contains(err.Error(), "there is no user nobody") {
				t.Fatalf("unbind a user that does not exist: %v; want a refusal saying so", err)
			}
			if a := lastAct(); a.Result != "refused" || a.Subject != "nobody" {
				t.Fatalf("audited %+v; want the refusal", a)
			}
			if _, err := c.Unbind(ctx, "Not A Name"); err == nil || !strings.Contains(err.Error(), `user "Not A Name"`) {
				t.Fatalf("unbind a name that is not one: %v; want a refusal", err)
			}
			if a := lastAct(); a.Result != "refused" {
				t.Fatalf("audited %+v; want the refusal", a)
			}
		})
	}
}
