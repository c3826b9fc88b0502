// Command dlogin logs this device in to TP: the first time with the enrollment
// command an administrator printed (server, fingerprint, token), or by signing
// in with the organisation's identity provider (--sso), afterwards with no
// arguments. Each login writes a fresh 4-hour certificate to $TP_HOME.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
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
	var server, fingerprint, token, device string
	var sso, noBrowser bool
	var share string
	cmd := &cobra.Command{
		Use:   "dlogin [--server URL --fingerprint SHA256:… (--token TOKEN | --sso [--device NAME])]",
		Short: "Log this device in to TP and get a fresh certificate",
		Long: "The first run enrolls the device with the command `tpd enroll` printed, or, with --sso,\n" +
			"by signing in with your organisation's identity provider: in this machine's browser, or, over ssh,\n" +
			"without a desktop or with --no-browser, on any device with a page and a code dlogin prints.\n" +
			"Later runs need no arguments; tp also renews by itself when it can.",
		Example: "  dlogin --server https://tp.example.org --fingerprint SHA256:… --token …\n" +
			"  dlogin --sso --server https://tp.example.org --fingerprint SHA256:… --device laptop",
		Args:          cli.Positional(),
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.LoadClient(cmd.Flags())
			if err != nil {
				return err
			}
			home := clients.Home{Dir: cfg.Home}
			open, why := browserOpener(os.Getenv, runtime.GOOS, exec.LookPath)
			if noBrowser {
				open, why = nil, "--no-browser"
			}
			firstIDToken := "" // an enrollment's sign-in, fresh for the login that follows it
			switch {
			case sso && token != "":
				return errors.New("--sso and --token are two ways to enrol: give one (--sso signs in with your organisation's identity provider, --token uses what `tpd enroll` printed)")
			case share != "" && !sso:
				return errors.New("--share picks, with --sso, the name shared with you when several are; it has no meaning without --sso")
			case device != "" && !sso:
				return errors.New("--device names the device for --sso; with --token the name is the one `tpd enroll` was given")
			case noBrowser && token != "":
				return errors.New("--no-browser is for signing in (--sso, or a later dlogin on a server whose renewals need a sign-in), not for --token: it signs in with a code instead of this machine's browser")
			case sso:
				// The sign-in waits for a person at a browser: the code's
				// own expiry bounds it, not the login's timeout.
				_, statErr := os.Lstat(home.Dir)
				var err error
				if firstIDToken, err = enrollSSO(cmd.Context(), home, server, fingerprint, device, share, open, why, stdout); err != nil {
					if errors.Is(statErr, fs.ErrNotExist) {
						_ = os.RemoveAll(home.Dir)
					}
					return err
				}
			case token != "" || server != "" || fingerprint != "":
				// A first enrollment that fails leaves no trace: an empty (or
				// half-written) TP_HOME would only confuse the next try.
				_, statErr := os.Lstat(home.Dir)
				ctx, cancel := context.WithTimeout(cmd.Context(), cfg.Timeout)
				err := enroll(ctx, home, server, fingerprint, token, stdout)
				cancel()
				if err != nil {
					if errors.Is(statErr, fs.ErrNotExist) {
						_ = os.RemoveAll(home.Dir)
					}
					return err
				}
			}
			// A login may sign the person in again (sso-renew: sign-in), in a
			// browser or with a code: ssoWait more. Each request to the server
			// has its own bound (login.HTTPClient).
			ctx, cancel := context.WithTimeout(cmd.Context(), cfg.Timeout+ssoWait)
			defer cancel()
			c, err := clients.Open(home)
			if err != nil {
				return err
			}
			c.FreshIDToken = firstIDToken
			c.SignIn = func(ctx context.Context, info login.SSOInfo) (login.Tokens, error) {
				fmt.Fprintf(stdout, "The TP server renews this device only with a sign-in at %s\n", info.Issuer)
				return signIn(ctx, info, open, why, stdout)
			}
			// tp renews under the same lock: one refresh of the provider's
			// token at a time (a provider that rotates them refuses the
			// older one).
			unlock, err := home.Lock(ctx)
			if err != nil {
				return err
			}
			defer unlock()
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
	cmd.Flags().BoolVar(&sso, "sso", false, "enrol this device by signing in with your organisation's identity provider (first run)")
	cmd.Flags().BoolVar(&noBrowser, "no-browser", false, "when signing in (--sso, or a renewal that needs a sign-in): use a code on any device, not this machine's browser")
	cmd.Flags().StringVar(&share, "share", "", "with --sso, for a guest: the name shared with you to enrol for, when several are")
	cmd.Flags().StringVar(&device, "device", "", "with --sso: this device's name, e.g. laptop (default: the host name)")
	config.ClientFlags(cmd.Flags())
	cmd.SetArgs(args)
	cmd.SetOut(stdout)
	cmd.SetErr(stderr)
	cmd.SetFlagErrorFunc(cli.FlagError)
	return cmd.ExecuteContext(ctx)
}

