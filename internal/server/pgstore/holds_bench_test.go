package pgstore_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/reverse"
)

// backendCPU is the CPU time PostgreSQL's backend processes pids have used
// (user + system, /proc/PID/stat; clock ticks of 10 ms).
func backendCPU(b *testing.B, pids []int) time.Duration {
	b.Helper()
	var sum time.Duration
	for _, pid := range pids {
		raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			b.Fatal(err)
		}
		s := string(raw)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:]) // fields from 3 on
		ut, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		sum += time.Duration(ut+st) * 10 * time.Millisecond
	}
	return sum
}

// The load leases put on PostgreSQL per 1,000 agents (one key each), on one
// connection so that one backend process does all the work and its CPU can be
// read (the pool's two connections; the schema migration needs two): a renewal round of one instance serving them (one UPDATE of 1,000
// rows), one agent's registration (the claim: BEGIN, INSERT … ON CONFLICT,
// NOTIFY, COMMIT), and, as the baseline of the same run, a bare round trip
// (SELECT 1). Metrics: wall time per op, and pg-cpu-µs/op, the backend's CPU.
func BenchmarkHoldsLoad(b *testing.B) {
	_, dsn := testpg.NewDatabase(b)
	ctx := context.Background()
	db, err := pgstore.Open(ctx, pgstore.Config{DSN: dsn, Password: testpg.Password, MaxConns: 2})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(db.Close)
	h := pgstore.NewHolds(db, "A")
	h.MaxPerOwner = proxy.DefaultMaxNamesPerIdentity
	const lease, hold = 15 * time.Second, 15*time.Second + 2*time.Minute
	const agents = 1000
	var leases []reverse.HoldLease
	for i := range agents {
		l, err := h.Claim(ctx, "user@dev"+strconv.Itoa(i), []string{"svc" + strconv.Itoa(i) + ".rev.tp.internal"}, lease, hold)
		if err != nil {
			b.Fatal(err)
		}
		leases = append(leases, l...)
	}
	rows, err := db.Pool().Query(ctx, "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend'")
	if err != nil {
		b.Fatal(err)
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int])
	if err != nil {
		b.Fatal(err)
	}
	measure := func(b *testing.B, op func() error) {
		cpu := backendCPU(b, pids)
		for b.Loop() {
			if err := op(); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64((backendCPU(b, pids)-cpu).Microseconds())/float64(b.N), "pg-cpu-µs/op")
	}
	b.Run("select1", func(b *testing.B) {
		measure(b, func() error { _, err := db.Pool().Exec(ctx, "SELECT 1"); return err })
	})
	b.Run("renew-1000", func(b *testing.B) {
		measure(b, func() error {
			kept, err := h.Renew(ctx, leases, lease, hold)
			if err == nil && len(kept) != agents {
				err = fmt.Errorf("renewed %d of %d", len(kept), agents)
			}
			return err
		})
	})
	b.Run("claim-1", func(b *testing.B) {
		n := 0
		measure(b, func() error {
			n++
			_, err := h.Claim(ctx, "other@dev"+strconv.Itoa(n), []string{"new" + strconv.Itoa(n) + ".rev.tp.internal"}, lease, hold)
			return err
		})
	})
}
