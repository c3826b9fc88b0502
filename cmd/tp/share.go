package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/internal/lib/cli"
)

func shareCmd(stdout io.Writer) *cobra.Command {
	var list bool
	var with, revoke string
	var lasts time.Duration
	cmd := &cobra.Command{
		Use:   "share NAME --with GUEST",
		Short: "Let an outside person connect to one name you expose, for a limited time",
		Long: "tp share lets a guest - a person outside your organisation whom its identity\n" +
			"provider vouches for, by email address, or anyone at one email domain - connect to\n" +
			"NAME.<reverse zone> until the share ends. The guest runs dlogin --sso and gets a device\n" +
			"that may connect to NAME and nothing else; your agent (tp expose) admits guests of its\n" +
			"name unless it runs with --refuse-guests. You need to be allowed to keep NAME exposed.\n" +
			"tp share --list lists your shares and tp share --revoke ID ends one at once.",
		Example: "  tp share laptop-ssh --with bob@partner.example --for 8h\n" +
			"  tp share laptop-ssh --with @partner.example --for 48h\n" +
			"  tp share --list\n" +
			"  tp share --revoke share-3f9a1c2b7d01",
		Args: func(cmd *cobra.Command, args []string) error {
			switch {
			case list && revoke != "":
				return cli.UsageError("tp share takes --list or --revoke ID, not both")
			case list || revoke != "":
				return cli.Positional()(cmd, args)
			case with == "":
				return cli.UsageError("say whom to share with: --with bob@partner.example, or --with @partner.example for anyone there")
			}
			return cli.Positional("NAME")(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if lasts <= 0 || lasts > login.MaxShareFor {
				return cli.UsageError(fmt.Sprintf("--for %s: a share lasts more than nothing and at most %s", lasts, login.MaxShareFor))
			}
			c, cfg, err := open(cmd, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), cfg.Timeout)
			defer cancel()
			switch {
			case list:
				ss, err := c.ListShares(ctx)
				if err != nil {
					return err
				}
				printShares(stdout, c.Profile.DeviceID, ss)
				return nil
			case revoke != "":
				sh, err := c.RevokeShare(ctx, revoke)
				if err != nil {
					return err
				}
				fmt.Fprintf(stdout, "Revoked %s: %s may no longer connect to %s; their sessions ended.\n", sh.ID, sh.Guest, sh.Name)
				return nil
			}
			sh, err := c.Share(ctx, args[0], with, time.Now().Add(lasts))
			if err != nil {
				return err
			}
			who := sh.Guest
			if strings.HasPrefix(who, "@") {
				who = "anyone at " + who[1:]
			}
			fmt.Fprintf(stdout, "Shared %s with %s until %s (%s).\n", sh.Name, who, sh.Until.Local().Format(time.DateTime), sh.ID)
			fmt.Fprintf(stdout, "Tell them to run:\n  dlogin --sso --server %s --fingerprint %s\n  ssh -o ProxyCommand='tp %%h %%p' %s\n", c.Profile.Server, c.Profile.Fingerprint, sh.Host)
			fmt.Fprintf(stdout, "tp share --revoke %s ends it at once.\n", sh.ID)
			return nil
		},
	}
	cmd.Flags().StringVar(&with, "with", "", "the guest: an email address the identity provider verified, or @DOMAIN for anyone there")
	cmd.Flags().DurationVar(&lasts, "for", 8*time.Hour, "how long the share lasts (at most 720h)")
	cmd.Flags().BoolVar(&list, "list", false, "list your user's shares")
	cmd.Flags().StringVar(&revoke, "revoke", "", "end one of your user's shares (its ID, as --list shows it) at once")
	return cmd
}

// printShares prints a user's shares as a table.
func printShares(w io.Writer, self string, ss []login.ShareInfo) {
	if len(ss) == 0 {
		fmt.Fprintf(w, "No shares: %s's user has shared no name (tp share NAME --with GUEST shares one).\n", self)
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tGUEST\tUNTIL\tSTATE\tGUESTS' DEVICES")
	for _, s := range ss {
		devs := strings.Join(s.Guests, ", ")
		if devs == "" {
			devs = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", s.ID, s.Name, s.Guest, s.Until.Local().Format(time.DateTime), s.State, devs)
	}
	tw.Flush()
}
