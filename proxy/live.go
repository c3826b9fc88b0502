package proxy

// The live view: what the server holds right now, for `tpd status`. Each call
// takes one snapshot under the registries' locks and copies it out.

import (
	"github.com/tp-proxy/tp/proxy/reverse"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"
)

// LiveSession is an established session or reverse registration.
type LiveSession struct {
	Identity    string    `json:"identity"`
	Transport   string    `json:"transport"`
	Action      string    `json:"action"`
	Destination string    `json:"destination"`
	Remote      string    `json:"remote"`
	Started     time.Time `json:"started"` // when the policy allowed it
}

// LiveSessions lists the established sessions, oldest first. A registered agent
// shows once per name it listens as or exposes.
func (s *Server) LiveSessions() []LiveSession {
	live := s.sessions.snapshot()
	out := make([]LiveSession, 0, len(live))
	for _, ls := range live {
		d := ls.req.Destination
		dest := d.Host
		switch {
		case d.Host == "" && d.Port != 0: // a public port (expose_public)
			dest = "public " + strings.ToUpper(d.Network) + " port " + strconv.Itoa(d.Port)
		case d.Port != 0:
			dest = net.JoinHostPort(d.Host, strconv.Itoa(d.Port))
		}
		out = append(out, LiveSession{
			Identity: ls.req.Identity.DeviceID, Transport: ls.req.Source.Transport, Action: ls.req.Action,
			Destination: dest, Remote: ls.req.Source.Address, Started: ls.req.Time,
		})
	}
	slices.SortFunc(out, func(a, b LiveSession) int { return a.Started.Compare(b.Started) })
	return out
}

// Agent is a connected agent and what it holds.
type Agent struct {
	Identity  string   `json:"identity"`
	Transport string   `json:"transport"`
	Names     []string `json:"names"`            // full reverse names
	Public    []string `json:"public,omitempty"` // its public exposures, as described in logs
}

// Agents lists the connected agents, by identity.
func (s *Server) Agents() []Agent {
	if s.rev == nil {
		return nil
	}
	seen := map[*reverse.Agent]bool{}
	var out []Agent
	s.rev.Each(func(_, _ string, a *reverse.Agent, _ *reverse.PublicListener) {
		if a == nil || seen[a] {
			return
		}
		seen[a] = true
		ag := Agent{Identity: a.ID.DeviceID, Transport: a.Transport, Names: slices.Clone(a.Names)}
		for _, p := range a.Public {
			ag.Public = append(ag.Public, reverse.DescribeKey(p.Key()))
		}
		out = append(out, ag)
	})
	slices.SortFunc(out, func(a, b Agent) int {
		return strings.Compare(a.Identity+" "+strings.Join(a.Names, ","), b.Identity+" "+strings.Join(b.Names, ","))
	})
	return out
}

// PublicPort is an open public port or a public server name.
type PublicPort struct {
	Exposure string `json:"exposure"`          // "public TCP port 8080", "public server name …"
	Address  string `json:"address,omitempty"` // the listening socket; empty for a server name
	Owner    string `json:"owner"`             // the device that holds it
	Online   bool   `json:"online"`            // false while held through the grace period
}

// PublicPorts lists the public exposures, ports first.
func (s *Server) PublicPorts() []PublicPort {
	if s.rev == nil {
		return nil
	}
	var out []PublicPort
	s.rev.Each(func(k, owner string, a *reverse.Agent, ln *reverse.PublicListener) {
		if !strings.HasPrefix(k, "tcp/") && !strings.HasPrefix(k, "udp/") && !strings.HasPrefix(k, "sni/") {
			return
		}
		p := PublicPort{Exposure: reverse.DescribeKey(k), Owner: owner, Online: a != nil}
		if ln != nil {
			if ln.PC != nil {
				p.Address = "udp " + ln.PC.LocalAddr().String()
			} else {
				p.Address = "tcp " + ln.Addr().String()
			}
		}
		out = append(out, p)
	})
	slices.SortFunc(out, func(a, b PublicPort) int { return strings.Compare(a.Exposure, b.Exposure) })
	return out
}
