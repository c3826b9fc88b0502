package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// DecisionLog writes one JSON line per decision. It is safe for concurrent use;
// each line is written with a single Write, so lines never interleave.
//
// A line holds the decision's time, identity, action, destination (with the
// resolved addresses), source, decision, reason, the deny messages and the policy
// revision, e.g.
//
//	{"time":"2026-11-23T10:00:00.123Z","decision":"deny","reason":"…","revision":"3f2a9c1b0d4e",
//	 "action":"dial","identity":{"user":"bob","device":"pc","device_id":"bob@pc","groups":["dev"],
//	 "serial":"1f","expiry":"…"},"destination":{"host":"db.internal","port":5432,"network":"tcp",
//	 "ips":["10.0.0.5"],"embedded_ipv4":[]},"source":{"address":"192.0.2.7:50000","transport":"tls"}}
//
// "decision" is "allow" or "deny"; "cached": true marks a decision the policy's
// decision cache answered (see Engine.Eval); "error" is present when the evaluation failed
// (the request was denied). The input document carries no secrets: no keys, tokens
// or certificates, only the certificate's serial and expiry.
type DecisionLog struct {
	mu     sync.Mutex
	w      io.Writer
	closer io.Closer // nil for stdout
	now    func() time.Time
}

// OpenDecisionLog opens the log named by spec: "" is no log (nil, nil), "-" is
// stdout, anything else is a file path, opened for appending and created 0600.
func OpenDecisionLog(spec string) (*DecisionLog, error) {
	switch spec {
	case "":
		return nil, nil
	case "-":
		return NewDecisionLog(os.Stdout), nil
	}
	f, err := os.OpenFile(spec, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open decision log: %w", err)
	}
	l := NewDecisionLog(f)
	l.closer = f
	return l, nil
}

// NewDecisionLog writes decisions to w.
func NewDecisionLog(w io.Writer) *DecisionLog { return &DecisionLog{w: w, now: time.Now} }

// Decision is one line of the log.
type Decision struct {
	Time     time.Time `json:"time"`
	Decision string    `json:"decision"` // "allow" or "deny"
	Reason   string    `json:"reason,omitempty"`
	Deny     []string  `json:"deny,omitempty"`
	Revision string    `json:"revision,omitempty"` // empty when TP denied without asking the policy
	Error    string    `json:"error,omitempty"`
	Cached   bool      `json:"cached,omitempty"`
	// The input document's parts, as the policy saw them.
	Action      any `json:"action"`
	Identity    any `json:"identity"`
	Destination any `json:"destination"`
	Source      any `json:"source"`
}

// Record writes one decision for input. err is the evaluation error, if any.
// Recording on a nil *DecisionLog does nothing.
func (l *DecisionLog) Record(input map[string]any, allow bool, reason string, res Result, evalErr error) error {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	off := l.w == nil
	l.mu.Unlock()
	if off {
		return nil
	}
	d := Decision{
		Time: l.now().UTC(), Decision: "deny", Reason: reason, Deny: res.Deny, Revision: res.Revision, Cached: res.Cached,
		Action: input["action"], Identity: input["identity"], Destination: input["destination"], Source: input["source"],
	}
	if allow {
		d.Decision = "allow"
	}
	if evalErr != nil {
		d.Error = evalErr.Error()
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(d); err != nil {
		return fmt.Errorf("decision log: %w", err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.w == nil { // turned off meanwhile (Reopen)
		return nil
	}
	if _, err := l.w.Write(buf.Bytes()); err != nil {
		return fmt.Errorf("decision log: %w", err)
	}
	return nil
}

// Close closes the log file (not stdout).
func (l *DecisionLog) Close() error {
	if l == nil || l.closer == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	err := l.closer.Close()
	l.closer = nil
	if errors.Is(err, os.ErrClosed) {
		return nil
	}
	return err
}

// Reopen points the log at spec, as OpenDecisionLog does ("" turns it off, "-"
// is stdout), and closes the file it wrote before: tpd's reload, and a rotated
// file. On error the log keeps writing where it did.
func (l *DecisionLog) Reopen(spec string) error {
	var w io.Writer
	var closer io.Closer
	switch spec {
	case "":
	case "-":
		w = os.Stdout
	default:
		f, err := os.OpenFile(spec, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return fmt.Errorf("open decision log: %w", err)
		}
		w, closer = f, f
	}
	l.mu.Lock()
	old := l.closer
	l.w, l.closer = w, closer
	l.mu.Unlock()
	if old != nil {
		if err := old.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
			return fmt.Errorf("close the previous decision log: %w", err)
		}
	}
	return nil
}
