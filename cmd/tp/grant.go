package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/cli"
	"github.com/tp-proxy/tp/internal/lib/config"
)

// grantFlags are tp expose's flags for asking a person for a grant
// (clients.RequestGrant): a credential of this application's own that may only
// keep NAME exposed.
type grantFlags struct {
	on                  bool
	server, fingerprint string
	app                 string
	wait                time.Duration
}

func (g *grantFlags) register(cmd *cobra.Command) {
	cmd.Flags().BoolVar(&g.on, "request", false, "ask a person for a credential of this application's own that may only keep NAME exposed: print a link, wait for the approval (tp grant LINK on their device), then expose; needs --server and --fingerprint the first time, and a TP_HOME of its own")
	cmd.Flags().StringVar(&g.server, "server", "", "with --request: the TP server's base URL, https://HOST[:PORT]")
	cmd.Flags().StringVar(&g.fingerprint, "fingerprint", "", "with --request: the TP server's CA fingerprint (SHA256:…), as tpd prints it")
	cmd.Flags().StringVar(&g.app, "app", "", "with --request: what this application calls itself, shown to the person who approves")
	cmd.Flags().DurationVar(&g.wait, "request-timeout", 10*time.Minute, "with --request: how long to wait for the approval")
}

// request runs the grant request when --request is set; a TP_HOME that holds
// a grant already goes on at once.
func (g *grantFlags) request(cmd *cobra.Command, stderr io.Writer, name string, public bool) error {
	if !g.on {
		if g.server != "" || g.fingerprint != "" || g.app != "" {
			return fmt.Errorf("--server, --fingerprint and --app go with --request")
		}
		return nil
	}
	cfg, err := config.LoadClient(cmd.Flags())
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), g.wait)
	defer cancel()
	_, err = clients.RequestGrant(ctx, clients.Home{Dir: cfg.Home}, clients.GrantRequest{
		Server: g.server, Fingerprint: g.fingerprint, Name: name, Public: public, App: g.app,
		Show: func(link, code string) {
			fmt.Fprintf(stderr, "This application asks for a credential that may only keep %s exposed.\n", name)
			fmt.Fprintf(stderr, "Code %s. Open this link, or have a person with an enrolled device run:\n", code)
			fmt.Fprintf(stderr, "tp grant \"%s\"\n", link)
			fmt.Fprintf(stderr, "Waiting for the approval (up to %s)…\n", g.wait)
		},
	})
	return err
}

func grantCmd(stdout io.Writer) *cobra.Command {
	var yes bool
	cmd := &cobra.Command{
		Use:   "grant LINK",
		Short: "Approve an application's request for a credential that may only keep one name exposed",
		Long: "tp grant approves, from this device, the request a `tp expose --request` (or any\n" +
			"program speaking TP's grant API) printed as a link: the TP server creates a device of\n" +
			"your user that holds the application's key and may only keep the link's name exposed,\n" +
			"if the policy lets you keep that name exposed yourself. Compare the code it prints\n" +
			"with the one the application shows. tpd users lists the granted device, and tpd\n" +
			"revoke --device ends it.",
		Example: "  tp grant 'https://tp.example.org/grant?name=ci&key=…'",
		Args:    cli.Positional("LINK"),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := config.LoadClient(cmd.Flags())
			if err != nil {
				return err
			}
			c, err := clients.Open(clients.Home{Dir: cfg.Home})
			if err != nil {
				return err
			}
			g, err := login.ParseGrantLink(args[0])
			if err != nil {
				return err
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
				fmt.Fprintf(stdout, "%s asks for a credential of %s's that may only keep %s exposed %s.\n",
					app, c.Profile.DeviceID, g.Name, how)
				fmt.Fprintf(stdout, "Its code: %s\n", grantCode(g.Key))
				if err := confirm(cmd.InOrStdin(), stdout, "Approve only if the application shows the same code. Approve? [y/N] "); err != nil {
					return err
				}
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), cfg.Timeout)
			defer cancel()
			g, res, err := c.ApproveGrant(ctx, args[0])
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "Granted %s (code %s) the device %s, scope %s: it may only keep %s exposed.\n",
				app, grantCode(g.Key), res.DeviceID, res.Scope, g.Name)
			fmt.Fprintf(stdout, "tpd users lists it; tpd revoke --device %s ends it.\n", res.DeviceID)
			return nil
		},
	}
	cmd.Flags().BoolVar(&yes, "yes", false, "approve without asking (for scripts; compare the code first)")
	return cmd
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
