package config

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// Client is the configuration of tp and dlogin. Everything about the server
// lives in $TP_HOME after the first dlogin; these are the per-run knobs.
type Client struct {
	// Home is the client state directory ($TP_HOME, default DefaultClientHome).
	Home string `mapstructure:"home"`
	// Timeout bounds connection setup (TCP, TLS, hello) and each login.
	Timeout time.Duration `mapstructure:"timeout"`
	// Transport is how tp reaches the server: auto, quic or tls.
	Transport string `mapstructure:"transport"`
	// Carrier is what carries tp's QUIC connection: "" (UDP, or auto's choice),
	// auto, udp, tls, ws or http (docs/PROTOCOL.md §9.8).
	Carrier string `mapstructure:"carrier"`
	// CarrierHTTPURL is the http carrier's endpoint when not
	// https://SERVER/.well-known/tp-carrier/http: a CDN's URL, or tpd's
	// plain-HTTP listener (http://…) for a proxy that forwards only plain HTTP.
	CarrierHTTPURL string `mapstructure:"carrier-http-url"`
	// CarrierHeadStart is how long auto gives QUIC over UDP alone before it
	// also tries the stream carriers (0: the client's default, 500 ms).
	CarrierHeadStart time.Duration `mapstructure:"carrier-head-start"`
	// Direct makes sessions to protected names (tp expose) streams of one
	// end-to-end QUIC connection per name, moved to a direct path between the
	// two devices when their networks let one through (docs/PROTOCOL.md
	// §11.4.2).
	Direct bool `mapstructure:"direct"`
	// DirectInterfaces, when set, are the only network interfaces whose
	// addresses a direct path may use (loopback included when named: tests
	// and benchmarks on one host); empty means every interface but loopback
	// and TP's own tun devices.
	DirectInterfaces []string `mapstructure:"direct-interfaces"`
	// Quiet drops tp's progress lines ("Connecting to …"); errors still show.
	Quiet bool `mapstructure:"quiet"`
	// Debug adds tp's debug lines: every attempt's own error where the usual
	// line gives only the most telling cause (a connection to the server).
	Debug bool `mapstructure:"debug"`
}

// Validate checks the client configuration.
func (c Client) Validate() error {
	var errs []error
	if c.Home == "" {
		errs = append(errs, errors.New("home must be set (TP_HOME or --home)"))
	}
	switch c.Transport {
	case "auto", "quic", "tls":
	default:
		errs = append(errs, fmt.Errorf("transport %q must be auto, quic or tls (--transport or TP_TRANSPORT)", c.Transport))
	}
	switch c.Carrier {
	case "", "auto", "udp", "tls", "ws", "http":
	default:
		errs = append(errs, fmt.Errorf("carrier %q must be auto, udp, tls, ws or http (--carrier or TP_CARRIER)", c.Carrier))
	}
	if c.Carrier != "" && c.Carrier != "udp" && c.Carrier != "auto" && c.Transport == "tls" {
		errs = append(errs, fmt.Errorf("carrier %q carries QUIC; it does not go with transport tls (drop --transport tls, or --carrier)", c.Carrier))
	}
	if c.CarrierHTTPURL != "" {
		if u, err := url.Parse(c.CarrierHTTPURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			errs = append(errs, fmt.Errorf("carrier-http-url %q must be an http:// or https:// URL with a host, such as http://tp.example.org/.well-known/tp-carrier/http (--carrier-http-url or TP_CARRIER_HTTP_URL)", c.CarrierHTTPURL))
		}
	}
	if c.CarrierHeadStart < 0 || c.CarrierHeadStart > time.Minute {
		errs = append(errs, fmt.Errorf("carrier-head-start %s must be between 0 and 1m (--carrier-head-start or TP_CARRIER_HEAD_START)", c.CarrierHeadStart))
	}
	for _, name := range c.DirectInterfaces {
		if name == "" || strings.ContainsAny(name, " /,") {
			errs = append(errs, fmt.Errorf("direct-interfaces names %q, which is no network interface name (a list such as eth0,wlan0; --direct-interfaces or TP_DIRECT_INTERFACES)", name))
		}
	}
	if c.Timeout <= 0 || c.Timeout > 10*time.Minute {
		errs = append(errs, fmt.Errorf("timeout %s must be between 0 and 10m", c.Timeout))
	}
	return errors.Join(errs...)
}

// ClientFlags registers the flags shared by tp and dlogin.
func ClientFlags(fs *pflag.FlagSet) {
	fs.String("home", "", "client state directory (env TP_HOME, default "+defaultHomeHelp()+")")
	fs.Duration("timeout", 30*time.Second, "bound on connecting and on logging in (env TP_TIMEOUT)")
}

// LoadClient reads TP_* environment variables, then flags.
func LoadClient(fs *pflag.FlagSet) (Client, error) {
	v := viper.New()
	// Every key needs a default: viper only unmarshals environment values for keys it knows.
	v.SetDefault("home", "")
	v.SetDefault("timeout", 30*time.Second)
	v.SetDefault("transport", "auto")
	v.SetDefault("carrier", "")
	v.SetDefault("carrier-http-url", "")
	v.SetDefault("carrier-head-start", time.Duration(0))
	v.SetDefault("direct", false)
	v.SetDefault("direct-interfaces", []string{})
	v.SetDefault("quiet", false)
	v.SetDefault("debug", false)
	v.SetEnvPrefix("TP")
	v.SetEnvKeyReplacer(strings.NewReplacer("-", "_", ".", "_"))
	v.AutomaticEnv()
	for _, key := range []string{"home", "timeout", "transport", "carrier", "carrier-http-url", "carrier-head-start", "direct", "direct-interfaces", "quiet", "debug"} {
		if f := fs.Lookup(key); f != nil && f.Changed {
			if err := v.BindPFlag(key, f); err != nil {
				return Client{}, err
			}
		}
	}
	var c Client
	if err := v.Unmarshal(&c, decodeHook()); err != nil {
		return Client{}, fmt.Errorf("invalid configuration (TP_* environment variables, flags):\n%w", explainDecodeErr(err))
	}
	if c.Home == "" {
		home, err := DefaultClientHome()
		if err != nil {
			return Client{}, err
		}
		c.Home = home
	}
	if err := c.Validate(); err != nil {
		return Client{}, fmt.Errorf("invalid configuration:\n%w", err)
	}
	return c, nil
}

// defaultHomeHelp names the default home in --help: the path itself, or the rule.
func defaultHomeHelp() string {
	if home, err := DefaultClientHome(); err == nil {
		return home
	}
	return "unknown on this machine: set it"
}
