package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/admin"
)

func statusCmd(stdout io.Writer) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show live sessions, agents, public ports, grants and recent denials of the running tpd",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.LoadServer(cmd.Flags())
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			st, err := admin.NewClient(cfg.AdminSocket()).Status(ctx)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			return printStatus(stdout, st)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the status as one JSON document")
	cmd.Flags().String("data-dir", config.DefaultServer().DataDir, "data dir of the running tpd (env TP_DATA_DIR)")
	return cmd
}

func printStatus(w io.Writer, st admin.Status) error {
	fmt.Fprintf(w, "tpd %s, up %s, policy revision %s\n", st.Version, st.Time.Sub(st.Started).Round(time.Second), st.PolicyRevision)
	if st.Database != "" {
		fmt.Fprintf(w, "database %s\n", st.Database)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	ago := func(t time.Time) string {
		return t.Local().Format(time.TimeOnly) + " (" + st.Time.Sub(t).Round(time.Second).String() + " ago)"
	}

	if st.Instances != nil || st.InstancesError != "" {
		fmt.Fprintf(tw, "\nINSTANCES (%d)\n", len(st.Instances))
		if st.InstancesError != "" {
			fmt.Fprintf(tw, "cannot list them: %s\n", st.InstancesError)
		}
		if len(st.Instances) > 0 {
			fmt.Fprintln(tw, "NAME\tPEER ADDRESS\tPOLICY REVISION\tHEARTBEAT\tSTATE")
		}
		for _, in := range st.Instances {
			name := shown(in.Name)
			if in.Self {
				name += " (this one)"
			}
			rev := shown(in.PolicyRevision)
			if in.PolicyRevision != st.PolicyRevision {
				rev += " (differs)"
			}
			var states []string
			if in.Draining {
				states = append(states, "draining")
			}
			if in.Stale {
				states = append(states, "stale (no heartbeat: frozen, cut from the database, or dead)")
			}
			state := "serving"
			if len(states) > 0 {
				state = strings.Join(states, ", ")
			}
			age := time.Duration(in.HeartbeatAge * float64(time.Second)).Round(100 * time.Millisecond)
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s ago\t%s\n", name, shown(in.PeerAddress), rev, age, state)
		}
	}

	fmt.Fprintf(tw, "\nSESSIONS (%d)\n", len(st.Sessions))
	if len(st.Sessions) > 0 {
		fmt.Fprintln(tw, "IDENTITY\tTRANSPORT\tACTION\tDESTINATION\tREMOTE\tSTARTED")
	}
	for _, s := range st.Sessions {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", shown(s.Identity), s.Transport, s.Action, shown(s.Destination), s.Remote, ago(s.Started))
	}

	fmt.Fprintf(tw, "\nAGENTS (%d)\n", len(st.Agents))
	if len(st.Agents) > 0 {
		fmt.Fprintln(tw, "IDENTITY\tTRANSPORT\tNAMES\tPUBLIC")
	}
	for _, a := range st.Agents {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", shown(a.Identity), a.Transport, shown(strings.Join(a.Names, ",")), orDash(shown(strings.Join(a.Public, ", "))))
	}

	fmt.Fprintf(tw, "\nPUBLIC PORTS (%d)\n", len(st.PublicPorts))
	if len(st.PublicPorts) > 0 {
		fmt.Fprintln(tw, "EXPOSURE\tADDRESS\tOWNER\tSTATE")
	}
	for _, p := range st.PublicPorts {
		state := "online"
		if !p.Online {
			state = "held (agent reconnecting)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", shown(p.Exposure), orDash(p.Address), shown(p.Owner), state)
	}

	fmt.Fprintf(tw, "\nGRANTS (%d)\n", len(st.Grants))
	if len(st.Grants) > 0 {
		fmt.Fprintln(tw, "DEVICE\tSCOPE\tGRANTED BY\tCREATED\tSTATE")
	}
	for _, g := range st.Grants {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", shown(g.Device), shown(g.Scope), approverOf(g.GrantedBy), g.Created.Local().Format(time.DateTime), grantState(g))
	}

	printShares(tw, st.Shares)

	fmt.Fprintf(tw, "\nRECENT DENIALS (%d, newest last)\n", len(st.Denials))
	if len(st.Denials) > 0 {
		fmt.Fprintln(tw, "TIME\tIDENTITY\tACTION\tDESTINATION\tREASON")
	}
	for _, d := range st.Denials {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", ago(d.Time), shown(d.Identity), d.Action, shown(d.Destination), shown(d.Reason))
	}
	return tw.Flush()
}

// shown makes a string a client chose safe for one table cell: one with a
// control character, a tab or invalid UTF-8 is quoted Go-style, so it can
// neither break the table nor send escape sequences to the terminal.
func shown(s string) string {
	for _, r := range s {
		if r == unicode.ReplacementChar || r == '\t' || !unicode.IsPrint(r) && r != ' ' {
			return strconv.Quote(s)
		}
	}
	return s
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// grantState says whether a grant is in use, idle or revoked (and why).
func grantState(g admin.Grant) string {
	switch {
	case g.Revoked:
		return "revoked: " + shown(g.Why)
	case g.Agent:
		return "agent connected"
	case !g.LastLogin.IsZero():
		return "no agent here; last login " + g.LastLogin.Local().Format(time.DateTime)
	}
	return "never logged in"
}
