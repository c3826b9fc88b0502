package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/admin"
	"github.com/tp-proxy/tp/internal/server/tpd"
	"github.com/tp-proxy/tp/internal/server/users"
	"github.com/tp-proxy/tp/policy"
	"github.com/tp-proxy/tp/proxy"
)

// policyCmd groups the offline policy tools: they read the data dir and need no
// running tpd.
func policyCmd(stdout io.Writer) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Test and explain the policy in DATA_DIR/policy (offline)",
	}
	cmd.AddCommand(policyTestCmd(stdout), policyEvalCmd(stdout))
	return cmd
}

func dataDirFlag(cmd *cobra.Command) {
	cmd.Flags().String("data-dir", config.DefaultServer().DataDir, "data dir holding policy/ and users.json (env TP_DATA_DIR)")
}

func policyTestCmd(stdout io.Writer) *cobra.Command {
	var verbose bool
	cmd := &cobra.Command{
		Use:   "test",
		Short: "Run the Rego unit tests (*_test.rego) next to the policy; exit non-zero if one fails",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.LoadServer(cmd.Flags())
			if err != nil {
				return err
			}
			results, err := policy.RunTests(cmd.Context(), cfg.PolicyDir(), 30*time.Second)
			if err != nil {
				return err
			}
			if len(results) == 0 {
				fmt.Fprintf(stdout, "No tests in %s: add rules named test_… to a file ending in _test.rego.\n", cfg.PolicyDir())
				return nil
			}
			failed := 0
			for _, r := range results {
				status := "PASS"
				switch {
				case r.Skipped:
					status = "SKIP"
				case !r.Pass:
					status = "FAIL"
					failed++
				}
				if status != "PASS" || verbose {
					fmt.Fprintf(stdout, "%s  %s  (%s, %s)\n", status, r.Name, r.Location, r.Duration.Round(time.Microsecond))
				}
				if r.Error != "" {
					fmt.Fprintf(stdout, "      error: %s\n", r.Error)
				}
				if r.Output != "" && (status == "FAIL" || verbose) {
					for _, l := range strings.Split(strings.TrimRight(r.Output, "\n"), "\n") {
						fmt.Fprintf(stdout, "      | %s\n", l)
					}
				}
			}
			fmt.Fprintf(stdout, "%d passed, %d failed\n", len(results)-failed, failed)
			if failed > 0 {
				return fmt.Errorf("%d of %d policy tests failed", failed, len(results))
			}
			return nil
		},
	}
	cmd.Flags().BoolVarP(&verbose, "verbose", "v", false, "list passing tests too, with their print() output")
	dataDirFlag(cmd)
	return cmd
}

