package tpd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/admin"
	"github.com/tp-proxy/tp/internal/atomicfile"
	"github.com/tp-proxy/tp/proxy"
)

// Option adjusts a Daemon; for tests and embedding.
type Option func(*options)

type options struct {
	resolver proxy.Resolver
}

// WithResolver replaces the system resolver for destination names (tests use it to
// simulate DNS answers, such as rebinding).
func WithResolver(r proxy.Resolver) Option { return func(o *options) { o.resolver = r } }

// denyFile is the deny list as stored in the data dir.
type denyFile struct {
	Users   []string `json:"users"`
	Devices []string `json:"devices"`
	Serials []string `json:"serials"`
}

var denyKinds = []struct {
	kind authz.DenyKind
	list func(*denyFile) *[]string
}{
	{authz.DenyUser, func(f *denyFile) *[]string { return &f.Users }},
	{authz.DenyDevice, func(f *denyFile) *[]string { return &f.Devices }},
	{authz.DenySerial, func(f *denyFile) *[]string { return &f.Serials }},
}

// LoadDenyList reads the deny list file tpd keeps in the data dir; a missing file
// is an empty list.
func LoadDenyList(path string) (*authz.DenyList, error) {
	dl := &authz.DenyList{}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return dl, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read deny list: %w", err)
	}
	var f denyFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("deny list %s is not valid JSON (%v); fix or restore it — tpd does not start without it, so that no revocation is lost", path, err)
	}
	for _, k := range denyKinds {
		for _, v := range *k.list(&f) {
			dl.Add(k.kind, v)
		}
	}
	return dl, nil
}

// saveDenyList writes the list atomically (temporary file, fsync, rename), 0600.
func saveDenyList(path string, dl *authz.DenyList) error {
	var f denyFile
	for _, k := range denyKinds {
		*k.list(&f) = dl.Entries(k.kind)
	}
	b, err := json.MarshalIndent(&f, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.Write(path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("save deny list: %w", err)
	}
	return nil
}

var serialRE = regexp.MustCompile(`^(0x)?[0-9a-fA-F:]{1,128}$`)

// parseDenyEntry validates a deny-list entry as an administrator types it.
func parseDenyEntry(kind, value string) (authz.DenyKind, string, error) {
	value = strings.TrimSpace(value)
	switch kind {
	case "user":
		if !authz.ValidName(value) {
			return 0, "", fmt.Errorf("user %q is not a valid user name", value)
		}
		return authz.DenyUser, value, nil
	case "device":
		// alice/laptop is accepted as well as alice@laptop.
		if u, dev, ok := strings.Cut(value, "/"); ok && !strings.Contains(value, "@") {
			value = authz.DeviceID(u, dev)
		}
		if _, _, err := authz.SplitDeviceID(value); err != nil {
			return 0, "", err
		}
		return authz.DenyDevice, value, nil
	case "serial":
		if !serialRE.MatchString(value) {
			return 0, "", fmt.Errorf("serial %q is not a hexadecimal certificate serial number (as `tp whoami` or openssl print it)", value)
		}
		return authz.DenySerial, value, nil
	}
	return 0, "", fmt.Errorf("unknown deny-list kind %q: use user, device or serial", kind)
}

// Revoke puts an entry on the deny list (or takes it off with remove), saves the
// list in the data dir and re-checks live sessions at once. It returns how many
// live sessions were closed. It implements admin.Revoker.
func (d *Daemon) Revoke(ctx context.Context, kind, value string, remove bool) (admin.RevokeResponse, error) {
	k, v, err := parseDenyEntry(kind, value)
	if err != nil {
		return admin.RevokeResponse{}, err
	}
	d.denyMu.Lock()
	dl := d.authz.DenyList
	was := dl.Contains(k, v)
	if remove {
		dl.Remove(k, v)
	} else {
		dl.Add(k, v)
	}
	if err := saveDenyList(d.cfg.DenyListFile(), dl); err != nil {
		// Keep memory and disk in step: undo, so a restart does not change behaviour.
		if remove && was {
			dl.Add(k, v)
		} else if !remove && !was {
			dl.Remove(k, v)
		}
		d.denyMu.Unlock()
		return admin.RevokeResponse{}, err
	}
	d.denyMu.Unlock()
	res := admin.RevokeResponse{Kind: kind, Value: v, Removed: remove}
	if !remove {
		// Tokens handed out before the revocation must not enroll the identity again.
		var user, device string
		switch k {
		case authz.DenyUser:
			user = v
		case authz.DenyDevice:
			user, device, _ = authz.SplitDeviceID(v)
		}
		if user != "" {
			if n, err := d.users.DropTokens(user, device); err != nil {
				d.log.Warn("dropping the revoked identity's enrollment tokens failed", "err", err)
			} else if n > 0 {
				d.log.Info("pending enrollment tokens dropped", "kind", kind, "value", v, "tokens", n)
			}
		}
		_, res.Closed = d.proxy.Recheck(ctx)
		d.log.Info("deny list entry added", "kind", kind, "value", v, "live_sessions_closed", res.Closed)
	} else {
		d.log.Info("deny list entry removed", "kind", kind, "value", v)
	}
	return res, nil
}

// DenyEntries lists the deny list; it implements admin.Revoker.
func (d *Daemon) DenyEntries() map[string][]string {
	return map[string][]string{
		"user":   d.authz.DenyList.Entries(authz.DenyUser),
		"device": d.authz.DenyList.Entries(authz.DenyDevice),
		"serial": d.authz.DenyList.Entries(authz.DenySerial),
	}
}

var _ admin.Revoker = (*Daemon)(nil)

// authState is what live sessions were last checked against.
type authState struct {
	revision string
	users    uint64
}

// recheckIfChanged re-checks live sessions when the policy revision or the user
// store changed since the last call. The deny list re-checks on its own (Revoke).
func (d *Daemon) recheckIfChanged(ctx context.Context) {
	now := authState{revision: d.policy.Revision(), users: d.users.Generation()}
	if now == d.checked {
		return
	}
	why := "policy revision changed"
	if now.revision == d.checked.revision {
		why = "users or groups changed"
	}
	d.checked = now
	if checked, closed := d.proxy.Recheck(ctx); checked > 0 {
		d.log.Info("live sessions re-checked", "why", why, "revision", now.revision, "checked", checked, "closed", closed)
	}
}
