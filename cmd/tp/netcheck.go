package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/cli"
)

func netcheckCmd(stdout, stderr io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:   "netcheck",
		Short: "Show whether UDP reaches the TP server and the address it sees this device at",
		Long: "tp netcheck asks the TP server, on its UDP port (the QUIC port), which address and port\n" +
			"this device's UDP comes from (a STUN Binding request). A different address than the\n" +
			"device's own means a NAT on the way. It exits non-zero when UDP gets no answer: tp then\n" +
			"reaches the server over TLS, which works but sets up more slowly.",
		Args: cli.Positional(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, _, err := open(cmd, stderr)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 5*time.Second)
			defer cancel()
			server, err := c.Profile.ServerAddr()
			if err != nil {
				return err
			}
			host, port, err := net.SplitHostPort(server)
			if err != nil {
				return fmt.Errorf("the server address %q is not host:port: %w", server, err)
			}
			ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
			if err != nil {
				return fmt.Errorf("resolving %s: %w", host, err)
			}
			if len(ips) == 0 {
				return fmt.Errorf("resolving %s gave no address", host)
			}
			p, err := strconv.ParseUint(port, 10, 16)
			if err != nil {
				return fmt.Errorf("the server address %q has no port number: %w", server, err)
			}
			// Each of the server's addresses in turn, as a dial would.
			var seen, ap netip.AddrPort
			var pc *net.UDPConn
			for _, ip := range ips {
				ap = netip.AddrPortFrom(ip.Unmap(), uint16(p))
				fmt.Fprintf(stdout, "Server:     %s (%s, UDP)\n", server, ap)
				if pc, err = net.ListenUDP("udp", nil); err != nil {
					return err
				}
				defer pc.Close()
				if seen, err = clients.ReflexiveAddr(ctx, pc, ap); err == nil || !errors.Is(err, clients.ErrNoSTUNAnswer) {
					break
				}
			}
			if err != nil {
				fmt.Fprintf(stdout, "UDP:        no answer\n")
				if errors.Is(err, context.DeadlineExceeded) {
					err = errors.New("no STUN answer within 5 s")
				}
				return fmt.Errorf("UDP to %s gets no answer (%v): tp reaches the server over TLS instead, which works but sets up more slowly; a firewall that blocks UDP to port %s is the usual cause", host, err, port)
			}
			fmt.Fprintf(stdout, "UDP:        works; the server sees this device at %s\n", seen)
			local := localAddrTowards(pc, ap)
			switch {
			case !local.IsValid():
				fmt.Fprintf(stdout, "NAT:        unknown (this device's own address towards the server is unknown)\n")
			case local == seen:
				fmt.Fprintf(stdout, "NAT:        none: the server sees this device's own address\n")
			default:
				fmt.Fprintf(stdout, "NAT:        yes: this device's address is %s\n", local)
			}
			return nil
		},
	}
}

// localAddrTowards is the address and port pc sends from towards to.
func localAddrTowards(pc *net.UDPConn, to netip.AddrPort) netip.AddrPort {
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
	if err != nil {
		return netip.AddrPort{}
	}
	defer c.Close()
	ip := c.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap()
	return netip.AddrPortFrom(ip, pc.LocalAddr().(*net.UDPAddr).AddrPort().Port())
}
