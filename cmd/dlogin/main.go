// Command dlogin logs this device in to TP: the first time with the enrollment
// command an administrator printed (server, fingerprint, token), afterwards with
// no arguments. Each login writes a fresh 4-hour certificate to $TP_HOME.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/cli"
	"github.com/tp-proxy/tp/internal/lib/config"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	var usage cli.UsageError
	if errors.As(err, &usage) {
		fmt.Fprintln(os.Stderr, usage) // it names dlogin itself
		os.Exit(1)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "dlogin:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var server, fingerprint, token string
	cmd := &cobra.Command{
		Use:   "dlogin [--server URL --fingerprint SHA256:… --token TOKEN]",
		Short: "Log this device in to TP and get a fresh certificate",
		Long: "The first run enrolls the device with the command `tpd enroll` printed.\n" +
			"Later runs need no arguments; tp also renews by itself when it can.",
		Args:          cli.Positional(),
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.LoadClient(cmd.Flags())
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), cfg.Timeout)
			defer cancel()
			home := clients.Home{Dir: cfg.Home}
			if token != "" || server != "" || fingerprint != "" {
				// A first enrollment that fails leaves no trace: an empty (or
				// half-written) TP_HOME would only confuse the next try.
				_, statErr := os.Lstat(home.Dir)
				if err := enroll(ctx, home, server, fingerprint, token, stdout); err != nil {
					if errors.Is(statErr, fs.ErrNotExist) {
						_ = os.RemoveAll(home.Dir)
					}
					return err
				}
			}
			c, err := clients.Open(home)
			if err != nil {
				return err
			}
			creds, err := c.Login(ctx, func(s string) { fmt.Fprintln(stdout, s) })
			if err != nil {
				return fmt.Errorf("login to %s failed: %w", c.Profile.Server, err)
			}
			leaf := creds.Chain[0]
			fmt.Fprintln(stdout, "Login successful!")
			fmt.Fprintf(stdout, "\tIdentity: %s\n", c.Profile.DeviceID)
			fmt.Fprintf(stdout, "\tExpiration: %s\n", leaf.NotAfter.UTC())
			fmt.Fprintf(stdout, "\tIn: %s\n", time.Until(leaf.NotAfter).Round(time.Second))
			return nil
		},
	}
	cmd.Flags().StringVar(&server, "server", "", "TP server URL, e.g. https://tp.example.org (first run)")
	cmd.Flags().StringVar(&fingerprint, "fingerprint", "", "SHA-256 fingerprint of the server's root certificate (first run)")
	cmd.Flags().StringVar(&token, "token", "", "one-time enrollment token that 'tpd enroll' printed (first run)")
	config.ClientFlags(cmd.Flags())
	cmd.SetArgs(args)
	cmd.SetOut(stdout)
	cmd.SetErr(stderr)
	cmd.SetFlagErrorFunc(cli.FlagError)
	return cmd.ExecuteContext(ctx)
}

// enroll pins the server's root, makes the device key and redeems the token.
func enroll(ctx context.Context, home clients.Home, server, fingerprint, token string, stdout io.Writer) error {
	if server == "" || fingerprint == "" || token == "" {
		return errors.New("enrolling needs --server, --fingerprint and --token together; copy the whole dlogin line that `tpd enroll` printed")
	}
	server, err := clients.ServerBaseURL(server)
	if ue := (*clients.ServerURLError)(nil); errors.As(err, &ue) {
		return fmt.Errorf("--server takes the server's base URL, https://HOST[:PORT], %s (got %q)", ue.Problem, ue.URL)
	}
	if err != nil {
		return err
	}
	if err := home.Init(); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "Fetching the root certificate from %s\n", server)
	root, err := login.FetchRoot(ctx, server, fingerprint)
	if err != nil {
		return err
	}
	key, err := clients.NewDeviceKey()
	if err != nil {
		return err
	}
	res, err := login.EnrollDevice(ctx, login.HTTPClient(root), server, token, key)
	if err != nil {
		return fmt.Errorf("enrollment failed: %w", err)
	}
	if err := home.SaveDeviceKey(key); err != nil {
		return fmt.Errorf("save device key in %s: %w", home.Dir, err)
	}
	if err := home.SaveRoot(root); err != nil {
		return err
	}
	if err := home.SaveProfile(clients.Profile{Server: server, Fingerprint: login.Fingerprint(root), DeviceID: res.DeviceID}); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "Enrolled this device as %s\n", res.DeviceID)
	return nil
}
