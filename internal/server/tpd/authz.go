package tpd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/tp-proxy/tp/acme"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/lib/atomicfile"
	"github.com/tp-proxy/tp/internal/server/admin"
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
	// Since records when each entry was added, by "kind:value" (value as
	// stored); entries written by older versions have none.
	Since map[string]time.Time `json:"since,omitempty"`
	// SerialDevices names the device each revoked certificate was issued to.
	SerialDevices map[string]string `json:"serial_devices,omitempty"`
}

// denyMeta is what the deny list records beside its entries, for people.
type denyMeta struct {
	since     map[string]time.Time
	serialDev map[string]string
}

func denyKey(kind authz.DenyKind, value string) string { return kind.String() + ":" + value }

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
	dl, _, err := loadDenyFile(path)
	return dl, err
}

func loadDenyFile(path string) (*authz.DenyList, denyMeta, error) {
	dl := &authz.DenyList{}
	meta := denyMeta{since: map[string]time.Time{}, serialDev: map[string]string{}}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return dl, meta, nil
	}
	if err != nil {
		return nil, meta, fmt.Errorf("read deny list: %w", err)
	}
	var f denyFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, meta, fmt.Errorf("deny list %s is not valid JSON (%v); fix or restore it — tpd does not start without it, so that no revocation is lost", path, err)
	}
	for _, k := range denyKinds {
		for _, v := range *k.list(&f) {
			dl.Add(k.kind, v)
		}
	}
	for k, t := range f.Since {
		meta.since[k] = t
	}
	for k, dev := range f.SerialDevices {
		meta.serialDev[k] = dev
	}
	return dl, meta, nil
}

// saveDenyList writes the list atomically (temporary file, fsync, rename), 0600.
func saveDenyList(path string, dl *authz.DenyList, meta denyMeta) error {
	f := denyFile{Since: map[string]time.Time{}, SerialDevices: map[string]string{}}
	for _, k := range denyKinds {
		*k.list(&f) = dl.Entries(k.kind)
		for _, v := range *k.list(&f) {
			if t, ok := meta.since[denyKey(k.kind, v)]; ok {
				f.Since[denyKey(k.kind, v)] = t
			}
			if dev, ok := meta.serialDev[v]; ok && k.kind == authz.DenySerial {
				f.SerialDevices[v] = dev
			}
		}
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

// parseDenyEntry validates a deny-list entry as an administrator types it, and
// returns the value as the list stores it.
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
		sn, ok := new(big.Int).SetString(strings.ReplaceAll(strings.TrimPrefix(strings.ToLower(value), "0x"), ":", ""), 16)
		if !ok {
			return 0, "", fmt.Errorf("serial %q is not a hexadecimal certificate serial number (as `tp whoami` or openssl print it)", value)
		}
		return authz.DenySerial, sn.Text(16), nil
	}
	return 0, "", fmt.Errorf("unknown deny-list kind %q: use user, device or serial", kind)
}

// checkRevocable makes sure a revocation names something this tpd knows, so a
// typo fails instead of leaving the real device live. For a serial it returns
// the device the certificate was issued to.
func (d *Daemon) checkRevocable(k authz.DenyKind, v string) (device string, err error) {
	switch k {
	case authz.DenyUser:
		if !d.users.HasUser(v) {
			return "", fmt.Errorf("there is no user %q on this tpd, so nothing was revoked; `tpd users` lists the users and their devices", v)
		}
	case authz.DenyDevice:
		if _, err := d.users.Device(v); err != nil {
			return "", fmt.Errorf("there is no device %q on this tpd, so nothing was revoked; `tpd users` lists the devices (revoke one as USER@DEVICE)", v)
		}
	case authz.DenySerial:
		sn, _ := new(big.Int).SetString(v, 16)
		crt, err := d.ca.IssuedCertificate(sn)
		if errors.Is(err, acme.ErrUnknownSerial) {
			return "", fmt.Errorf("this tpd's CA issued no certificate with serial %s (or it expired and was pruned), so nothing was revoked; `tp whoami` on the device prints its certificate's serial, and `tpd users` lists the devices, which `tpd revoke --device` revokes with all their certificates", v)
		}
		if err != nil {
			return "", err
		}
		if id, err := authz.IdentityFromCert(crt); err == nil {
			device = id.DeviceID
		}
	}
	return device, nil
}

