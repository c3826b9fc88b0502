package tpd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/server/admin"
	"github.com/tp-proxy/tp/proxy"
)

// liveKeys are the settings a reload applies to a running tpd (by their
// tpd.yaml names). Every other setting needs a restart: a reload that changes
// one is refused, naming it, and changes nothing.
var liveKeys = []string{
	"public-ports",
	"handshake-timeout", "hello-timeout", "dial-timeout", "shutdown-timeout",
	"max-conns", "max-web-conns", "max-handshakes-per-ip", "max-sessions-per-identity",
	"log-level", "decision-log",
	"sites", "default-site", "site-max-body", "site-upstream-timeout",
}

// reloadState is what reloads share (Daemon.ops.reload).
type reloadState struct {
	mu    sync.Mutex // one reload at a time
	load  func() (config.Server, error)
	level *slog.LevelVar
}

// SetReloader gives Reload the way to read the configuration again: tpd.yaml,
// then TP_* environment variables, then the flags `tpd serve` was started with.
// level, when set, is the level of the logger tpd was given, which log-level
// then changes.
func (d *Daemon) SetReloader(load func() (config.Server, error), level *slog.LevelVar) {
	d.ops.reload.mu.Lock()
	defer d.ops.reload.mu.Unlock()
	d.ops.reload.load, d.ops.reload.level = load, level
}

// Reload re-reads the configuration and applies it whole, or not at all: the
// new configuration is validated first, and one that changes a setting a
// running tpd cannot change is refused, naming it. The policy directory is
// reloaded too. It implements admin.Reloader; SIGHUP calls it as well.
func (d *Daemon) Reload(ctx context.Context) (admin.ReloadResponse, error) {
	if err := d.ReopenAuditLog(); err != nil { // a reload follows log rotation, as with SIGHUP
		d.log.Error("reopening the audit log failed; it keeps writing to the file it had open", "err", err)
	}
	res, err := d.reload(ctx)
	act := admin.Act{Act: "config_reload", Subject: d.cfg.ConfigFile(), Via: "reload request", Result: "ok",
		PolicyRevision: d.policy.Revision(), Changed: res.Changed}
	switch {
	case err != nil:
		act.Result, act.Reason = "refused", err.Error()
	case len(res.Changed) == 0:
		act.Result = "unchanged"
	}
	d.AuditAdmin(act)
	if err != nil {
		d.log.Error("configuration reload refused; the running configuration stays", "err", err)
		return res, err
	}
	if len(res.Changed) == 0 {
		d.log.Info("configuration reloaded; nothing changed in tpd.yaml", "policy_revision", res.PolicyRevision)
	} else {
		d.log.Info("configuration reloaded", "changed", strings.Join(res.Changed, "; "), "policy_revision", res.PolicyRevision)
	}
	return res, nil
}

func (d *Daemon) reload(ctx context.Context) (admin.ReloadResponse, error) {
	rs := &d.ops.reload
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if d.Draining() {
		return admin.ReloadResponse{}, errors.New("tpd is stopping; a reload would change nothing")
	}
	if rs.load == nil {
		return admin.ReloadResponse{}, errors.New("this tpd was started without a way to read its configuration again")
	}
	next, err := rs.load()
	if err != nil {
		return admin.ReloadResponse{}, err
	}
	if err := next.Validate(); err != nil { // LoadServer validates; a loader might not
		return admin.ReloadResponse{}, fmt.Errorf("invalid configuration:\n%w", err)
	}
	cur := d.config()
	changed, restart := diffConfig(*cur, next)
	if len(restart) > 0 {
		return admin.ReloadResponse{}, fmt.Errorf("%s changed, which needs a restart of tpd (nothing was applied; undo %s or restart tpd): %s",
			plural(len(restart), "a setting", "settings"), plural(len(restart), "that change", "those changes"), strings.Join(restart, ", "))
	}
	// Check what can fail before applying anything.
	var lvl slog.Level
	if next.LogLevel != cur.LogLevel {
		if rs.level == nil {
			return admin.ReloadResponse{}, errors.New("log-level changed, which needs a restart of this tpd (it was given a fixed log level); nothing was applied")
		}
		if lvl, err = config.ParseLevel(next.LogLevel); err != nil {
			return admin.ReloadResponse{}, err
		}
	}
	if next.DecisionLog != cur.DecisionLog && d.decisions == nil {
		return admin.ReloadResponse{}, errors.New("decision-log was off when tpd started; turning it on needs a restart (nothing was applied)")
	}
	limits := proxy.Limits{HandshakeTimeout: next.HandshakeTimeout, HelloTimeout: next.HelloTimeout, DialTimeout: next.DialTimeout,
		MaxConns: next.MaxConns, MaxWebConns: next.MaxWebConns, MaxHandshakesPerIP: next.MaxHandshakesPerIP,
		MaxSessionsPerIdentity: next.MaxSessionsPerIdentity}
	sites, err := d.prepareSites(*cur, next) // website.go: new handler and certificates, not yet in use
	if err != nil {
		return admin.ReloadResponse{}, fmt.Errorf("%w (nothing was applied)", err)
	}
	if err := d.policy.Reload(ctx); err != nil {
		sites.undo()
		return admin.ReloadResponse{}, fmt.Errorf("policy in %s refused (nothing was applied): %w", d.cfg.PolicyDir(), err)
	}
	if next.DecisionLog != cur.DecisionLog {
		if err := d.decisions.Reopen(next.DecisionLog); err != nil {
			sites.undo()
			return admin.ReloadResponse{}, fmt.Errorf("decision-log %q: %w (nothing else was applied; the policy was reloaded)", next.DecisionLog, err)
		}
	}
	if err := d.proxy.SetLimits(limits); err != nil {
		sites.undo()
		return admin.ReloadResponse{}, err // Validate bounds them tighter; not reached
	}
	sites.apply()
	if next.LogLevel != cur.LogLevel {
		rs.level.Set(lvl)
	}
	d.ops.live.Store(&next) // public-ports and shutdown-timeout read it
	select {                // re-check live sessions against the policy now
	case d.kick <- struct{}{}:
	default:
	}
	return admin.ReloadResponse{Changed: changed, PolicyRevision: d.policy.Revision()}, nil
}

