package main

import (
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/version"
)

func exposeCmd(stderr io.Writer) *cobra.Command {
	var allowUsers, allowGroups, extra []string
	var exitOnRefusal bool
	var maxSessions int
	var pub publicFlags
	cmd := &cobra.Command{
		Use:   "expose NAME LOCAL_ADDR",
		Short: "Expose a local service as NAME.<reverse zone> to the devices you allow, end to end",
		Long: "tp expose registers NAME with the TP server and serves NAME.<reverse zone> from\n" +
			"LOCAL_ADDR. Sessions are end-to-end TLS: this device holds a certificate for the\n" +
			"name from TP's CA and checks every dialer's device certificate itself; the server\n" +
			"only relays ciphertext. The server's policy (action \"listen\") decides who may\n" +
			"register a name and (action \"dial\") who may reach it. Ctrl-C unregisters.\n\n" +
			"tp expose stays up: it reconnects after any break (a restart of the server\n" +
			"included) and, when the policy denies the names or another identity took a name\n" +
			"it held, keeps retrying with backoff and says why, so a fixed policy takes\n" +
			"effect without restarting it (--exit-on-refusal exits instead). It exits when\n" +
			"a name is another identity's from the start, or a newer tp expose of the same\n" +
			"device took the names over.",
		Example: "  tp expose laptop-ssh 127.0.0.1:22 --allow-user bob\n" +
			"  ssh -o ProxyCommand=\"tp %h %p\" alice@laptop-ssh.rev.tp.internal   # on bob's device\n" +
			"  tp expose game 127.0.0.1:27015 --public 27015                    # anyone: TCP port 27015 of the TP server\n" +
			"  tp expose game 127.0.0.1:27015 --udp --public 27015              # anyone: UDP port 27015 of the TP server\n" +
			"  tp expose dns 127.0.0.1:53 --udp --allow-group ops              # protected UDP; on a member's device:\n" +
			"  tp forward --udp 127.0.0.1:5353 dns.rev.tp.internal:53\n" +
			"  tp expose blog 127.0.0.1:8080 --public-sni blog.example.org --tls-cert blog.crt --tls-key blog.key",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			main, err := pub.exposed(args[0], args[1])
			if err != nil {
				return err
			}
			if maxSessions < 1 || maxSessions > 1_000_000 {
				return fmt.Errorf("--max-sessions %d must be between 1 and 1000000", maxSessions)
			}
			if !pub.public() && len(allowUsers) == 0 && len(allowGroups) == 0 {
				return fmt.Errorf("say who may connect to %s: --allow-user NAME or --allow-group GROUP (nobody is allowed otherwise)", args[0])
			}
			exposed := []clients.Exposed{main}
			for _, e := range extra {
				name, local, ok := strings.Cut(e, "=")
				if !ok {
					return fmt.Errorf("--also %q must be NAME=HOST:PORT, or NAME=HOST:PORT/udp for a UDP service", e)
				}
				local, udp := strings.CutSuffix(local, "/udp")
				exposed = append(exposed, clients.Exposed{Name: name, Local: local, UDP: udp})
			}
			c, cfg, err := open(cmd, stderr)
			if err != nil {
				return err
			}
			d, err := dialer(cmd.Context(), c, cfg)
			if err != nil {
				return err
			}
			defer d.Close()
			var mu sync.Mutex
			var names []string
			a := &clients.Agent{
				Dialer:        d,
				Exposed:       exposed,
				AllowUsers:    allowUsers,
				AllowGroups:   allowGroups,
				ExitOnRefusal: exitOnRefusal,
				MaxSessions:   maxSessions,
				Explain:       c.WhyRejected,
				Certificate:   c.ReverseCertificate,
				Logger:        slog.New(slog.NewTextHandler(stderr, nil)),
				Registered: func(full []string) {
					mu.Lock()
					names = names[:0]
					for i, n := range full {
						if exposed[i].PublicPort == 0 && exposed[i].PublicSNI == "" {
							names = append(names, n) // protected: keep its certificate fresh
						}
					}
					mu.Unlock()
					for i, n := range full {
						fmt.Fprintf(stderr, "Exposing %s as %s via %s (%s); Ctrl-C stops\n", exposed[i].Local, n, d.Server, version.Version)
						if line := publicLine(exposed[i], d.Server); line != "" {
							fmt.Fprintln(stderr, line)
						}
					}
					// Get the certificates now, not at the first session.
					for i, n := range full {
						if exposed[i].PublicPort != 0 || exposed[i].PublicSNI != "" {
							continue // public mode: no certificate from TP's CA
						}
						if _, err := c.ReverseCertificate(cmd.Context(), n); err != nil {
							fmt.Fprintf(stderr, "tp expose: %v\n", err)
						}
					}
				},
			}
			go c.RenewReverse(cmd.Context(), func() []string { mu.Lock(); defer mu.Unlock(); return names }, 10*time.Minute)
			return a.Run(cmd.Context())
		},
	}
	cmd.Flags().StringSliceVar(&allowUsers, "allow-user", nil, "users whose devices may connect (repeatable)")
	cmd.Flags().StringSliceVar(&allowGroups, "allow-group", nil, "groups whose members' devices may connect (repeatable)")
	cmd.Flags().IntVar(&maxSessions, "max-sessions", clients.DefaultAgentMaxSessions, "sessions the TP server may have open to this agent at once over QUIC; one more waits up to 10s for one to end, then is refused")
	cmd.Flags().BoolVar(&exitOnRefusal, "exit-on-refusal", false, "exit when the server refuses the names (policy denial, or a name another identity holds) instead of retrying with backoff")
	cmd.Flags().StringSliceVar(&extra, "also", nil, "expose another NAME=HOST:PORT (NAME=HOST:PORT/udp for a UDP service) on the same agent, protected (repeatable)")
	pub.register(cmd)
	return cmd
}
