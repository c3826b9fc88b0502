// Command tp is TP's client: `tp HOST PORT` is an ssh ProxyCommand, `tp forward`
// a local listener that forwards through TP, `tp whoami` shows this device's
// identity. It renews its certificate by itself while the device key is present.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/cli"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/lib/version"
)

// errHangUp is the cause of a run ended by SIGHUP: ssh ending its ProxyCommand.
var errHangUp = errors.New("hung up (SIGHUP), as ssh does to its ProxyCommand when it exits")

func main() {
	ctx, stop := notifyContext(context.Background())
	err := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, errHangUp) {
		// ssh hangs up its ProxyCommand whenever it exits: the normal end,
		// not worth a line on every ssh and scp. The session was reset.
		return
	}
	var usage cli.UsageError
	switch {
	case errors.As(err, &usage):
		fmt.Fprintln(os.Stderr, usage) // it names tp itself
		os.Exit(1)
	case err != nil:
		fmt.Fprintln(os.Stderr, "tp:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	root := &cobra.Command{
		Use:   "tp HOST PORT",
		Short: "Connect through TP; as ssh's ProxyCommand: ssh -o ProxyCommand=\"tp %h %p\" HOST",
		Long: "tp HOST PORT connects stdin and stdout to HOST:PORT through the TP server,\n" +
			"for ssh's ProxyCommand. Run dlogin once first.",
		Example: "  ssh -o ProxyCommand=\"tp %h %p\" alice@db.internal\n" +
			"  tp ssh-config --write '*.internal'   # the same for every ssh to *.internal",
		Args:          hostPortArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, cfg, err := open(cmd, stderr)
			if err != nil {
				return err
			}
			port, err := strconv.Atoi(args[1])
			if err != nil || port < 1 || port > 65535 {
				return fmt.Errorf("port %q must be a number from 1 to 65535", args[1])
			}
			target := net.JoinHostPort(args[0], strconv.Itoa(port))
			d, err := dialer(cmd.Context(), c, cfg, stderr)
			if err != nil {
				return err
			}
			if !cfg.Quiet {
				fmt.Fprintf(stderr, "Connecting to %s via %s (%s)\n", target, d.Server, version.Version)
			}
			defer d.Close()
			d.NoE2EMux = true // one session per process: a carrier would carry only this one
			d.NoTLSMux = true // likewise a tp-mux connection: its framing would buy nothing
			conn, err := d.DialContext(cmd.Context(), "tcp", target)
			if err != nil {
				return c.WhyRejected(cmd.Context(), err)
			}
			return clients.Stdio(cmd.Context(), conn, stdin, stdout)
		},
	}
	config.ClientFlags(root.PersistentFlags())
	root.PersistentFlags().String("transport", "auto", "auto (QUIC over UDP raced against QUIC over the tls, ws and http carriers, then TP's plain TLS as a last resort; remembered per server and network), quic or tls (env TP_TRANSPORT)")
	root.PersistentFlags().String("carrier", "", "force what carries the QUIC connection: udp, tls (a TLS stream on the TCP port), ws (a WebSocket), http (HTTPS polling, through CDNs too), the last three through HTTPS_PROXY when set; or auto (as transport auto, and a live connection also moves between carriers when one stops delivering) (env TP_CARRIER)")
	root.PersistentFlags().Duration("carrier-head-start", 0, "how long auto gives QUIC over UDP alone before it also tries the tls, ws and http carriers (0: 500ms; 2s when UDP worked on this network before) (env TP_CARRIER_HEAD_START)")
	root.PersistentFlags().String("carrier-http-url", "", "the http carrier's URL when not https://SERVER/.well-known/tp-carrier/http: a CDN's, or tpd's plain-HTTP listener (http://HOST:PORT/.well-known/tp-carrier/http, through HTTP_PROXY as plain HTTP) (env TP_CARRIER_HTTP_URL)")
	root.PersistentFlags().Bool("direct", false, "reach names exposed with tp expose over one end-to-end QUIC connection per name that moves to a direct path between the two devices when their networks let one through; relayed by the TP server otherwise (env TP_DIRECT)")
	root.PersistentFlags().StringSlice("direct-interfaces", nil, "the network interfaces whose addresses a direct path may use, such as eth0,wlan0 (lo too, for trying it on one host); default every interface but loopback and TP's tun devices; tp expose honours it too (env TP_DIRECT_INTERFACES)")
	root.PersistentFlags().BoolP("quiet", "q", false, "print errors only, not the \"Connecting to …\" line (env TP_QUIET)")
	root.PersistentFlags().Bool("debug", false, "also print debug lines, such as every attempt's own error when the TP server cannot be reached (env TP_DEBUG)")
	root.AddCommand(forwardCmd(stderr), exposeCmd(stderr), ipCmd(stderr), whoamiCmd(stdout, stderr), netcheckCmd(stdout, stderr), sshConfigCmd(stdout, stderr), grantCmd(stdout), shareCmd(stdout), &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cli.Positional(),
		Run:   func(*cobra.Command, []string) { fmt.Fprintln(stdout, "tp", version.Version) },
	})
	root.SuggestionsMinimumDistance = 2
	root.SetFlagErrorFunc(cli.FlagError)
	cli.HelpCommand(root)
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	return root.ExecuteContext(ctx)
}

