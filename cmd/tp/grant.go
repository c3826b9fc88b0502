package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/cli"
	"github.com/tp-proxy/tp/internal/lib/config"
)

// grantFlags are tp expose's flags for asking a person for a grant
// (clients.RequestGrant): a credential of this application's own that may only
// keep NAME exposed.
type grantFlags struct {
	on, pick            bool
	server, fingerprint string
	app, approver       string
	wait                time.Duration
}

func (g *grantFlags) register(cmd *cobra.Command) {
	cmd.Flags().BoolVar(&g.on, "request", false, "ask a person for a credential of this application's own that may only keep NAME exposed: print a link, wait for the approval (tp grant LINK on their device), then expose; needs --server and --fingerprint the first time, and a TP_HOME of its own")
	cmd.Flags().StringVar(&g.server, "server", "", "with --request: the TP server's base URL, https://HOST[:PORT]")
	cmd.Flags().StringVar(&g.fingerprint, "fingerprint", "", "with --request: the TP server's CA fingerprint (SHA256:…), as tpd prints it")
	cmd.Flags().StringVar(&g.app, "app", "", "with --request: what this application calls itself, shown to the person who approves")
	cmd.Flags().StringVar(&g.approver, "approver", "", "with --request: take only an approval by this TP user (who may see the link besides them does not matter then)")
	cmd.Flags().BoolVar(&g.pick, "let-pick", false, "with --request: let the person who approves pick another name (NAME is the suggestion); this application then exposes the name they approve")
	cmd.Flags().DurationVar(&g.wait, "request-timeout", 10*time.Minute, "with --request: how long to wait for the approval")
}

// request runs the grant request when --request is set; a TP_HOME that holds
// a grant already goes on at once. It returns the name to expose: name, or
// with --let-pick the one the person approved.
func (g *grantFlags) request(cmd *cobra.Command, stderr io.Writer, name string, public bool) (string, error) {
	if !g.on {
		if g.server != "" || g.fingerprint != "" || g.app != "" || g.pick || g.approver != "" {
			return name, fmt.Errorf("--server, --fingerprint, --app, --approver and --let-pick go with --request")
		}
		return name, nil
	}
	cfg, err := config.LoadClient(cmd.Flags())
	if err != nil {
		return name, err
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), g.wait)
	defer cancel()
	home := clients.Home{Dir: cfg.Home}
	_, err = clients.RequestGrant(ctx, home, clients.GrantRequest{
		Server: g.server, Fingerprint: g.fingerprint, Name: name, Public: public, App: g.app, Pick: g.pick, Approver: g.approver,
		Show: func(link, code string) {
			if g.pick {
				fmt.Fprintf(stderr, "This application asks for a credential that may only keep one name exposed (it suggests %s; the person who approves picks).\n", name)
			} else {
				fmt.Fprintf(stderr, "This application asks for a credential that may only keep %s exposed.\n", name)
			}
			fmt.Fprintf(stderr, "Code %s. Open this link, or have a person with an enrolled device run:\n", code)
			fmt.Fprintf(stderr, "tp grant \"%s\"\n", link)
			fmt.Fprintf(stderr, "Waiting for the approval (up to %s)…\n", g.wait)
		},
	})
	if err != nil || !g.pick {
		return name, err
	}
	picked, device, err := clients.GrantedName(ctx, home)
	if err == nil && picked != name {
		approver, _, _ := strings.Cut(device, "@")
		fmt.Fprintf(stderr, "The person approved the name %s (this application suggested %s): it runs as %s, a credential of %s's.\n", picked, name, device, approver)
	}
	return picked, err
}

