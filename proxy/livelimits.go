package proxy

import (
	"errors"
	"fmt"
	"time"
)

// Limits are the bounds of Config that SetLimits changes on a running Server
// (tpd's reload): the timeouts of each phase and the connection and session
// caps. Zero takes the default, as in New.
type Limits struct {
	HandshakeTimeout, HelloTimeout, DialTimeout time.Duration

	MaxConns, MaxWebConns, MaxHandshakesPerIP, MaxSessionsPerIdentity int
}

func (l Limits) withDefaults() (Limits, error) {
	var errs []error
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"HandshakeTimeout", l.HandshakeTimeout}, {"HelloTimeout", l.HelloTimeout}, {"DialTimeout", l.DialTimeout}} {
		if d.v < 0 {
			errs = append(errs, fmt.Errorf("%s must not be negative", d.name))
		}
	}
	if l.MaxConns < 0 {
		errs = append(errs, errors.New("MaxConns must not be negative"))
	}
	if l.MaxSessionsPerIdentity < 0 {
		errs = append(errs, errors.New("MaxSessionsPerIdentity must not be negative"))
	}
	if err := errors.Join(errs...); err != nil {
		return l, err
	}
	if l.HandshakeTimeout == 0 {
		l.HandshakeTimeout = 10 * time.Second
	}
	if l.HelloTimeout == 0 {
		l.HelloTimeout = 10 * time.Second
	}
	if l.DialTimeout == 0 {
		l.DialTimeout = 10 * time.Second
	}
	if l.MaxConns == 0 {
		l.MaxConns = 10000
	}
	if l.MaxHandshakesPerIP <= 0 {
		l.MaxHandshakesPerIP = 128
	}
	if l.MaxWebConns <= 0 {
		l.MaxWebConns = max(1, l.MaxConns/2)
	}
	if l.MaxSessionsPerIdentity == 0 {
		l.MaxSessionsPerIdentity = DefaultMaxSessionsPerIdentity
	}
	return l, nil
}

// lim is the bounds in force now: Config's, until SetLimits changes them (a
// Server built without New, as some tests do, has Config's as they are).
func (s *Server) lim() *Limits {
	if l := s.limits.Load(); l != nil {
		return l
	}
	return s.cfgLimits()
}

func (s *Server) cfgLimits() *Limits {
	l := limitsOf(&s.cfg)
	return &l
}

// limitsOf is the bounds part of c, as given.
func limitsOf(c *Config) Limits {
	return Limits{HandshakeTimeout: c.HandshakeTimeout, HelloTimeout: c.HelloTimeout, DialTimeout: c.DialTimeout,
		MaxConns: c.MaxConns, MaxWebConns: c.MaxWebConns, MaxHandshakesPerIP: c.MaxHandshakesPerIP,
		MaxSessionsPerIdentity: c.MaxSessionsPerIdentity}
}

// Limits returns the bounds in force now, defaults filled in.
func (s *Server) Limits() Limits { return *s.lim() }

// SetLimits applies new bounds from now on: to each new connection, handshake,
// hello, dial and session. What is already admitted stays admitted (lowering
// MaxConns closes nothing; a handshake under way keeps its deadline). It refuses
// invalid bounds and changes nothing then.
func (s *Server) SetLimits(l Limits) error {
	l, err := l.withDefaults()
	if err != nil {
		return fmt.Errorf("proxy: invalid limits: %w", err)
	}
	s.limits.Store(&l)
	return nil
}
