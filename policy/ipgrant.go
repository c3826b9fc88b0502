package policy

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/tp-proxy/tp/authz"
)

// maxIPGrantEntries bounds the routes and addresses one "ip" decision may
// grant: each becomes a capsule entry and is checked on every packet.
const maxIPGrantEntries = 256

// ParseIPGrant reads the policy's document ip for an allowed "ip" request:
//
//	ip := {
//	  "routes": ["10.1.0.0/16", {"prefix": "10.2.0.0/24", "protocol": "tcp"}],
//	  "addresses": ["100.64.0.7/32"],   # optional: else from tpd's pool
//	}
//
// A route's protocol is a number (0 to 255), "any" (the default), "tcp",
// "udp", "icmp" or "icmpv6". Anything else is an error, which denies.
func ParseIPGrant(doc any) (*authz.IPGrant, error) {
	g := &authz.IPGrant{}
	if doc == nil {
		return g, nil
	}
	m, ok := doc.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("ip is %s, want an object with routes and addresses", describe(doc))
	}
	for k := range m {
		if k != "routes" && k != "addresses" {
			return nil, fmt.Errorf("ip has the unknown key %q (known: routes, addresses)", k)
		}
	}
	routes, err := list(m["routes"], "ip.routes")
	if err != nil {
		return nil, err
	}
	for i, r := range routes {
		var route authz.IPRoute
		switch r := r.(type) {
		case string:
			if route.Prefix, err = prefix(r); err != nil {
				return nil, fmt.Errorf("ip.routes[%d]: %w", i, err)
			}
		case map[string]any:
			ps, ok := r["prefix"].(string)
			if !ok {
				return nil, fmt.Errorf("ip.routes[%d] has no prefix string", i)
			}
			if route.Prefix, err = prefix(ps); err != nil {
				return nil, fmt.Errorf("ip.routes[%d]: %w", i, err)
			}
			if route.Protocol, err = protocol(r["protocol"]); err != nil {
				return nil, fmt.Errorf("ip.routes[%d]: %w", i, err)
			}
		default:
			return nil, fmt.Errorf("ip.routes[%d] is %s, want a prefix string or {prefix, protocol}", i, describe(r))
		}
		g.Routes = append(g.Routes, route)
	}
	addrs, err := list(m["addresses"], "ip.addresses")
	if err != nil {
		return nil, err
	}
	for i, a := range addrs {
		s, ok := a.(string)
		if !ok {
			return nil, fmt.Errorf("ip.addresses[%d] is %s, want a prefix string", i, describe(a))
		}
		p, err := prefix(s)
		if err != nil {
			return nil, fmt.Errorf("ip.addresses[%d]: %w", i, err)
		}
		g.Addresses = append(g.Addresses, p)
	}
	return g, nil
}

func list(v any, what string) ([]any, error) {
	if v == nil {
		return nil, nil
	}
	l, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("%s is %s, want an array or set", what, describe(v))
	}
	if len(l) > maxIPGrantEntries {
		return nil, fmt.Errorf("%s has %d entries, more than %d", what, len(l), maxIPGrantEntries)
	}
	return l, nil
}

// prefix parses "10.0.0.0/8" or a bare address (a /32 or /128); host bits
// must be clear.
func prefix(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("%q is no IP address or prefix", s)
		}
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is no IP prefix", s)
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("%q has bits set beyond its length (did you mean %s?)", s, p.Masked())
	}
	return p, nil
}

func protocol(v any) (uint8, error) {
	switch v := v.(type) {
	case nil:
		return 0, nil
	case string:
		switch strings.ToLower(v) {
		case "any":
			return 0, nil
		case "icmp":
			return 1, nil
		case "tcp":
			return 6, nil
		case "udp":
			return 17, nil
		case "icmpv6":
			return 58, nil
		}
	case float64:
		if v >= 0 && v <= 255 && v == float64(int(v)) {
			return uint8(v), nil
		}
	case int:
		if v >= 0 && v <= 255 {
			return uint8(v), nil
		}
	default:
		// OPA gives numbers as json.Number.
		if n, ok := v.(interface{ Int64() (int64, error) }); ok {
			if i, err := n.Int64(); err == nil && i >= 0 && i <= 255 {
				return uint8(i), nil
			}
		}
	}
	return 0, fmt.Errorf("protocol %v is not any, tcp, udp, icmp, icmpv6 or a number from 0 to 255", v)
}
