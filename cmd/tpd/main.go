// Command tpd is the TP server: the public TLS port (proxy and website), the
// embedded CA, and the admin socket that `tpd enroll` and `tpd users` talk to.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/lib/cli"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/admin"
	"github.com/tp-proxy/tp/internal/server/tpd"
	"github.com/tp-proxy/tp/internal/server/users"

	// HTTP/2 extended CONNECT (RFC 8441) for the reverse-tunnel draft; before net/http's init.
	_ "github.com/tp-proxy/tp/internal/lib/xconnect"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, errReported) {
		os.Exit(1)
	}
	var usage cli.UsageError
	if errors.As(err, &usage) {
		fmt.Fprintln(os.Stderr, usage) // it names tpd itself
		os.Exit(1)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "tpd:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	root := &cobra.Command{
		Use:           "tpd",
		Short:         "TP server: zero-trust TLS proxy with an embedded CA",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetFlagErrorFunc(cli.FlagError)
	cli.HelpCommand(root)
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(serveCmd(stdout, stderr), initCmd(stdout), enrollCmd(stdout), usersCmd(stdout), versionCmd(stdout),
		policyCmd(stdout), revokeCmd(stdout), statusCmd(stdout), reloadCmd(stdout), migrateCmd(stdout), tokensCmd(stdout))
	return root.ExecuteContext(ctx)
}

func serveCmd(stdout, stderr io.Writer) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Serve the public port; the first start creates the data dir",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) (err error) {
			cfg, err := config.LoadServer(cmd.Flags())
			if err != nil {
				return err
			}
			level := new(slog.LevelVar) // a reload may change it
			log := cfg.LoggerWithLevel(stderr, level)
			started := cfg
			out := newAnnouncer(stdout, cfg.LogFormat) // serveout.go
			if cfg.LogFormat == "json" {
				// Whatever a library prints with the log package goes through
				// the JSON handler too; an error is logged, not printed.
				slog.SetDefault(log)
				defer func() {
					if err != nil {
						log.Error("tpd serve stopped", "err", err)
						err = errReported
					}
				}()
			}
			// Listen first: a busy port fails before the first start creates a
			// data dir. Init still gets the configured address, so tpd.yaml
			// records it, not the port the kernel picked for --listen HOST:0.
			ln, err := tpd.Listen(cfg.Listen, cfg.QUIC)
			if err != nil {
				return err
			}
			defer ln.Close()
			ir, err := tpd.Init(cfg)
			if err != nil {
				return err
			}
			if cfg.URL == "" {
				// With --listen HOST:0 the port is known only now.
				cfg.Listen = ln.Addr().String()
			}
			d, err := tpd.New(cmd.Context(), cfg, log)
			if err != nil {
				return err
			}
			defer d.Close()
			if ir.Created {
				out.say(fmt.Sprintf("Created data dir %s (CA, %s, policy in %s)", cfg.DataDir, config.FileName, cfg.PolicyDir()),
					"created data dir", "data_dir", cfg.DataDir, "config", cfg.ConfigFile(), "policy_dir", cfg.PolicyDir())
			}
			d.Ready = func() { // every listener is open, the admin socket too
				out.say(fmt.Sprintf("tpd %s listening on %s (%s)", tpd.Version, ln.Addr(), cfg.PublicURL()),
					"tpd listening", "version", tpd.Version, "addr", ln.Addr().String(), "url", cfg.PublicURL())
				out.say("CA fingerprint: "+d.Fingerprint(), "CA fingerprint", "fingerprint", d.Fingerprint())
				out.say("Enroll a device: tpd enroll USER --device NAME --data-dir "+cfg.DataDir,
					"enroll a device with tpd enroll USER --device NAME", "data_dir", cfg.DataDir)
				if cfg.SSOIssuer != "" {
					line := fmt.Sprintf("dlogin --sso --server %s --fingerprint %s", cfg.PublicURL(), d.Fingerprint())
					out.say("People of "+cfg.SSODomain+" enrol their devices with: "+line,
						"people enrol their devices by single sign-on", "command", line, "issuer", cfg.SSOIssuer, "domain", cfg.SSODomain)
				}
				if host, _, _ := net.SplitHostPort(cfg.Listen); cfg.URL == "" && isLoopback(host) && !strings.Contains(cfg.PublicURL(), hostInURL(host)) {
					// A loopback listen host the certificate does not name: the
					// URL names the first of names, which must reach this server.
					note := fmt.Sprintf("devices will be told to use %s, because %s is not among names; that name must reach this server, or set url in %s.", cfg.PublicURL(), host, cfg.ConfigFile())
					out.say("Note: "+note, note)
				}
				if host, _, _ := net.SplitHostPort(cfg.Listen); cfg.URL == "" && !isLoopback(host) {
					note := fmt.Sprintf("devices will be told to use %s; set url (and names) in %s to the name they reach this server by.", cfg.PublicURL(), cfg.ConfigFile())
					out.say("Note: "+note, note)
				}
				tellSystemd(log, "READY=1")
			}
			stopping := make(chan struct{})
			go func() { // the drain starts when the signal arrives (tpd.Daemon.Serve)
				<-cmd.Context().Done()
				tellSystemd(log, "STOPPING=1")
				close(stopping)
			}()

			d.SetReloader(reloadLoader(cmd.Flags(), started, cfg), level) // reload.go
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			go func() {
				for range hup {
					tellSystemd(log, sdReloading())
					_, _ = d.Reload(cmd.Context()) // it reopens the audit log and logs what changed, or why it refused
					tellSystemd(log, "READY=1")    // also after a refusal: the old configuration serves on
				}
			}()
			defer forceOnSecondSignal(d.Force)() // signals.go
			err = d.Serve(cmd.Context(), ln)
			if cmd.Context().Err() != nil {
				<-stopping // a drain that took a millisecond must not exit before STOPPING=1 is sent
			}
			return err
		},
	}
	config.ServerFlags(cmd.Flags())
	return cmd
}

