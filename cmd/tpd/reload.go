package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/admin"
)

// reloadLoader reads the configuration again as `tpd serve` read it at start
// (tpd.yaml, TP_* environment, the same flags). started is the configuration
// as loaded then and running as tpd runs it: a listen address whose port the
// kernel picked (--listen HOST:0) is compared as the port tpd got.
func reloadLoader(fs *pflag.FlagSet, started, running config.Server) func() (config.Server, error) {
	return func() (config.Server, error) {
		c, err := config.LoadServer(fs)
		if err == nil && c.Listen == started.Listen {
			c.Listen = running.Listen
		}
		return c, err
	}
}

func reloadCmd(stdout io.Writer) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "reload",
		Short: "Make the running tpd re-read tpd.yaml and the policy, and print what changed",
		Long: "Make the running tpd re-read tpd.yaml (and TP_* variables and its flags) and the policy\n" +
			"directory, like SIGHUP. The new configuration is checked whole first: one that is invalid,\n" +
			"or that changes a setting only a restart can change, is refused with the reason and the\n" +
			"running configuration stays.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.LoadServer(cmd.Flags())
			if err != nil {
				// Only the data dir is needed to find the socket; tpd checks the rest.
				dir, _ := cmd.Flags().GetString("data-dir")
				cfg = config.Server{DataDir: dir}
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			res, err := admin.NewClient(cfg.AdminSocket()).Reload(ctx)
			if err != nil {
				return err
			}
			if len(res.Changed) == 0 {
				fmt.Fprintln(stdout, "Reloaded; nothing changed in tpd.yaml.")
			} else {
				fmt.Fprintln(stdout, "Reloaded; changed:")
				for _, c := range res.Changed {
					fmt.Fprintf(stdout, "  %s\n", c)
				}
			}
			fmt.Fprintf(stdout, "Policy revision: %s\n", res.PolicyRevision)
			return nil
		},
	}
	cmd.Flags().String("data-dir", config.DefaultServer().DataDir, "data dir of the running tpd (env TP_DATA_DIR)")
	return cmd
}