// baseURL is --server as the server's base URL, or a sentence on what is
// wrong with it.
func baseURL(server string) (string, error) {
	u, err := clients.ServerBaseURL(server)
	if ue := (*clients.ServerURLError)(nil); errors.As(err, &ue) {
		return "", fmt.Errorf("--server takes the server's base URL, https://HOST[:PORT], %s (got %q)", ue.Problem, ue.URL)
	}
	return u, err
}

// saveEnrolled keeps what an enrollment gave in home: the device key, the
// server's root and the profile that names the server and the device.
func saveEnrolled(home clients.Home, server string, root *x509.Certificate, key *ecdsa.PrivateKey, deviceID string) error {
	if err := home.SaveDeviceKey(key); err != nil {
		return fmt.Errorf("save device key in %s: %w", home.Dir, err)
	}
	if err := home.SaveRoot(root); err != nil {
		return err
	}
	return home.SaveProfile(clients.Profile{Server: server, Fingerprint: login.Fingerprint(root), DeviceID: deviceID})
}

// enroll pins the server's root, makes the device key and redeems the token.
func enroll(ctx context.Context, home clients.Home, server, fingerprint, token string, stdout io.Writer) error {
	if server == "" || fingerprint == "" || token == "" {
		return errors.New("enrolling needs --server, --fingerprint and --token together; copy the whole dlogin line that `tpd enroll` printed")
	}
	server, err := baseURL(server)
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
	if err := saveEnrolled(home, server, root, key, res.DeviceID); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "Enrolled this device as %s\n", res.DeviceID)
	return nil
}

// ssoWait bounds a sign-in: providers let a device code live 5 to 15 minutes.
const ssoWait = 15 * time.Minute

// enrollSSO pins the server's root, signs the person in with the server's
// identity provider and enrols a new device key as the device they name.
//
// open shows the provider's page in this machine's browser (the
// authorization code flow with a loopback redirect); nil, or a browser that
// cannot be used, signs in with a code instead (the device authorization
// grant), and why says why there is no browser.
//
// It returns the sign-in's ID token, which the login that follows may need.
func enrollSSO(ctx context.Context, home clients.Home, server, fingerprint, device, share string, open func(string) error, why string, stdout io.Writer) (string, error) {
	if p, err := home.Profile(); err == nil {
		// A sign-in enrols a new device; this home's key and profile are
		// another's, which it would overwrite.
		return "", fmt.Errorf("%s already holds the enrolled device %s: run dlogin without arguments to log it in, or set TP_HOME to another directory to enrol another device", home.Dir, p.DeviceID)
	}
	if server == "" || fingerprint == "" {
		return "", errors.New("dlogin --sso needs --server and --fingerprint; your TP administrator publishes both (tpd prints the whole dlogin --sso line when it starts)")
	}
	server, err := baseURL(server)
	if err != nil {
		return "", err
	}
	if device == "" {
		if device, err = hostDevice(); err != nil {
			return "", err
		}
	}
	if !authz.ValidName(device) {
		return "", fmt.Errorf("--device %q: a device name is lowercase letters, digits, '.', '_' and '-', e.g. laptop", device)
	}
	if err := home.Init(); err != nil {
		return "", err
	}
	short, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	fmt.Fprintf(stdout, "Fetching the root certificate from %s\n", server)
	root, err := login.FetchRoot(short, server, fingerprint)
	if err != nil {
		return "", err
	}
	hc := login.HTTPClient(root)
	info, err := login.FetchSSO(short, hc, server)
	if err != nil {
		return "", err
	}
	tokens, err := signIn(ctx, info, open, why, stdout)
	if err != nil {
		return "", err
	}
	key, err := clients.NewDeviceKey()
	if err != nil {
		return "", err
	}
	enrolCtx, cancelEnrol := context.WithTimeout(ctx, time.Minute)
	defer cancelEnrol()
	res, err := login.EnrollDeviceSSOShare(enrolCtx, hc, server, tokens.IDToken, device, share, key)
	if err != nil {
		return "", fmt.Errorf("enrollment failed: %w", err)
	}
	if err := saveEnrolled(home, server, root, key, res.DeviceID); err != nil {
		return "", err
	}
	if info.Renew == login.RenewSignIn { // renewals sign in again: keep where, and the refresh token
		st := clients.SSOState{SSOInfo: info}
		if info.KeepRefresh {
			st.RefreshToken = tokens.RefreshToken
		}
		if err := home.SaveSSO(st); err != nil {
			return "", fmt.Errorf("save the sign-in in %s: %w", home.Dir, err)
		}
	}
	if g := res.Guest; g != nil {
		fmt.Fprintf(stdout, "Enrolled this device as %s, a guest: %s shared %s with you until %s.\n", res.DeviceID, g.By, g.Host, g.Until.Local().Format(time.DateTime))
		fmt.Fprintf(stdout, "This device may connect to %s and nothing else, e.g. ssh -o ProxyCommand='tp %%h %%p' %s\n", g.Host, g.Host)
		return tokens.IDToken, nil
	}
	groups := "none"
	if len(res.Groups) > 0 {
		groups = strings.Join(res.Groups, ", ")
	}
	fmt.Fprintf(stdout, "Enrolled this device as %s (groups: %s)\n", res.DeviceID, groups)
	if len(res.Ignored) > 0 {
		fmt.Fprintf(stdout, "Groups from the identity provider that TP left out (not valid TP names): %s\n", strings.Join(res.Ignored, ", "))
	}
	return tokens.IDToken, nil
}