func grantCmd(stdout io.Writer) *cobra.Command {
	var yes, list bool
	var revoke, name string
	cmd := &cobra.Command{
		Use:   "grant LINK",
		Short: "Approve an application's request for a credential that may only keep one name exposed",
		Long: "tp grant approves, from this device, the request a `tp expose --request` (or any\n" +
			"program speaking TP's grant API) printed as a link: the TP server creates a device of\n" +
			"your user that holds the application's key and may only keep the link's name exposed,\n" +
			"if the policy lets you keep that name exposed yourself. Compare the code it prints\n" +
			"with the one the application shows. tp grant --list lists your grants and tp grant\n" +
			"--revoke DEVICE ends one for good; a grant also ends with the device that approved it.",
		Example: "  tp grant 'https://tp.example.org/grant?name=ci&key=…'\n" +
			"  tp grant --list\n" +
			"  tp grant --revoke alice@grant-7qxkm2da4brtpz6w",
		Args: func(cmd *cobra.Command, args []string) error {
			if list || revoke != "" {
				if list && revoke != "" {
					return cli.UsageError("tp grant takes --list or --revoke DEVICE, not both")
				}
				return cli.Positional()(cmd, args)
			}
			return cli.Positional("LINK")(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			c, cfg, err := open(cmd, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			// Bounded from here for a list or a revocation, and after the
			// question for an approval: a person may take their time.
			ctx, cancel := context.WithTimeout(cmd.Context(), cfg.Timeout)
			defer cancel()
			switch {
			case list:
				gs, err := c.ListGrants(ctx)
				if err != nil {
					return err
				}
				printGrants(stdout, c.Profile.DeviceID, gs)
				return nil
			case revoke != "":
				g, err := c.RevokeGrant(ctx, revoke)
				if err != nil {
					return err
				}
				fmt.Fprintf(stdout, "Revoked %s (scope %s, granted by %s): its sessions ended, and its key can never be granted again.\n", g.DeviceID, g.Scope, g.GrantedBy)
				return nil
			}
			g, err := login.ParseGrantLink(args[0])
			if err != nil {
				return err
			}
			if name != "" && name != g.Name && !g.Pick {
				return fmt.Errorf("the application asks for %s and takes no other name (its link does not let you pick: it was not made with tp expose --request --let-pick)", g.Name)
			} else if name != "" {
				g.Name = name
			}
			app := g.App
			if app == "" {
				app = "the application"
			}
			if !yes {
				how := "to the devices it allows"
				if g.Public {
					how += " and, where the policy lets it, to the public"
				}
				from := " (a page that names no origin)"
				if g.Origin != "" {
					from = ", a page of " + g.Origin + ","
				}
				switch {
				case g.Dial && g.Name == "*":
					fmt.Fprintf(stdout, "%s%s asks for a credential of %s's that may only connect, to what the policy lets you connect to.\n",
						app, from, c.Profile.DeviceID)
				case g.Dial:
					fmt.Fprintf(stdout, "%s%s asks for a credential of %s's that may only connect to %s.\n", app, from, c.Profile.DeviceID, g.Name)
				default:
					fmt.Fprintf(stdout, "%s asks for a credential of %s's that may only keep %s exposed %s.\n",
						app, c.Profile.DeviceID, g.Name, how)
				}
				fmt.Fprintf(stdout, "Its code: %s\n", grantCode(g.Key))
				if err := confirm(cmd.InOrStdin(), stdout, "Approve only if the application shows the same code. Approve? [y/N] "); err != nil {
					return err
				}
			}
			ctx, cancel = context.WithTimeout(cmd.Context(), cfg.Timeout)
			defer cancel()
			g, res, err := c.ApproveGrant(ctx, args[0], name)
			if err != nil {
				return err
			}
			may := "it may only keep " + g.Name + " exposed"
			if g.Dial {
				may = "it " + authz.Scope(res.Scope).Describe()
			}
			fmt.Fprintf(stdout, "Granted %s (code %s) the device %s, scope %s: %s.\n",
				app, grantCode(g.Key), res.DeviceID, res.Scope, may)
			fmt.Fprintf(stdout, "tp grant --list lists your grants; tp grant --revoke %s ends this one.\n", res.DeviceID)
			return nil
		},
	}
	cmd.Flags().BoolVar(&yes, "yes", false, "approve without asking (for scripts; compare the code first)")
	cmd.Flags().StringVar(&name, "name", "", "approve this name instead of the one the link suggests, when the application lets the person pick (tp expose --request --let-pick)")
	cmd.Flags().BoolVar(&list, "list", false, "list your user's grants, whichever of your devices approved them")
	cmd.Flags().StringVar(&revoke, "revoke", "", "revoke one of your user's grants (its DEVICE, as --list shows it) for good: its sessions end at once")
	return cmd
}

// printGrants prints a user's grants as a table.
func printGrants(w io.Writer, self string, gs []login.GrantInfo) {
	if len(gs) == 0 {
		fmt.Fprintf(w, "No grants: %s's user has approved no application (tp grant LINK approves one).\n", self)
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DEVICE\tSCOPE\tGRANTED BY\tCREATED\tLAST LOGIN\tSTATE")
	for _, g := range gs {
		last, state := "-", "active"
		if !g.LastLogin.IsZero() {
			last = g.LastLogin.Local().Format(time.DateTime)
		}
		if g.Revoked {
			state = "revoked"
		}
		by := g.GrantedBy
		if by == "" {
			by = "unknown (granted before approvers were recorded)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", g.DeviceID, g.Scope, by, g.Created.Local().Format(time.DateTime), last, state)
	}
	tw.Flush()
}

// confirm asks question at a terminal and returns nil on yes; without a
// terminal it says how to approve anyway.
func confirm(in io.Reader, out io.Writer, question string) error {
	if f, ok := in.(*os.File); !ok || !isTerminal(f) {
		return errors.New("tp grant asks before it approves: run it at a terminal, or add --yes once you compared the code")
	}
	fmt.Fprint(out, question)
	line, _ := bufio.NewReader(in).ReadString('\n')
	switch strings.ToLower(strings.TrimSpace(line)) {
	case "y", "yes":
		return nil
	}
	return errors.New("not approved")
}

// isTerminal reports whether f is a character device (a terminal).
func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

func grantCode(key []byte) string { return login.GrantCode(key) }