func policyEvalCmd(stdout io.Writer) *cobra.Command {
	var (
		user, device, dest, network, action string
		groups, ips                         []string
		showInput, fullTrace                bool
	)
	cmd := &cobra.Command{
		Use:   "eval --user USER --device DEVICE --dest HOST:PORT",
		Short: "Decide one request offline and show the decision, the reason and the rules that held",
		Example: `  tpd policy eval --user alice --device laptop --dest db.internal:5432
  tpd policy eval --user bob --device phone --dest dns.internal:53 --net udp --groups ops
  tpd policy eval --user bob --device phone --dest db.internal:5432 --ip 10.0.0.5`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if user == "" || dest == "" {
				return errors.New("--user and --dest are required, e.g. --user alice --device laptop --dest db.internal:5432")
			}
			if device == "" {
				device = "cli"
			}
			id := authz.DeviceID(user, device)
			if _, _, err := authz.SplitDeviceID(id); err != nil {
				return err
			}
			cfg, err := config.LoadServer(cmd.Flags())
			if err != nil {
				return err
			}
			store, denyList, done, err := tpd.LoadState(cmd.Context(), cfg) // files, or the database
			if err != nil {
				return err
			}
			defer done()
			req, notes, err := evalRequest(cmd.Context(), cfg, store, user, device, dest, network, action, groups, ips, cmd.Flags().Changed("groups"))
			if err != nil {
				return err
			}
			engine, err := policy.Load(cmd.Context(), cfg.PolicyDir(), policy.WithTimeout(cfg.PolicyTimeout))
			if err != nil {
				return err
			}
			input := authz.Input(req)
			if showInput {
				b, _ := json.MarshalIndent(input, "", "  ")
				fmt.Fprintf(stdout, "Input:\n%s\n\n", b)
			}
			var full io.Writer
			var trace strings.Builder
			if fullTrace {
				full = &trace
			}
			res, matches, evalErr := engine.Explain(cmd.Context(), input, full)

			decision, reason := "deny", res.Reason
			revokedReason, revoked := denyList.Denies(req.Identity)
			switch {
			case revoked:
				reason = revokedReason + " (deny list; the policy was not asked)"
			case evalErr != nil:
				reason = "policy evaluation failed: " + evalErr.Error()
			case res.Allow:
				decision = "allow"
			}

			tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "Decision:\t%s\n", decision)
			if decision == "deny" {
				fmt.Fprintf(tw, "Reason:\t%s\n", orNone(reason))
			}
			fmt.Fprintf(tw, "Request:\t%s (groups: %s) %s %s %s\n", req.Identity, orNone(strings.Join(req.Identity.Groups, ", ")),
				req.Action, net.JoinHostPort(req.Destination.Host, strconv.Itoa(req.Destination.Port)), req.Destination.Network)
			fmt.Fprintf(tw, "Addresses:\t%s\n", orNone(addrList(req.Destination.IPs)))
			if emb := input["destination"].(map[string]any)["embedded_ipv4"].([]any); len(emb) > 0 {
				fmt.Fprintf(tw, "Embedded IPv4:\t%v\n", emb)
			}
			fmt.Fprintf(tw, "Policy:\trevision %s (%s)\n", engine.Revision(), strings.Join(engine.Files(), ", "))
			if err := tw.Flush(); err != nil {
				return err
			}
			for _, n := range notes {
				fmt.Fprintf(stdout, "Note: %s\n", n)
			}
			if len(res.Deny) > 0 {
				fmt.Fprintln(stdout, "\nDeny rules that fired (each denies, whatever allow says):")
				for _, d := range res.Deny {
					fmt.Fprintf(stdout, "  - %s\n", d)
				}
			}
			fmt.Fprintln(stdout, "\nRules that held, in evaluation order:")
			if len(matches) == 0 {
				fmt.Fprintln(stdout, "  (none)")
			}
			tw = tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			for _, m := range matches {
				suffix := ""
				if m.Default {
					suffix = "\t(default: no other rule gave a value)"
				}
				fmt.Fprintf(tw, "  %s\t%s%s\n", m.Location, m.Rule, suffix)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			if fullTrace {
				fmt.Fprintf(stdout, "\nFull OPA trace:\n%s", trace.String())
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&user, "user", "", "user name, e.g. alice")
	f.StringVar(&device, "device", "", "device name, e.g. laptop (default cli)")
	f.StringVar(&dest, "dest", "", "destination host:port, e.g. db.internal:5432")
	f.StringVar(&network, "net", "tcp", "tcp (action dial) or udp (action dial_udp)")
	f.StringVar(&action, "action", "", "override the action: dial, dial_udp, listen, expose_public or expose_http")
	f.StringSliceVar(&groups, "groups", nil, "groups, comma separated; used when the user is not in the user store")
	f.StringSliceVar(&ips, "ip", nil, "resolved address of the destination; repeat for several (default: resolve the name now, as tpd would)")
	f.BoolVar(&showInput, "show-input", false, "print the input document the policy sees")
	f.BoolVar(&fullTrace, "trace", false, "print OPA's full evaluation trace as well")
	dataDirFlag(cmd)
	return cmd
}

// evalRequest builds the request tpd would decide. notes tell the administrator
// where the answer may differ from a live request.
func evalRequest(ctx context.Context, cfg config.Server, store users.Store, user, device, dest, network, action string, groups, ips []string, groupsSet bool) (authz.Request, []string, error) {
	var notes []string
	host, portStr, err := net.SplitHostPort(dest)
	if err != nil {
		return authz.Request{}, nil, fmt.Errorf("--dest %q must be host:port, e.g. db.internal:5432 or [2001:db8::1]:22", dest)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 1 || port > 65535 {
		return authz.Request{}, nil, fmt.Errorf("--dest %q has an invalid port; use 1 to 65535", dest)
	}
	host, err = proxy.CanonicalHost(host)
	if err != nil {
		return authz.Request{}, nil, err
	}
	if action == "" {
		switch network {
		case "tcp":
			action = authz.ActionDial
		case "udp":
			action = authz.ActionDialUDP
		default:
			return authz.Request{}, nil, fmt.Errorf("--net %q must be tcp or udp", network)
		}
	}

	var found bool
	for _, u := range store.Users() {
		if u.Name == user {
			found = true
			if groupsSet {
				notes = append(notes, fmt.Sprintf("user %s is in the user store, so its groups are used and --groups is ignored", user))
			}
			groups = u.Groups
		}
	}
	if !found {
		notes = append(notes, fmt.Sprintf("user %s is not in the user store; a real request would be refused before the policy is asked (groups from --groups)", user))
	}
	if groups == nil {
		groups = []string{}
	}

	var addrs []netip.Addr
	switch {
	case len(ips) > 0:
		for _, s := range ips {
			c, err := proxy.CanonicalHost(s)
			ip, perr := netip.ParseAddr(c)
			if err != nil || perr != nil {
				return authz.Request{}, nil, fmt.Errorf("--ip %q is not an IP address", s)
			}
			addrs = append(addrs, ip)
		}
	default:
		if ip, err := netip.ParseAddr(host); err == nil {
			addrs = []netip.Addr{ip}
			break
		}
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		got, err := net.DefaultResolver.LookupNetIP(rctx, "ip", host)
		cancel()
		if err != nil {
			notes = append(notes, fmt.Sprintf("%s does not resolve here (%v); tpd asks the policy with no addresses, as below, and refuses an allowed request with resolve_failed. Give addresses with --ip to see the policy's answer for them", host, err))
		}
		for _, ip := range got {
			addrs = append(addrs, ip.Unmap().WithZone(""))
		}
	}
	req := authz.Request{
		Action: action,
		Identity: authz.Identity{
			DeviceID: authz.DeviceID(user, device), User: user, Device: device,
			Groups: groups, Serial: "0", NotAfter: time.Now().Add(cfg.CertLifetime),
		},
		Destination: authz.Destination{Host: host, Port: port, Network: network, IPs: addrs},
		Source:      authz.Source{Address: "127.0.0.1:0", Transport: "tls"},
		Time:        time.Now(),
	}
	return req, notes, nil
}

func addrList(ips []netip.Addr) string {
	s := make([]string, len(ips))
	for i, ip := range ips {
		s[i] = ip.String()
	}
	return strings.Join(s, ", ")
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

func revokeCmd(stdout io.Writer) *cobra.Command {
	var device, user, serial string
	var remove, list bool
	cmd := &cobra.Command{
		Use:   "revoke (--device USER@DEVICE | --user USER | --serial HEX)",
		Short: "Put a device, user or certificate on the deny list of the running tpd; live sessions end at once",
		Example: `  tpd revoke --device alice@laptop
  tpd revoke --user alice
  tpd revoke --serial 3a:7f:01
  tpd revoke --user alice --remove     # take the entry off again
  tpd revoke --list`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.LoadServer(cmd.Flags())
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			client := admin.NewClient(cfg.AdminSocket())
			if list {
				entries, err := client.DenyList(ctx)
				if err != nil {
					return err
				}
				tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "KIND\tVALUE\tDEVICE\tSINCE")
				for _, e := range entries {
					dev := e.Device
					if dev == "" {
						dev = "-"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", e.Kind, e.Value, dev, when(e.Since))
				}
				return tw.Flush()
			}
			var req admin.RevokeRequest
			n := 0
			for _, c := range []struct{ kind, value string }{{"device", device}, {"user", user}, {"serial", serial}} {
				if c.value != "" {
					req.Kind, req.Value = c.kind, c.value
					n++
				}
			}
			if n != 1 {
				return errors.New("name exactly one of --device USER@DEVICE, --user USER or --serial HEX (or --list)")
			}
			req.Remove = remove
			res, err := client.Revoke(ctx, req)
			if err != nil {
				return err
			}
			fmt.Fprintln(stdout, res.Summary())
			return nil
		},
	}
	cmd.Flags().StringVar(&device, "device", "", "device ID, alice@laptop (alice/laptop works too)")
	cmd.Flags().StringVar(&user, "user", "", "user name: every device of the user")
	cmd.Flags().StringVar(&serial, "serial", "", "certificate serial number in hex (colons allowed)")
	cmd.Flags().BoolVar(&remove, "remove", false, "take the entry off the deny list instead")
	cmd.Flags().BoolVar(&list, "list", false, "print the deny list")
	cmd.Flags().String("data-dir", config.DefaultServer().DataDir, "data dir of the running tpd (env TP_DATA_DIR)")
	return cmd
}

// when prints a time for listings, or "unknown" for entries that recorded none.
func when(t time.Time) string {
	if t.IsZero() {
		return "unknown"
	}
	return t.Local().Format(time.DateTime)
}
