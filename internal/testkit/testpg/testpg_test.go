package testpg_test

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

func TestMain(m *testing.M) { os.Exit(testpg.Main(m)) }

func connect(t *testing.T, dsn string) (*pgx.Conn, error) {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Password = testpg.Password
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return pgx.ConnectConfig(ctx, cfg)
}

// Each test's database is its own: a table made in one is not in the other.
func TestDatabasesAreSeparate(t *testing.T) {
	_, dsn1 := testpg.NewDatabase(t)
	_, dsn2 := testpg.NewDatabase(t)
	if dsn1 == dsn2 {
		t.Fatalf("two databases share the DSN %s", dsn1)
	}
	ctx := context.Background()
	c1, err := connect(t, dsn1)
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close(ctx)
	if _, err := c1.Exec(ctx, "CREATE TABLE only_here (x int)"); err != nil {
		t.Fatal(err)
	}
	c2, err := connect(t, dsn2)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close(ctx)
	var n int
	if err := c2.QueryRow(ctx, "SELECT count(*) FROM pg_tables WHERE tablename = 'only_here'").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatalf("a table created in %s is visible in %s", dsn1, dsn2)
	}
}

// A wrong password over TCP is refused: the server really checks it.
func TestWrongPasswordRefused(t *testing.T) {
	_, dsn := testpg.NewDatabase(t)
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Password = "not-the-password"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err == nil {
		c.Close(ctx)
		t.Fatal("connecting with the password \"not-the-password\" succeeded")
	}
}

// Stop makes the server unreachable and Start brings it back with the data.
func TestStopStart(t *testing.T) {
	srv, dsn := testpg.NewDatabase(t)
	ctx := context.Background()
	c, err := connect(t, dsn)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)"); err != nil {
		t.Fatal(err)
	}
	c.Close(ctx)
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	if c, err := connect(t, dsn); err == nil {
		c.Close(ctx)
		t.Fatal("connected to a stopped server")
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	c, err = connect(t, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var x int
	if err := c.QueryRow(ctx, "SELECT x FROM kept").Scan(&x); err != nil || x != 42 {
		t.Fatalf("after a restart: x = %d, %v; want 42", x, err)
	}
}
