package authz

import (
	"fmt"
	"slices"
	"strings"
	"sync"
)

// DenyKind says what a [DenyList] entry names.
type DenyKind int

// The kinds of deny-list entries.
const (
	DenySerial DenyKind = iota // one certificate, by serial number
	DenyDevice                 // one device, by device ID ("alice@laptop"), every certificate
	DenyUser                   // one user, by name ("alice"), every device
	numDenyKinds
)

func (k DenyKind) String() string {
	switch k {
	case DenySerial:
		return "serial"
	case DenyDevice:
		return "device"
	case DenyUser:
		return "user"
	default:
		return fmt.Sprintf("DenyKind(%d)", int(k))
	}
}

// DenyList holds certificates, devices and users that may not connect, whatever
// their certificates and the policy say. It is safe for concurrent use; the zero
// value is an empty list, and a nil *DenyList denies nothing.
type DenyList struct {
	mu   sync.RWMutex
	sets [numDenyKinds]map[string]struct{}
}

// normalize makes equal entries compare equal: values are trimmed and lower-cased,
// and serials also lose a "0x" prefix, colons and leading zeros, so a serial pasted
// from openssl ("0A:1B:…") matches [Identity.Serial].
func normalize(kind DenyKind, v string) string {
	v = strings.ToLower(strings.TrimSpace(v))
	if kind == DenySerial {
		v = strings.TrimPrefix(v, "0x")
		v = strings.ReplaceAll(v, ":", "")
		v = strings.TrimLeft(v, "0")
		if v == "" {
			v = "0"
		}
	}
	return v
}

func validKind(kind DenyKind) {
	if kind < 0 || kind >= numDenyKinds {
		panic(fmt.Sprintf("authz: invalid %v", kind))
	}
}

// Add puts value on the list.
func (d *DenyList) Add(kind DenyKind, value string) {
	validKind(kind)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.sets[kind] == nil {
		d.sets[kind] = make(map[string]struct{})
	}
	d.sets[kind][normalize(kind, value)] = struct{}{}
}

// Remove takes value off the list. Removing an absent value does nothing.
func (d *DenyList) Remove(kind DenyKind, value string) {
	validKind(kind)
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.sets[kind], normalize(kind, value))
}

// Contains reports whether value is on the list.
func (d *DenyList) Contains(kind DenyKind, value string) bool {
	if d == nil {
		return false
	}
	validKind(kind)
	d.mu.RLock()
	defer d.mu.RUnlock()
	_, ok := d.sets[kind][normalize(kind, value)]
	return ok
}

// Entries returns the values of one kind, sorted.
func (d *DenyList) Entries(kind DenyKind) []string {
	if d == nil {
		return nil
	}
	validKind(kind)
	d.mu.RLock()
	defer d.mu.RUnlock()
	out := make([]string, 0, len(d.sets[kind]))
	for v := range d.sets[kind] {
		out = append(out, v)
	}
	slices.Sort(out)
	return out
}

// Denies reports whether id is on the list by user, device or certificate serial,
// and if so, why, in words for the person concerned.
func (d *DenyList) Denies(id Identity) (reason string, denied bool) {
	if d == nil {
		return "", false
	}
	switch {
	case d.Contains(DenyUser, id.User):
		return fmt.Sprintf("access for user %s has been revoked; ask a TP administrator", id.User), true
	case d.Contains(DenyDevice, id.DeviceID):
		return fmt.Sprintf("device %s has been revoked; ask a TP administrator", id.DeviceID), true
	case d.Contains(DenySerial, id.Serial):
		return fmt.Sprintf("certificate %s of %s has been revoked; run dlogin for a new one", id.Serial, id.DeviceID), true
	}
	return "", false
}

// DeniesApprover reports whether the device that approved id's grant
// (approver, "" for a device not granted), or its user, is on the list, and
// if so, why: a grant is revoked with its approver (Granter). A guest's
// device (Identity.Guest) is told of its share's end.
func (d *DenyList) DeniesApprover(id Identity, approver string) (reason string, denied bool) {
	if d == nil || approver == "" {
		return "", false
	}
	user, _, _ := strings.Cut(approver, "@")
	switch {
	case d.Contains(DenyDevice, approver):
	case user != "" && ValidName(user) && d.Contains(DenyUser, user):
		approver = "user " + user
	default:
		return "", false
	}
	if id.Guest != "" {
		return fmt.Sprintf("%s is a guest by a share of %s, whose sharer (%s) has been revoked, and the share ended with it; ask for a new share", id.DeviceID, id.Guest, approver), true
	}
	return fmt.Sprintf("device %s was granted by %s, which has been revoked, and the grant ended with it; the application must ask again and a person approve it", id.DeviceID, approver), true
}

// Replace makes the list hold exactly entries, in one step: a reader sees the
// old list or the new one, never a mix. tpd uses it when the list is reloaded
// from a database that another tpd changed.
func (d *DenyList) Replace(entries map[DenyKind][]string) {
	var sets [numDenyKinds]map[string]struct{}
	for kind, values := range entries {
		validKind(kind)
		sets[kind] = make(map[string]struct{}, len(values))
		for _, v := range values {
			sets[kind][normalize(kind, v)] = struct{}{}
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.sets = sets
}
