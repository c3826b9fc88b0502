//go:build linux

package tun

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Device is an open tun device. Read returns one packet, Write sends one;
// Close removes the device (it is not persistent) and unblocks Read.
type Device struct {
	f    *os.File
	name string
}

// Name is the interface's name, e.g. "tpip3".
func (d *Device) Name() string { return d.name }

func (d *Device) Read(p []byte) (int, error)  { return d.f.Read(p) }
func (d *Device) Write(p []byte) (int, error) { return d.f.Write(p) }
func (d *Device) Close() error                { return d.f.Close() }

// Open creates a tun device named name; a name containing "%d" lets the
// kernel pick the number ("tpip%d"). Without CAP_NET_ADMIN it returns an error
// that says so.
func Open(name string) (*Device, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) {
			return nil, fmt.Errorf("open /dev/net/tun: %w (load the tun module: modprobe tun)", err)
		}
		return nil, permission(fmt.Errorf("open /dev/net/tun: %w", err))
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("tun device name %q: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		_ = unix.Close(fd)
		return nil, permission(fmt.Errorf("create tun device %q: %w", name, err))
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		_ = unix.Close(fd)
		return nil, err
	}
	got := ifr.Name()
	return &Device{f: os.NewFile(uintptr(fd), "/dev/net/tun:"+got), name: got}, nil
}

func permission(err error) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("%w: creating a tun device needs CAP_NET_ADMIN (run as root, or grant it: sudo setcap cap_net_admin+ep $(command -v tp))", err)
	}
	return err
}
