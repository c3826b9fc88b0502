// Command tpbench measures TP against direct TCP, a minimal Go mTLS relay, a plain
// Go TLS server and OpenSSH in one run on loopback, and prints one table:
//
//	go run ./cmd/tpbench [--quick] [--json FILE] [--runs N] [--only SCENARIO,...] [--soak DURATION] [--compare DIR]
//	                     [--peers DIR] [--ghostunnel PATH] [--chisel PATH] [--frps PATH] [--frpc PATH] [--wireguard-go PATH]
//
// With --peers (or a flag per binary) it also measures ghostunnel, chisel, frp
// and wireguard-go side by side with TP; without them their rows say "not given".
//
// It builds tpd, tp and dlogin itself, starts everything it needs with throwaway
// state and stops all of it when done. See internal/bench.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/tp-proxy/tp/internal/bench"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "tpbench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if bench.IsHelper(args) {
		return bench.RunHelper(ctx, args, stdout)
	}
	fs := flag.NewFlagSet("tpbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o bench.Options
	var only string
	fs.BoolVar(&o.Quick, "quick", false, "smaller sizes and 3 runs: a smoke run in under 2 minutes")
	fs.IntVar(&o.Runs, "runs", 0, "runs per variant (default 5, 3 with --quick)")
	fs.StringVar(&only, "only", "", "comma-separated scenarios: "+strings.Join(bench.Scenarios, ","))
	fs.StringVar(&o.JSON, "json", "", "also write the rows as JSON to this file")
	fs.BoolVar(&o.Markdown, "markdown", false, "print the table as Markdown")
	fs.DurationVar(&o.Soak, "soak", 0, "length of the soak scenario (default 10m, 20s with --quick)")
	fs.StringVar(&o.Compare, "compare", "", "a directory holding older tp, dlogin and tpd binaries (e.g. built from an earlier commit): the setup scenario measures their sizes, a fresh tp and a running tp forward over TLS beside this tree's, and the memory scenario their tpd and tp forward beside this tree's, in the same runs")
	fs.StringVar(&o.Peers.Dir, "peers", "", "a directory holding the peer binaries ghostunnel, chisel, frps, frpc and wireguard-go (built by you; tpbench never downloads): the bulk, setup, memory, reverse and ip scenarios measure them beside TP in the same runs")
	fs.StringVar(&o.Peers.Ghostunnel, "ghostunnel", "", "the ghostunnel binary (overrides --peers)")
	fs.StringVar(&o.Peers.Chisel, "chisel", "", "the chisel binary (overrides --peers)")
	fs.StringVar(&o.Peers.Frps, "frps", "", "the frps binary (overrides --peers)")
	fs.StringVar(&o.Peers.Frpc, "frpc", "", "the frpc binary (overrides --peers)")
	fs.StringVar(&o.Peers.WireGuard, "wireguard-go", "", "the wireguard-go binary (overrides --peers)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: go run ./cmd/tpbench [--quick] [--json FILE] [--runs N] [--only SCENARIO,...] [--soak DURATION] [--compare DIR] [--peers DIR] [--markdown]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.Runs < 0 {
		return fmt.Errorf("--runs %d must be positive", o.Runs)
	}
	if o.Soak < 0 || o.Soak > 24*time.Hour {
		return fmt.Errorf("--soak %s must be between 0 (the default) and 24h", o.Soak)
	}
	if only != "" {
		o.Only = strings.Split(only, ",")
	}
	o.Command = "go run ./cmd/tpbench " + strings.Join(args, " ")
	o.Stdout, o.Stderr = stdout, stderr
	return bench.Run(ctx, o)
}