// hostPortArgs checks tp HOST PORT's arguments, and names the subcommand a
// person probably meant ("tp forwrd A B") instead of counting arguments.
func hostPortArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		_, portErr := strconv.Atoi(args[len(args)-1])
		if s := suggestions(cmd, args[0]); len(s) > 0 && (len(args) != 2 || portErr != nil) {
			return fmt.Errorf("unknown command %q: did you mean \"tp %s\"? (tp --help lists the commands)", args[0], s[0])
		}
	}
	if len(args) != 2 {
		var names []string
		for _, c := range cmd.Commands() {
			if c.IsAvailableCommand() {
				names = append(names, c.Name())
			}
		}
		return cli.UsageError(fmt.Sprintf("%s; or a command: %s (tp --help says more)", cli.ArgsMessage(cmd, []string{"HOST", "PORT"}, args), strings.Join(names, ", ")))
	}
	return nil
}

// suggestions are the commands a typo may have meant. A command of two
// letters ("ip") is within two edits of every one- or two-letter word, so it
// is suggested only for a word that starts like it.
func suggestions(cmd *cobra.Command, typo string) []string {
	var out []string
	for _, s := range cmd.SuggestionsFor(typo) {
		if len(s) > 2 || strings.HasPrefix(typo, s[:1]) {
			out = append(out, s)
		}
	}
	return out
}

func open(cmd *cobra.Command, stderr io.Writer) (*clients.Client, config.Client, error) {
	cfg, err := config.LoadClient(cmd.Flags())
	if err != nil {
		return nil, cfg, err
	}
	c, err := clients.Open(clients.Home{Dir: cfg.Home})
	if err != nil {
		return nil, cfg, err
	}
	c.Logf = func(f string, a ...any) { fmt.Fprintf(stderr, f+"\n", a...) }
	return c, cfg, nil
}

// dialer checks (and if needed renews) the certificate up front, so that a missing
// or expired one is reported as such rather than as a failed handshake.
func dialer(ctx context.Context, c *clients.Client, cfg config.Client, stderr io.Writer) (*clients.Dialer, error) {
	lctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	if _, err := c.Certificate(lctx); err != nil {
		return nil, err
	}
	d, err := c.Dialer()
	if err != nil {
		return nil, err
	}
	d.Timeout = cfg.Timeout
	d.Transport = cfg.Transport
	d.Carrier = cfg.Carrier
	d.CarrierHTTPURL = cfg.CarrierHTTPURL
	d.CarrierHeadStart = cfg.CarrierHeadStart
	d.Direct = cfg.Direct
	if len(cfg.DirectInterfaces) > 0 {
		keep := map[string]bool{}
		for _, name := range cfg.DirectInterfaces {
			keep[name] = true
		}
		d.DirectLoopback = true // named, loopback too: the list decides
		d.DirectInterfaces = func(name string) bool { return keep[name] }
	}
	d.Logf = c.Logf
	d.Logger = logger(cfg, stderr)
	return d, nil
}