// diffConfig compares two configurations key by key (their tpd.yaml names, in
// its order): changed describes each live setting whose value changed, in the
// form tpd.yaml takes ("hello-timeout: 10s → 3s"); restart names the changed
// keys a running tpd cannot take. An empty list and no list are the same value
// (a tpd.yaml written at the first start says "sites: []" where the defaults had
// none).
func diffConfig(cur, next config.Server) (changed, restart []string) {
	diffFields(reflect.ValueOf(cur), reflect.ValueOf(next), &changed, &restart)
	return changed, restart
}

func diffFields(cv, nv reflect.Value, changed, restart *[]string) {
	t := cv.Type()
	for i := range t.NumField() {
		key, opt, _ := strings.Cut(t.Field(i).Tag.Get("mapstructure"), ",")
		a, b := cv.Field(i), nv.Field(i)
		if opt == "squash" { // an embedded group of keys (ip-tunnel and the ip-* keys)
			diffFields(a, b, changed, restart)
			continue
		}
		if key == "" || key == "-" || sameValue(a, b) {
			continue
		}
		switch {
		case !slices.Contains(liveKeys, key):
			*restart = append(*restart, key)
		case key == "sites":
			*changed = append(*changed, diffSites(a.Interface().([]config.Site), b.Interface().([]config.Site))...)
		default:
			*changed = append(*changed, fmt.Sprintf("%s: %s → %s", key, yamlValue(a), yamlValue(b)))
		}
	}
}

func sameValue(a, b reflect.Value) bool {
	if a.Kind() == reflect.Slice && a.Len() == 0 && b.Len() == 0 {
		return true
	}
	return reflect.DeepEqual(a.Interface(), b.Interface())
}

// diffSites says which sites a reload adds, removes or changes (by name), one
// line each, or that only their order changed.
func diffSites(cur, next []config.Site) []string {
	var out []string
	old := map[string]config.Site{}
	for _, s := range cur {
		old[s.Name] = s
	}
	kept := map[string]bool{}
	for _, s := range next {
		kept[s.Name] = true
		switch o, ok := old[s.Name]; {
		case !ok:
			out = append(out, "sites: added "+yamlValue(reflect.ValueOf(s)))
		case o != s:
			out = append(out, fmt.Sprintf("sites: %s → %s", yamlValue(reflect.ValueOf(o)), yamlValue(reflect.ValueOf(s))))
		}
	}
	for _, s := range cur {
		if !kept[s.Name] {
			out = append(out, "sites: removed "+yamlValue(reflect.ValueOf(s)))
		}
	}
	if len(out) == 0 {
		out = append(out, fmt.Sprintf("sites: order %s → %s", yamlValue(reflect.ValueOf(config.Server{Sites: cur}.SiteNames())),
			yamlValue(reflect.ValueOf(config.Server{Sites: next}.SiteNames()))))
	}
	return out
}

// yamlValue renders a setting's value as tpd.yaml writes it: scalars plain
// (quoted where YAML needs it), durations as 10s or 1m, lists as [a, b], a site
// as {name: www.example.org, root: /srv/www} (the keys it sets).
func yamlValue(v reflect.Value) string {
	if d, ok := v.Interface().(time.Duration); ok {
		return yamlDuration(d)
	}
	switch v.Kind() {
	case reflect.String:
		return yamlString(v.String())
	case reflect.Bool:
		return strconv.FormatBool(v.Bool())
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return strconv.FormatInt(v.Int(), 10)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return strconv.FormatUint(v.Uint(), 10)
	case reflect.Float32, reflect.Float64:
		return strconv.FormatFloat(v.Float(), 'g', -1, 64)
	case reflect.Slice:
		items := make([]string, v.Len())
		for i := range items {
			items[i] = yamlValue(v.Index(i))
		}
		return "[" + strings.Join(items, ", ") + "]"
	case reflect.Struct:
		var fields []string
		for i := range v.NumField() {
			key, _, _ := strings.Cut(v.Type().Field(i).Tag.Get("mapstructure"), ",")
			if key != "" && key != "-" && !v.Field(i).IsZero() {
				fields = append(fields, key+": "+yamlValue(v.Field(i)))
			}
		}
		return "{" + strings.Join(fields, ", ") + "}"
	}
	return fmt.Sprint(v.Interface()) // not reached: config.Server has no other kinds
}

// yamlDuration is d as tpd.yaml spells it: 1m, not 1m0s.
func yamlDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// yamlString is s plain where YAML reads it back as the same string, else
// double-quoted.
func yamlString(s string) string {
	plain := s != "" && strings.TrimSpace(s) == s && !strings.ContainsAny(s[:1], "-?:,[]{}#&*!|>'\"%@`") &&
		!strings.Contains(s, ": ") && !strings.Contains(s, " #") && !strings.HasSuffix(s, ":")
	for _, r := range s {
		if r < ' ' || r == 0x7f {
			plain = false
		}
	}
	switch strings.ToLower(s) {
	case "true", "false", "yes", "no", "on", "off", "null", "~", "y", "n":
		plain = false
	}
	if plain {
		return s
	}
	return strconv.Quote(s)
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
