package main

import (
	"fmt"
	"io"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/cli"
	"github.com/tp-proxy/tp/internal/lib/version"
)

func exposeCmd(stderr io.Writer) *cobra.Command {
	var allowUsers, allowGroups, extra []string
	var exitOnRefusal, refuseGuests, noDirect bool
	var maxSessions int
	var pub publicFlags
	var httpMode, h1Only, devicesOnly bool
	var tunnels int
	var proxyName string
	var req grantFlags
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
			"  tp expose blog 127.0.0.1:8080 --public-sni blog.example.org --tls-cert blog.crt --tls-key blog.key\n" +
			"  tp expose --http blog http://127.0.0.1:8080                       # https://blog.<reverse zone>/ through TP's website",
		Args: cli.Positional("NAME", "LOCAL_ADDR"),
		RunE: func(cmd *cobra.Command, args []string) error {
			name, err := req.request(cmd, stderr, args[0], pub.public())
			if err != nil {
				return err // a grant asked for and not given
			}
			args[0] = name // with --let-pick, the name the person approved
			if httpMode {
				return exposeHTTP(cmd, stderr, args[0], args[1], proxyName, tunnels, h1Only, devicesOnly, exitOnRefusal)
			}
			main, err := pub.exposed(name, args[1])
			if err != nil {
				return err
			}
			if maxSessions < 1 || maxSessions > 1_000_000 {
				return fmt.Errorf("--max-sessions %d must be between 1 and 1000000", maxSessions)
			}
			if !pub.public() && len(allowUsers) == 0 && len(allowGroups) == 0 {
				return fmt.Errorf("say who may connect to %s: --allow-user NAME or --allow-group GROUP (nobody else is allowed, only guests you share it with: tp share)", args[0])
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
			d, err := dialer(cmd.Context(), c, cfg, stderr)
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
				Owner:         ownerOf(c.Profile.DeviceID),
				RefuseGuests:  refuseGuests,
				NoDirect:      noDirect,
				ExitOnRefusal: exitOnRefusal,
				MaxSessions:   maxSessions,
				Explain:       c.WhyRejected,
				Certificate:   c.ReverseCertificate,
				Logger:        logger(cfg, stderr),
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
					// Get the certificates now, not at the first session, and
					// not on the agent's own goroutine: an order takes several
					// round trips to TP's HTTPS API (up to a minute when that
					// API is slow, or the server stops mid-order), and the
					// control session must meanwhile follow the server (a stop
					// means reconnect at once). A session that arrives first
					// waits for the same order (ReverseCertificate).
					go func() {
						for i, n := range full {
							if exposed[i].PublicPort != 0 || exposed[i].PublicSNI != "" {
								continue // public mode: no certificate from TP's CA
							}
							cert, err := c.ReverseCertificate(cmd.Context(), n)
							switch {
							case err != nil && cmd.Context().Err() == nil:
								fmt.Fprintf(stderr, "tp expose: %v\n", err)
							case err == nil:
								fmt.Fprintf(stderr, "tp expose: %s has its certificate from TP's CA, until %s: devices can reach it end to end\n",
									n, cert.Leaf.NotAfter.Local().Format(time.DateTime))
							}
						}
					}()
				},
			}
			go c.RenewReverse(cmd.Context(), func() []string { mu.Lock(); defer mu.Unlock(); return names }, 10*time.Minute)
			return a.Run(cmd.Context())
		},
	}
	cmd.Flags().StringSliceVar(&allowUsers, "allow-user", nil, "users whose devices may connect (repeatable)")
	cmd.Flags().StringSliceVar(&allowGroups, "allow-group", nil, "groups whose members' devices may connect (repeatable)")
	cmd.Flags().BoolVar(&noDirect, "no-direct", false, "refuse direct paths: a dialer with --direct then gets sessions relayed by the TP server, as any other (by default this device answers ICE through the server and takes the dialer's QUIC connection over a direct path when the networks let one through)")
	cmd.Flags().BoolVar(&refuseGuests, "refuse-guests", false, "refuse guests, whom you or another person who may keep NAME exposed shared it with (tp share); by default the server's word that a dialer is a guest of NAME admits it")
	cmd.Flags().IntVar(&maxSessions, "max-sessions", clients.DefaultAgentMaxSessions, "sessions the TP server may have open to this agent at once over QUIC; one more waits up to 10s for one to end, then is refused")
	cmd.Flags().BoolVar(&exitOnRefusal, "exit-on-refusal", false, "exit when the server refuses the names (policy denial, or a name another identity holds) instead of retrying with backoff")
	cmd.Flags().StringSliceVar(&extra, "also", nil, "expose another NAME=HOST:PORT (NAME=HOST:PORT/udp for a UDP service) on the same agent, protected (repeatable)")
	cmd.Flags().BoolVar(&httpMode, "http", false, "serve LOCAL-URL (an http:// URL) as an HTTP app named NAME.<reverse zone> through reverse tunnels (docs/HTTP.md §2; policy action \"expose_http\")")
	cmd.Flags().IntVar(&tunnels, "tunnels", 4, "with --http: reverse tunnels to hold at once (spares when the server speaks HTTP/1.1 inside)")
	cmd.Flags().BoolVar(&h1Only, "http1", false, "with --http: offer only HTTP/1.1 inside the tunnels (one request stream per tunnel)")
	cmd.Flags().BoolVar(&devicesOnly, "devices-only", false, "with --http: serve the app to enrolled devices only (a device certificate is required), not to anyone")
	cmd.Flags().StringVar(&proxyName, "proxy-name", "proxy.localhost", "with --http: the TP server's proxy name (its proxy-names in tpd.yaml), sent as the TLS server name")
	pub.register(cmd)
	req.register(cmd)
	return cmd
}

// exposeHTTP runs `tp expose --http NAME LOCAL-URL`.
func exposeHTTP(cmd *cobra.Command, stderr io.Writer, name, local, proxyName string, tunnels int, h1Only, devicesOnly, exitOnRefusal bool) error {
	u, err := url.Parse(local)
	if err != nil || u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("LOCAL-URL %q must be an http:// or https:// URL, e.g. http://127.0.0.1:8080", local)
	}
	if tunnels < 1 || tunnels > 32 {
		return fmt.Errorf("--tunnels %d must be between 1 and 32 (the server's default bound per name)", tunnels)
	}
	c, cfg, err := open(cmd, stderr)
	if err != nil {
		return err
	}
	d, err := dialer(cmd.Context(), c, cfg, stderr)
	if err != nil {
		return err
	}
	defer d.Close()
	var once sync.Once
	x := &clients.HTTPExposer{
		Server: d.Server, ProxyName: proxyName, TLSConfig: d.TLSConfig, Name: name, Local: u,
		Tunnels: tunnels, H1Only: h1Only, DevicesOnly: devicesOnly, ExitOnRefusal: exitOnRefusal,
		Logger: logger(cfg, stderr),
		Established: func(selected string) {
			once.Do(func() {
				fmt.Fprintf(stderr, "Serving %s as %s.<reverse zone> via %s (%s inside the tunnels, %s); Ctrl-C stops\n", local, name, d.Server, selected, version.Version)
			})
		},
	}
	return x.Run(cmd.Context())
}

// ownerOf is the user of a device ID ("alice@laptop": alice).
func ownerOf(deviceID string) string {
	user, _, _ := strings.Cut(deviceID, "@")
	return user
}