// logger is the log of a long-running command (tp forward, expose, ip): text
// lines on standard error, debug lines too with --debug.
func logger(cfg config.Client, stderr io.Writer) *slog.Logger {
	level := slog.LevelInfo
	if cfg.Debug {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
}

func forwardCmd(stderr io.Writer) *cobra.Command {
	var udp, noMux, noTLSMux bool
	var udpIdle time.Duration
	cmd := &cobra.Command{
		Use:   "forward [--udp] LOCAL DEST",
		Short: "Listen on a local TCP (or, with --udp, UDP) address and forward through TP",
		Long: "tp forward listens on LOCAL (HOST:PORT on this machine) and carries each\n" +
			"connection (with --udp, each flow of datagrams) through the TP server to DEST\n" +
			"(HOST:PORT as the TP server reaches it).",
		Example: "  tp forward 127.0.0.1:15432 db.internal:5432\n" +
			"  psql -h 127.0.0.1 -p 15432\n" +
			"  tp forward --udp 127.0.0.1:5353 dns.internal:53\n" +
			"  dig -p 5353 @127.0.0.1 db.internal",
		Args: cli.Positional("LOCAL", "DEST"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, cfg, err := open(cmd, stderr)
			if err != nil {
				return err
			}
			if _, _, err := net.SplitHostPort(args[1]); err != nil {
				return fmt.Errorf("DEST %q must be HOST:PORT, e.g. db.internal:5432", args[1])
			}
			d, err := dialer(cmd.Context(), c, cfg, stderr)
			if err != nil {
				return err
			}
			if udp {
				return forwardUDP(cmd.Context(), c, d, args[0], args[1], udpIdle, stderr)
			}
			d.NoE2EMux = noMux
			d.NoTLSMux = noTLSMux
			ln, err := clients.ListenForward(cmd.Context(), args[0])
			if err != nil {
				return fmt.Errorf("cannot listen on %s: %w", args[0], err)
			}
			defer ln.Close()
			defer d.Close()
			// One QUIC connection for all forwarded connections, re-established
			// with backoff when it breaks (a server restart, a network change).
			go d.Maintain(cmd.Context(), func(f string, a ...any) { fmt.Fprintf(stderr, f+"\n", a...) })
			fmt.Fprintf(stderr, "Forwarding %s to %s via %s (%s); Ctrl-C stops\n", ln.Addr(), args[1], d.Server, version.Version)
			f := &clients.Forwarder{
				DialFirst: func(ctx context.Context, network, addr string, first []byte) (net.Conn, error) {
					conn, err := d.DialFirst(ctx, network, addr, first)
					return conn, c.WhyRejected(ctx, err)
				},
				Target: args[1],
				Logger: logger(cfg, stderr),
			}
			err = f.Serve(cmd.Context(), ln)
			if errors.Is(err, context.Canceled) || cmd.Context().Err() != nil {
				return nil
			}
			return err
		},
	}
	cmd.Flags().BoolVar(&udp, "udp", false, "forward UDP datagrams: one flow per local source address (policy action dial_udp)")
	cmd.Flags().DurationVar(&udpIdle, "udp-idle", 60*time.Second, "end a UDP flow after this long without datagrams")
	cmd.Flags().BoolVar(&noTLSMux, "no-tls-mux", false, "over TLS: open a TLS connection per forwarded connection instead of carrying them all as streams of one held connection (tp-mux/1; an older tpd gets a connection each anyway)")
	cmd.Flags().BoolVar(&noMux, "no-e2e-mux", false, "to a protected reverse name: open a TP session per connection instead of carrying them all as streams of one end-to-end session with the agent")
	return cmd
}

// forwardUDP serves `tp forward --udp`.
func forwardUDP(ctx context.Context, c *clients.Client, d *clients.Dialer, listen, target string, idle time.Duration, stderr io.Writer) error {
	pc, err := net.ListenPacket("udp", listen)
	if err != nil {
		return fmt.Errorf("cannot listen on UDP %s: %w", listen, err)
	}
	defer pc.Close()
	defer d.Close()
	d.CountDatagramDrops = true // no datagram discarded without a count
	go d.Maintain(ctx, func(f string, a ...any) { fmt.Fprintf(stderr, f+"\n", a...) })
	fmt.Fprintf(stderr, "Forwarding UDP %s to %s via %s (%s); Ctrl-C stops\n", pc.LocalAddr(), target, d.Server, version.Version)
	f := &clients.UDPForwarder{
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := d.DialContext(ctx, network, addr)
			return conn, c.WhyRejected(ctx, err)
		},
		Target:      target,
		IdleTimeout: idle,
		Logger:      d.Logger,
		QUICDropped: d.QUICDatagramsDropped,
		Dialer:      d,
	}
	err = f.Serve(ctx, pc)
	if errors.Is(err, context.Canceled) || ctx.Err() != nil {
		return nil
	}
	return err
}