func hostInURL(host string) string {
	if strings.Contains(host, ":") {
		return "[" + host + "]"
	}
	return "//" + host
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func migrateCmd(stdout io.Writer) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "migrate --database postgres://USER@HOST:PORT/DB",
		Short: "Move a data dir's users, tokens, deny list and CA database into PostgreSQL",
		Long: `Moves the state of a single tpd (its data dir: users, devices, groups, enrollment
tokens, the deny list and the CA database) into a PostgreSQL database, where
several tpd can share it (database: in tpd.yaml). Stop that tpd first; no
instance may run on the database (it is refused while one does). The password
comes from database-password-file or TP_DATABASE_PASSWORD, never the DSN.
Running it again is refused unless --force: the instances have changed the
database since, and the data dir's older rows would replace theirs. A database
holding anything else is refused unless --force too. Then give every instance a copy of the data dir's ca/
directory and set database: in their tpd.yaml.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.LoadServer(cmd.Flags())
			if err != nil {
				return err
			}
			res, err := tpd.Migrate(cmd.Context(), cfg, force)
			if err != nil {
				return err
			}
			if res.Again {
				fmt.Fprintf(stdout, "This data dir was migrated into the database before; with --force its rows replaced the database's.\n")
			}
			fmt.Fprintf(stdout, "Migrated %s into the database: %d users, %d devices, %d pending enrollment tokens, %d guest shares, %d deny-list entries, CA database %d rows in %d tables, %d site certificate files.\n",
				cfg.DataDir, res.Users, res.Devices, res.Tokens, res.Shares, res.Deny, res.CA.Rows, res.CA.Buckets, res.SiteFiles)
			fmt.Fprintf(stdout, "CA fingerprint: %s\nNext: copy %s to every instance and set database: in their %s.\n", res.Fingerprint, cfg.CADir(), config.FileName)
			return nil
		},
	}
	cmd.Flags().String("data-dir", config.DefaultServer().DataDir, "data dir to migrate (env TP_DATA_DIR)")
	cmd.Flags().String("database", "", "target PostgreSQL DSN without a password (env TP_DATABASE)")
	cmd.Flags().String("database-password-file", "", "file whose first line is the database password (or env TP_DATABASE_PASSWORD)")
	cmd.Flags().BoolVar(&force, "force", false, "merge into a database that already holds other users, tokens or deny-list entries, or migrate the same data dir again (its rows replace the database's)")
	return cmd
}

func initCmd(stdout io.Writer) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create the data dir (CA, tpd.yaml, default policy) without serving",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.LoadServer(cmd.Flags())
			if err != nil {
				return err
			}
			res, err := tpd.Init(cfg)
			if err != nil {
				return err
			}
			if res.Created {
				fmt.Fprintf(stdout, "Created data dir %s\n", cfg.DataDir)
			} else {
				fmt.Fprintf(stdout, "Data dir %s already initialised; nothing changed\n", cfg.DataDir)
			}
			fmt.Fprintf(stdout, "CA fingerprint: %s\n", res.Fingerprint)
			fmt.Fprintf(stdout, "Policy: %s\nConfig: %s\n", cfg.PolicyDir(), cfg.ConfigFile())
			return nil
		},
	}
	config.ServerFlags(cmd.Flags())
	return cmd
}

func enrollCmd(stdout io.Writer) *cobra.Command {
	var device, ttl, scope string
	var groups []string
	cmd := &cobra.Command{
		Use:     "enroll USER --device NAME",
		Short:   "Print a one-time token and the dlogin command that enrolls a device",
		Example: "tpd enroll alice --device laptop --groups ops",
		Args:    cli.Positional("USER"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if device == "" {
				return errors.New("--device is required: name the device being enrolled, e.g. --device laptop")
			}
			cfg, err := config.LoadServer(cmd.Flags())
			if err != nil {
				return err
			}
			req := admin.EnrollRequest{User: args[0], Device: device, TTL: ttl, Scope: scope}
			if cmd.Flags().Changed("groups") {
				req.Groups = groups
				if req.Groups == nil {
					req.Groups = []string{}
				}
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			res, err := admin.NewClient(cfg.AdminSocket()).Enroll(ctx, req)
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "Enrollment token for %s, single use, valid until %s.\n", res.DeviceID, res.Expires.Local().Format(time.DateTime+" MST"))
			if res.Scope != "" {
				label := authz.Scope(res.Scope).Label()
				fmt.Fprintf(stdout, "The device's scope is %s: it may keep %s exposed (tp expose %s …) and do nothing else, whatever the policy allows.\n", res.Scope, label, label)
			}
			fmt.Fprintf(stdout, "Run this on the device:\n")
			fmt.Fprintf(stdout, "dlogin --server %s --fingerprint %s --token %s\n", res.ServerURL, res.Fingerprint, res.Token)
			return nil
		},
	}
	cmd.Flags().StringVar(&device, "device", "", "name of the device, e.g. laptop")
	cmd.Flags().StringSliceVar(&groups, "groups", nil, "set the user's groups, comma separated (omit to keep them)")
	cmd.Flags().StringVar(&ttl, "ttl", "", "how long the token stays valid (default from tpd.yaml token-ttl, 24h)")
	cmd.Flags().StringVar(&scope, "scope", "", "narrow what the device may do, before the policy: expose:LABEL (keep LABEL exposed, nothing else), expose-public:LABEL (that, publicly too), dial:LABEL (connect to LABEL only) or dial:* (connect only, to what the policy allows)")
	cmd.Flags().String("data-dir", config.DefaultServer().DataDir, "data dir of the running tpd (env TP_DATA_DIR)")
	return cmd
}

func usersCmd(stdout io.Writer) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "users",
		Short: "List users, their groups and devices",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.LoadServer(cmd.Flags())
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			ac := admin.NewClient(cfg.AdminSocket())
			list, err := ac.Users(ctx)
			if err != nil {
				return err
			}
			shares, err := ac.Shares(ctx)
			if err != nil {
				return err
			}
			ap := newApprovers(list, shares)
			tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "USER\tGROUPS\tDEVICE\tSTATUS\tLAST LOGIN")
			for _, u := range list {
				gs := strings.Join(u.Groups, ",")
				if gs == "" {
					gs = "-"
				}
				if len(u.Devices) == 0 {
					status := "-"
					if u.Revoked {
						status = since("user revoked", u.RevokedAt)
					}
					fmt.Fprintf(tw, "%s\t%s\t-\t%s\t-\n", u.Name, gs, status)
				}
				for _, dv := range u.Devices {
					status := "enrolled"
					switch {
					case u.Revoked:
						status = since("revoked (user)", u.RevokedAt)
					case u.Disabled:
						status = "user disabled"
					case dv.Revoked:
						status = since("revoked", dv.RevokedAt)
					case ap.gone(dv) != "":
						status = ap.gone(dv)
					case len(dv.PublicKey) == 0 && dv.LastLogin.IsZero():
						status = "awaiting dlogin"
					}
					if dv.Scope != "" {
						status += ", scope " + string(dv.Scope)
					}
					if dv.GrantedBy != "" {
						status += ", granted by " + dv.GrantedBy
					}
					last := "-"
					if !dv.LastLogin.IsZero() {
						last = dv.LastLogin.Local().Format(time.DateTime)
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", u.Name, gs, dv.Name, status, last)
				}
			}
			return tw.Flush()
		},
	}
	cmd.Flags().String("data-dir", config.DefaultServer().DataDir, "data dir of the running tpd (env TP_DATA_DIR)")
	cmd.AddCommand(unbindCmd(stdout))
	return cmd
}

func unbindCmd(stdout io.Writer) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "unbind USER",
		Short: "Clear a user's binding to the identity provider's account, so that another account may sign in as it",
		Long: `A user is bound to the identity provider's account (its subject) that first
signed in as it (dlogin --sso); a sign-in of any other account that maps to the
same user, such as a mailbox given to someone new, is refused. unbind clears
that binding once you have decided the new account is the user now: the next
account that signs in as the user binds it. Devices already enrolled are left as
they are; revoke the previous person's with tpd revoke --device. It is written
to the audit log.`,
		Example: "tpd users unbind alice",
		Args:    cli.Positional("USER"),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := config.LoadServer(cmd.Flags())
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			res, err := admin.NewClient(cfg.AdminSocket()).Unbind(ctx, args[0])
			if err != nil {
				return err
			}
			fmt.Fprint(stdout, res.Summary())
			return nil
		},
	}
	cmd.Flags().String("data-dir", config.DefaultServer().DataDir, "data dir of the running tpd (env TP_DATA_DIR)")
	return cmd
}

// since appends when a state began, if it was recorded.
func since(state string, t time.Time) string {
	if t.IsZero() {
		return state
	}
	return state + " since " + t.Local().Format(time.DateTime)
}

func versionCmd(stdout io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		Run:   func(*cobra.Command, []string) { fmt.Fprintln(stdout, "tpd", tpd.Version) },
	}
}

// approvers indexes a listing of users and shares for users.Approvers.Gone:
// each device as revoked when the listing says it or its user is (the deny
// list's revocations included), each user and each share.
type approvers struct{ users.Approvers }

func newApprovers(list []users.UserInfo, shares []admin.Share) approvers {
	marked := make([]users.UserInfo, len(list)) // a device of a revoked user is revoked; the caller's list stays as it is
	for i, u := range list {
		u.Devices = slices.Clone(u.Devices)
		for j := range u.Devices {
			u.Devices[j].Revoked = u.Devices[j].Revoked || u.Revoked
		}
		marked[i] = u
	}
	sh := make([]users.Share, len(shares))
	for i := range shares {
		sh[i] = shares[i].Share
	}
	a, _ := users.ListApprovers(marked, sh)
	return approvers{a}
}

// gone says why d, a grant or a guest's device, ended with its approver or
// share, "" when it did not.
func (a approvers) gone(d users.Device) string {
	err := a.Gone(&d, time.Now())
	switch {
	case err == nil:
		return ""
	case strings.HasPrefix(d.GrantedBy, users.ShareApprover):
		return "its share ended"
	}
	return "revoked with its approver"
}

// revoked says whether d or its user is revoked.
func (a approvers) revoked(d users.Device) bool {
	x := a.Devices[d.ID]
	return x != nil && x.Revoked
}

// approverOf is a grant's approver as tables show it.
func approverOf(by string) string {
	if by == "" {
		return "unknown (granted before approvers were recorded)"
	}
	return shown(by)
}
