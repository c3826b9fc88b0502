package tun

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// ipTimeout bounds one run of the ip command.
const ipTimeout = 5 * time.Second

// IP runs iproute2's ip with args, bounded in time; its error carries ip's
// own message.
func IP(ctx context.Context, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, ipTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if errors.Is(err, exec.ErrNotFound) {
		return errors.New("the ip command (iproute2) is not installed; install iproute2")
	}
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Up sets the device's MTU and brings it up.
func Up(ctx context.Context, dev string, mtu int) error {
	return IP(ctx, "link", "set", "dev", dev, "mtu", strconv.Itoa(mtu), "up")
}

// AddAddress adds a local address to the device; an address it already has
// (a reconnect that gets the same one back) is not an error.
func AddAddress(ctx context.Context, dev string, p netip.Prefix) error {
	return IP(ctx, addrArgs("addr", "replace", p.String(), "dev", dev, "nodad")...)
}

// DelAddress removes a local address from the device.
func DelAddress(ctx context.Context, dev string, p netip.Prefix) error {
	return IP(ctx, addrArgs("addr", "del", p.String(), "dev", dev)...)
}

// addrArgs drops "nodad" for IPv4, where it has no meaning.
func addrArgs(args ...string) []string {
	if strings.Contains(args[2], ":") {
		return args
	}
	out := args[:0:0]
	for _, a := range args {
		if a != "nodad" {
			out = append(out, a)
		}
	}
	return out
}

// AddRoute routes p through the device (replacing a route to p that exists).
func AddRoute(ctx context.Context, dev string, p netip.Prefix) error {
	fam := "-4"
	if p.Addr().Is6() {
		fam = "-6"
	}
	return IP(ctx, fam, "route", "replace", p.Masked().String(), "dev", dev)
}