// Revoke puts an entry on the deny list (or takes it off with remove), saves the
// list in the data dir and re-checks live sessions at once. It returns how many
// live sessions were closed. A user, device or serial tpd does not know, or the
// removal of an entry that is not on the list, is an error and changes nothing.
// It implements admin.Revoker.
func (d *Daemon) Revoke(ctx context.Context, kind, value string, remove bool) (res admin.RevokeResponse, err error) {
	k, v, err := parseDenyEntry(kind, value)
	if err != nil {
		return admin.RevokeResponse{}, err
	}
	var device string
	if !remove {
		if device, err = d.checkRevocable(k, v); err != nil {
			return admin.RevokeResponse{}, err
		}
	}
	res = admin.RevokeResponse{Kind: kind, Value: v, Removed: remove, Device: device, KeptIn: d.cfg.DenyListFile()}
	if d.db != nil {
		res.KeptIn = admin.KeptInDatabase
		defer func() { // the others re-check their sessions when the database tells them
			if err == nil {
				res.OtherInstances = d.otherInstances(ctx)
			}
		}()
	}
	key := denyKey(k, v)
	// From the change to its re-check no other re-check runs: one that came
	// between (maintain's, for the database's notice of this very change, or
	// for the dropped tokens below) would close the sessions uncounted, and the
	// revocation would say it closed none.
	d.recheckMu.Lock()
	defer d.recheckMu.Unlock()
	d.denyMu.Lock()
	dl := d.authz.DenyList
	was := dl.Contains(k, v)
	switch {
	case remove && !was:
		d.denyMu.Unlock()
		return admin.RevokeResponse{}, fmt.Errorf("%s %s is not on the deny list, so nothing was removed; `tpd revoke --list` shows the list", kind, v)
	case !remove && was:
		res.Already, res.Since = true, d.deny.since[key]
		if res.Device == "" {
			res.Device = d.deny.serialDev[v]
		}
		d.denyMu.Unlock()
		_, res.Closed = d.proxy.Recheck(ctx)
		return res, nil
	}
	oldSince, hadSince := d.deny.since[key]
	oldDev, hadDev := d.deny.serialDev[v]
	if remove {
		dl.Remove(k, v)
		delete(d.deny.since, key)
		if k == authz.DenySerial {
			delete(d.deny.serialDev, v)
		}
	} else {
		dl.Add(k, v)
		res.Since = time.Now().UTC().Truncate(time.Second)
		d.deny.since[key] = res.Since
		if k == authz.DenySerial && device != "" {
			d.deny.serialDev[v] = device
		}
	}
	if err := d.denySave(dl, d.deny, k, v, remove); err != nil {
		// Keep memory and disk in step: undo, so a restart does not change behaviour.
		if remove {
			dl.Add(k, v)
		} else {
			dl.Remove(k, v)
		}
		delete(d.deny.since, key)
		if hadSince {
			d.deny.since[key] = oldSince
		}
		if k == authz.DenySerial {
			delete(d.deny.serialDev, v)
			if hadDev {
				d.deny.serialDev[v] = oldDev
			}
		}
		d.denyMu.Unlock()
		return admin.RevokeResponse{}, err
	}
	d.denyMu.Unlock()
	if !remove {
		_, res.Closed = d.proxy.Recheck(ctx)
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
		d.log.Info("deny list entry added", "kind", kind, "value", v, "live_sessions_closed", res.Closed)
	} else {
		d.log.Info("deny list entry removed", "kind", kind, "value", v)
	}
	return res, nil
}

// DenyEntries lists the deny list; it implements admin.Revoker.
func (d *Daemon) DenyEntries() []admin.DenyEntry {
	d.denyMu.Lock()
	defer d.denyMu.Unlock()
	var out []admin.DenyEntry
	for _, k := range denyKinds {
		for _, v := range d.authz.DenyList.Entries(k.kind) {
			e := admin.DenyEntry{Kind: k.kind.String(), Value: v, Since: d.deny.since[denyKey(k.kind, v)]}
			if k.kind == authz.DenySerial {
				e.Device = d.deny.serialDev[v]
			}
			out = append(out, e)
		}
	}
	return out
}

var _ admin.Revoker = (*Daemon)(nil)

// authState is what live sessions were last checked against.
type authState struct {
	revision string
	users    uint64
	deny     uint64 // deny-list reloads from the database (another instance's change)
	shares   int    // guest shares past their end
}

// sharesEnded counts the guest shares past their end, looking at the store
// only when it changed or the next end came (under recheckMu).
func (d *Daemon) sharesEnded(gen uint64) int {
	now := time.Now()
	if gen == d.shareGen && now.Before(d.nextShareEnd) {
		return d.shareEnds
	}
	n, next := 0, now.Add(time.Hour) // looked at again within the hour at most
	for _, sh := range d.users.Shares() {
		switch {
		case sh.Revoked:
		case !now.Before(sh.Until):
			n++
		case sh.Until.Before(next):
			next = sh.Until
		}
	}
	d.shareEnds, d.shareGen, d.nextShareEnd = n, gen, next
	return n
}

// recheckIfChanged re-checks live sessions when the policy revision or the user
// store changed since the last call. The deny list re-checks on its own (Revoke).
func (d *Daemon) recheckIfChanged(ctx context.Context) {
	d.recheckMu.Lock()
	defer d.recheckMu.Unlock()
	gen := d.users.Generation()
	now := authState{revision: d.policy.Revision(), users: gen, deny: d.denyGen.Load(), shares: d.sharesEnded(gen)}
	if now == d.checked {
		return
	}
	why := "policy revision changed"
	switch {
	case now.revision != d.checked.revision:
	case now.deny != d.checked.deny:
		why = "deny list changed on another instance"
	case now.users == d.checked.users:
		why = "a guest share ended"
	default:
		why = "users or groups changed"
	}
	d.checked = now
	if checked, closed := d.proxy.Recheck(ctx); checked > 0 {
		d.log.Info("live sessions re-checked", "why", why, "revision", now.revision, "checked", checked, "closed", closed)
	}
}