func whoamiCmd(stdout, stderr io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:     "whoami",
		Aliases: []string{"status"},
		Short:   "Show this device's identity and certificate, and whether the server accepts it",
		Long: "tp whoami (or tp status) shows this device's identity, groups and certificate, and\n" +
			"asks the server whether it would accept the certificate now. It exits 0 only when the\n" +
			"server confirms that: not when the device is revoked, the certificate is refused or\n" +
			"expired, or the server cannot be asked. Without the device key it asks with the\n" +
			"certificate's key, so the answer is still the server's.",
		Args: cli.Positional(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, _, err := open(cmd, stderr)
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "Identity:    %s\n", c.Profile.DeviceID)
			fmt.Fprintf(stdout, "Server:      %s\n", c.Profile.Server)
			ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Second)
			who, askErr := c.Whoami(ctx)
			cancel()
			var se *login.ServerError
			switch {
			case errors.As(askErr, &se):
				fmt.Fprintf(stdout, "Groups:      unknown (the server refused to answer: %s)\n", se.Message)
			case askErr != nil:
				fmt.Fprintf(stdout, "Groups:      unknown (%v)\n", askErr)
			case who.Revoked:
				fmt.Fprintf(stdout, "Groups:      none: this device is REVOKED on the server\n")
			case len(who.Groups) == 0:
				fmt.Fprintf(stdout, "Groups:      none\n")
			default:
				fmt.Fprintf(stdout, "Groups:      %s\n", strings.Join(who.Groups, ", "))
			}
			if askErr == nil && who.Scope != "" {
				fmt.Fprintf(stdout, "Scope:       %s: %s\n", who.Scope, authz.Scope(who.Scope).Describe())
			}
			if askErr == nil && who.GrantedBy != "" {
				fmt.Fprintf(stdout, "Granted by:  %s (revoking that device ends this grant)\n", who.GrantedBy)
			}
			_, keyErr := c.Home.DeviceKey()
			noKey := errors.Is(keyErr, clients.ErrNoDeviceKey)
			switch {
			case noKey:
				// The server was asked with the certificate's key instead, but
				// without the device key no new certificate can be had.
				fmt.Fprintf(stdout, "Device key:  MISSING in %s: this device can neither renew its certificate nor log in with dlogin; %s\n", c.Home.Dir, c.Home.ReenrollHint())
			case keyErr != nil:
				fmt.Fprintf(stdout, "Device key:  UNREADABLE (%v): this device cannot renew its certificate\n", keyErr)
			}
			cert, err := c.Home.Certificate()
			if err != nil {
				fmt.Fprintf(stdout, "Certificate: none (%v)\n", err)
				fmt.Fprintf(stdout, "Status:      no certificate; run dlogin\n")
				return errors.New("this device has no certificate; run dlogin")
			}
			leaf := cert.Leaf
			now := time.Now()
			fmt.Fprintf(stdout, "Certificate: serial %x\n", leaf.SerialNumber)
			fmt.Fprintf(stdout, "Expires:     %s (in %s)\n", leaf.NotAfter.Local().Format(time.DateTime+" MST"), leaf.NotAfter.Sub(now).Round(time.Second))
			// "valid" only when the server says it accepts this certificate now.
			var state string
			var fail error
			switch {
			case askErr == nil && who.Revoked:
				state = "REVOKED: the server refuses this device; ask your TP administrator"
				fail = errors.New("this device is revoked on the server")
			case askErr == nil && who.Certificate != nil && !who.Certificate.Accepted && !now.After(leaf.NotAfter):
				state = "REFUSED by the server: " + who.Certificate.Reason
				fail = errors.New("the server does not accept this device's certificate")
			case now.After(leaf.NotAfter) && noKey:
				state = fmt.Sprintf("EXPIRED %s ago, and without the device key it cannot be renewed: this device must be enrolled again; %s", now.Sub(leaf.NotAfter).Round(time.Second), c.Home.ReenrollHint())
				fail = errors.New("this device's certificate has expired, and it has no device key to renew it")
			case now.After(leaf.NotAfter):
				state = fmt.Sprintf("EXPIRED %s ago; tp renews it on the next connection, or run dlogin", now.Sub(leaf.NotAfter).Round(time.Second))
				fail = errors.New("this device's certificate has expired")
			case se != nil:
				state = "NOT CONFIRMED: the server refused to answer (" + se.Message + ")"
				fail = errors.New("the server did not confirm this device's certificate")
			case askErr != nil:
				state = fmt.Sprintf("NOT CONFIRMED: the server could not be asked (%v)", askErr)
				fail = errors.New("the server could not be asked to confirm this device's certificate")
			case who.Certificate == nil:
				state = "NOT CONFIRMED: the server did not say whether it accepts this certificate"
				fail = errors.New("the server did not confirm this device's certificate")
			case clients.NeedsRenewal(leaf, now) && noKey:
				state = "valid, due for renewal, but without the device key it cannot be renewed: enroll this device again before it expires; " + c.Home.ReenrollHint()
			case clients.NeedsRenewal(leaf, now):
				state = "valid, due for renewal (tp renews it on the next connection)"
			default:
				state = "valid"
			}
			fmt.Fprintf(stdout, "Status:      %s\n", state)
			return fail
		},
	}
}
