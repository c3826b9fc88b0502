package main

import (
	"fmt"
	"io"
	"net"
	"net/netip"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/cli"
	"github.com/tp-proxy/tp/internal/lib/version"
)

func ipCmd(stderr io.Writer) *cobra.Command {
	var proxyName, tunName string
	var mtu int
	var tcpInDatagrams, noSegments bool
	cmd := &cobra.Command{
		Use:   "ip",
		Short: "Open an IP tunnel (CONNECT-IP) to the TP server: a tun device with the addresses and routes TP assigns (Linux, needs CAP_NET_ADMIN)",
		Example: "  sudo tp ip --proxy-name proxy.example.org\n" +
			"  ping 10.1.0.5          # a host in a prefix the policy grants this device",
		Args: cli.Positional(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, cfg, err := open(cmd, stderr)
			if err != nil {
				return err
			}
			d, err := dialer(cmd.Context(), c, cfg, stderr)
			if err != nil {
				return err
			}
			defer d.Close()
			if proxyName == "" {
				host, _, _ := net.SplitHostPort(d.Server)
				proxyName = host
			}
			log := logger(cfg, stderr)
			t := &clients.IPTunnel{
				Server: d.Server, ProxyName: proxyName, TLSConfig: d.TLSConfig, TunName: tunName, MTU: mtu, Logger: log,
				TCPInDatagrams: tcpInDatagrams, NoSegments: noSegments,
				Explain: c.WhyRejected, Transport: cfg.Transport,
			}
			if !cfg.Quiet {
				t.OnUp = func(dev string, addrs, routes []netip.Prefix) {
					fmt.Fprintf(stderr, "IP tunnel up on %s: addresses %v, routes %v via %s (%s); Ctrl-C stops\n", dev, addrs, routes, d.Server, version.Version)
				}
			}
			return t.Run(cmd.Context())
		},
	}
	cmd.Flags().StringVar(&proxyName, "proxy-name", "", "the TP server's proxy name (one of tpd's proxy-names); default: the server's host name")
	cmd.Flags().StringVar(&tunName, "tun", "tp%d", "name of the tun device (%d: the kernel picks a number)")
	cmd.Flags().IntVar(&mtu, "mtu", 1280, "MTU of the tun device")
	cmd.Flags().BoolVar(&tcpInDatagrams, "tcp-in-datagrams", false, "over HTTP/3, send TCP segments as QUIC datagrams too, instead of on the request stream (every packet then crosses quic-go's datagram queues)")
	cmd.Flags().BoolVar(&noSegments, "no-segments", false, "cut TCP segments into packets of the MTU before sending them, as RFC 9484 does, instead of carrying each (up to 64 KiB) whole")
	return cmd
}
