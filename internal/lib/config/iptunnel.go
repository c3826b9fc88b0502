package config

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/spf13/viper"
)

// IPTunnel configures CONNECT-IP tunnels (docs/IP.md): off unless ip-tunnel
// is true. Each tunnel gets a tun device on tpd's host, addresses from the
// pools (or from the policy) and the hook run for it.
type IPTunnel struct {
	IPTunnel bool `mapstructure:"ip-tunnel"`
	// IPPool4 and IPPool6 are prefixes peers' addresses come from ("" for none).
	IPPool4 string `mapstructure:"ip-pool4"`
	IPPool6 string `mapstructure:"ip-pool6"`
	// IPHook is a program and its arguments run for each tunnel, with
	// TUN_DEV_NAME, TUN_CLIENT_ID and TP_* in its environment.
	IPHook        []string      `mapstructure:"ip-hook"`
	IPHookTimeout time.Duration `mapstructure:"ip-hook-timeout"`
	IPMTU         int           `mapstructure:"ip-mtu"`
	// IPPacketsPerSecond and IPBytesPerSecond bound each direction of a tunnel.
	IPPacketsPerSecond int   `mapstructure:"ip-packets-per-second"`
	IPBytesPerSecond   int64 `mapstructure:"ip-bytes-per-second"`
}

func defaultIPTunnel() IPTunnel {
	return IPTunnel{IPPool4: "100.96.0.0/16", IPPool6: "fd74:7000::/64", IPHookTimeout: 10 * time.Second,
		IPMTU: 1280, IPPacketsPerSecond: 100000, IPBytesPerSecond: 50 << 20}
}

func setIPTunnelDefaults(v *viper.Viper, d IPTunnel) {
	v.SetDefault("ip-tunnel", d.IPTunnel)
	v.SetDefault("ip-pool4", d.IPPool4)
	v.SetDefault("ip-pool6", d.IPPool6)
	v.SetDefault("ip-hook", d.IPHook)
	v.SetDefault("ip-hook-timeout", d.IPHookTimeout)
	v.SetDefault("ip-mtu", d.IPMTU)
	v.SetDefault("ip-packets-per-second", d.IPPacketsPerSecond)
	v.SetDefault("ip-bytes-per-second", d.IPBytesPerSecond)
}

// Pools parses the pools; "" is no pool.
func (c IPTunnel) Pools() (v4, v6 netip.Prefix, err error) {
	var errs []error
	if c.IPPool4 != "" {
		if v4, err = netip.ParsePrefix(c.IPPool4); err != nil || !v4.Addr().Is4() {
			errs = append(errs, fmt.Errorf("ip-pool4 %q must be an IPv4 prefix, e.g. 100.96.0.0/16", c.IPPool4))
		}
	}
	if c.IPPool6 != "" {
		if v6, err = netip.ParsePrefix(c.IPPool6); err != nil || !v6.Addr().Is6() {
			errs = append(errs, fmt.Errorf("ip-pool6 %q must be an IPv6 prefix, e.g. fd74:7000::/64", c.IPPool6))
		}
	}
	return v4, v6, errors.Join(errs...)
}

func (c IPTunnel) validate() error {
	if !c.IPTunnel {
		return nil
	}
	_, _, err := c.Pools()
	errs := []error{err}
	if c.IPMTU < 1280 || c.IPMTU > 9000 {
		errs = append(errs, fmt.Errorf("ip-mtu %d must be between 1280 and 9000", c.IPMTU))
	}
	if c.IPHookTimeout <= 0 || c.IPHookTimeout > 5*time.Minute {
		errs = append(errs, fmt.Errorf("ip-hook-timeout %s must be between 1s and 5m", c.IPHookTimeout))
	}
	if c.IPPacketsPerSecond <= 0 || c.IPBytesPerSecond <= 0 {
		errs = append(errs, errors.New("ip-packets-per-second and ip-bytes-per-second must be positive"))
	}
	return errors.Join(errs...)
}
