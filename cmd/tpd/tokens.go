package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/internal/lib/cli"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/admin"
	"github.com/tp-proxy/tp/internal/server/users"
)

// tokensCmd lists the credentials tpd handed out that are not a person's own
// device: the grants approvals gave applications, and the enrollment tokens
// not yet redeemed.
func tokensCmd(stdout io.Writer) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "tokens",
		Short: "List the grants given to applications, the guest shares and the enrollment tokens not yet redeemed",
		Long: "tpd tokens lists the credentials handed out that are not a person's own device: each\n" +
			"grant (a device an approval gave an application: its scope, who approved it, whether it\n" +
			"is revoked), each guest share (a name a person gave an outside person until a time, with\n" +
			"the guests' devices) and each enrollment token not yet redeemed (the device it enrols and when it\n" +
			"expires; the token itself is not kept). tpd revoke --device DEVICE ends a grant, or a\n" +
			"device's pending tokens.",
		Args: cli.Positional(),
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
			return printTokens(stdout, list, shares)
		},
	}
	cmd.Flags().String("data-dir", config.DefaultServer().DataDir, "data dir of the running tpd (env TP_DATA_DIR)")
	return cmd
}

func printTokens(w io.Writer, list []users.UserInfo, shares []admin.Share) error {
	ap := newApprovers(list, shares)
	var grants []users.Device
	type pending struct {
		id      string
		expires time.Time
	}
	var tokens []pending
	for _, u := range list {
		for _, dv := range u.Devices {
			if dv.IsGrant() {
				grants = append(grants, dv)
			}
		}
		for _, t := range u.Tokens {
			tokens = append(tokens, pending{u.Name + "@" + t.Device, t.Expires})
		}
	}
	users.SortDevices(grants)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "GRANTS (%d)\n", len(grants))
	if len(grants) > 0 {
		fmt.Fprintln(tw, "DEVICE\tSCOPE\tGRANTED BY\tCREATED\tLAST LOGIN\tSTATE")
	}
	for _, g := range grants {
		state := "active"
		switch {
		case ap.revoked(g):
			state = "revoked"
		case ap.gone(g) != "":
			state = ap.gone(g)
		}
		last := "-"
		if !g.LastLogin.IsZero() {
			last = g.LastLogin.Local().Format(time.DateTime)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", shown(g.ID), shown(string(g.Scope)), approverOf(g.GrantedBy), g.Created.Local().Format(time.DateTime), last, state)
	}
	printShares(tw, shares)
	fmt.Fprintf(tw, "\nENROLLMENT TOKENS NOT YET REDEEMED (%d)\n", len(tokens))
	if len(tokens) > 0 {
		fmt.Fprintln(tw, "DEVICE\tEXPIRES")
	}
	for _, t := range tokens {
		fmt.Fprintf(tw, "%s\t%s (in %s)\n", shown(t.id), t.expires.Local().Format(time.DateTime), time.Until(t.expires).Round(time.Minute))
	}
	return tw.Flush()
}

// printShares prints the guest shares as a table section.
func printShares(tw *tabwriter.Writer, shares []admin.Share) {
	fmt.Fprintf(tw, "\nGUEST SHARES (%d)\n", len(shares))
	if len(shares) > 0 {
		fmt.Fprintln(tw, "ID\tNAME\tGUEST\tSHARED BY\tUNTIL\tSTATE\tGUESTS' DEVICES")
	}
	for _, sh := range shares {
		devs := "-"
		if len(sh.Guests) > 0 {
			devs = shown(strings.Join(sh.Guests, ", "))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", shown(sh.ID), shown(sh.Name), shown(sh.Guest), approverOf(sh.By),
			sh.Until.Local().Format(time.DateTime), sh.State, devs)
	}
}