// signIn signs the person in at the server's identity provider: in this
// machine's browser when open is set (the authorization code flow with a
// loopback redirect), else, or when the browser cannot be used, with a code
// (the device authorization grant); why says why there is no browser. The
// sign-in waits for a person: ssoWait bounds it, not the login's timeout.
func signIn(ctx context.Context, info login.SSOInfo, open func(string) error, why string, stdout io.Writer) (login.Tokens, error) {
	wait, cancelWait := context.WithTimeout(ctx, ssoWait)
	defer cancelWait()
	idp := &http.Client{Timeout: 30 * time.Second}
	tokens, err := login.Tokens{}, error(errNoOpener)
	if open != nil {
		tokens, err = login.SignInBrowser(wait, idp, info, func(page string) error {
			fmt.Fprintf(stdout, "Opening your browser to sign in at %s\n(if it does not open, open this page on this machine: %s)\n", info.Issuer, page)
			fmt.Fprintln(stdout, "Waiting for the browser to come back… (if the provider shows an error instead of a sign-in, press Ctrl-C and run dlogin --sso --no-browser to sign in with a code)")
			return open(page)
		})
		if errors.Is(err, login.ErrNoBrowser) {
			fmt.Fprintf(stdout, "No browser sign-in (%v): signing in with a code instead\n", err)
		}
	} else {
		fmt.Fprintf(stdout, "Signing in with a code (%s)\n", why)
	}
	if errors.Is(err, errNoOpener) || errors.Is(err, login.ErrNoBrowser) {
		tokens, err = login.SignIn(wait, idp, info, func(c login.DeviceCode) {
			fmt.Fprintf(stdout, "To sign in, open %s and enter the code %s\n", c.URL, c.Code)
			if c.Complete != "" {
				fmt.Fprintf(stdout, "(or open %s, which carries the code)\n", c.Complete)
			}
			fmt.Fprintln(stdout, "Waiting for the sign-in to be approved…")
		})
	}
	return tokens, err
}

// hostDevice is a device name made of the host name: lowercased, its first
// label, other characters as '-'.
func hostDevice() (string, error) {
	h, err := os.Hostname()
	if err != nil {
		return "", fmt.Errorf("cannot read the host name for the device's name (%v): give one with --device NAME", err)
	}
	h, _, _ = strings.Cut(strings.ToLower(h), ".")
	var b strings.Builder
	for _, r := range h {
		switch {
		case 'a' <= r && r <= 'z', '0' <= r && r <= '9', r == '_', r == '-':
			b.WriteRune(r)
		default:
			b.WriteByte('-')
		}
	}
	name := strings.Trim(b.String(), "-_")
	if len(name) > authz.MaxNameLen {
		name = name[:authz.MaxNameLen]
	}
	if !authz.ValidName(name) {
		return "", fmt.Errorf("the host name %q makes no device name: give one with --device NAME, e.g. laptop", h)
	}
	return name, nil
}
