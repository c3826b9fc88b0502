//go:build linux

package tun

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Device is an open tun device with the kernel's offloads (IFF_VNET_HDR,
// TUNSETOFFLOAD): the kernel hands over a TCP stream's data in segments of up
// to 64 KiB, which ReadBatch splits into packets of the device's MTU, and
// WriteBatch joins consecutive packets of one TCP flow into one such segment,
// so a bulk transfer costs a system call per segment, not per packet
// (offload_linux.go). Close removes the device (it is not persistent) and
// unblocks a read.
type Device struct {
	f    *os.File
	name string
	segs int // the most packets the kernel puts in one segment (Up); 0: not set

	raw syscall.RawConn // f's, for writeSegment's writev

	rmu  sync.Mutex
	rbuf []byte // one read: the virtio-net header and up to 64 KiB
	wmu  sync.Mutex
}

// Headroom is the room WriteBatch and Write need in front of each packet
// (the virtio-net header the kernel reads).
const Headroom = 10

// Name is the interface's name, e.g. "tpip3".
func (d *Device) Name() string { return d.name }

// ReadBatch reads what the kernel routes into the device: one packet, or a
// segment split into packets of the device's MTU. Packet i lands at
// bufs[i][offset:] with its length in sizes[i]; it returns how many. A segment
// needs at most BatchFor(mtu) buffers on a device Up set up; one that needs
// more yields the packets that fit and an error (the kernel's TCP sends the
// rest again).
func (d *Device) ReadBatch(bufs [][]byte, sizes []int, offset int) (int, error) {
	d.rmu.Lock()
	defer d.rmu.Unlock()
	if d.rbuf == nil {
		d.rbuf = make([]byte, vnetHdrLen+maxSegmentLength)
	}
	n, err := d.f.Read(d.rbuf)
	if err != nil {
		if errors.Is(err, unix.EBADFD) {
			err = os.ErrClosed
		}
		return 0, err
	}
	return split(d.rbuf[:n], bufs, sizes, offset)
}

// readRaw reads what the kernel routes into the device, the virtio-net
// header first, into b (room for the header and 64 KiB).
func (d *Device) readRaw(b []byte) (int, error) {
	n, err := d.f.Read(b)
	if err != nil && errors.Is(err, unix.EBADFD) {
		err = os.ErrClosed
	}
	return n, err
}

// writeSegment writes seg, a segment CheckSegment accepted, for the kernel
// to cut into packets of size bytes of payload: one writev of the
// virtio-net header and the segment, which it changes in place (its
// checksum fields, segmentHeader).
func (d *Device) writeSegment(seg []byte, size int) error {
	var vh [vnetHdrLen]byte
	segmentHeader(vh[:], seg, size)
	d.wmu.Lock()
	defer d.wmu.Unlock()
	var werr error
	err := d.raw.Write(func(fd uintptr) bool {
		_, werr = unix.Writev(int(fd), [][]byte{vh[:], seg})
		return werr != unix.EAGAIN
	})
	if err == nil {
		err = werr
	}
	if errors.Is(err, unix.EBADFD) {
		err = os.ErrClosed
	}
	return err
}

// WriteBatch writes the packets bufs[i][offset:] (offset at least
// Headroom). Packets of one TCP flow that follow each other are joined into
// one segment where the first one's buffer has the capacity (cap(bufs[i])
// beyond its length); joining changes the lengths of bufs, which the caller
// resets before its next batch. It returns the error of every write the
// kernel refused (a route missing, a header it does not take), joined; the
// others are written.
func (d *Device) WriteBatch(bufs [][]byte, offset int) (refused, refusedBytes int, err error) {
	if offset < Headroom {
		return len(bufs), 0, fmt.Errorf("tun: WriteBatch needs %d bytes in front of each packet, not %d", Headroom, offset)
	}
	d.wmu.Lock()
	defer d.wmu.Unlock()
	var errs []error
	write := func(b []byte, first, n int) {
		if _, err := d.f.Write(b); err != nil {
			if errors.Is(err, unix.EBADFD) {
				err = os.ErrClosed
			}
			errs = append(errs, err)
			// Every packet the write held is refused, a joined segment's too.
			refused += n
			for _, p := range bufs[first : first+n] {
				refusedBytes += len(p) - offset
			}
		}
	}
	joinBatch(bufs, offset, write)
	return refused, refusedBytes, errors.Join(errs...)
}

// Write writes one packet p, copied behind the headroom Write needs; for
// the odd packet (an ICMP error), not for bulk.
func (d *Device) Write(p []byte) (int, error) {
	b := make([]byte, vnetHdrLen+len(p))
	copy(b[vnetHdrLen:], p)
	d.wmu.Lock()
	defer d.wmu.Unlock()
	if _, err := d.f.Write(b); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close removes the device and unblocks a ReadBatch.
func (d *Device) Close() error { return d.f.Close() }

// BatchFor is how many buffers ReadBatch needs for one segment on a device
// of MTU mtu that Up set up: 64 KiB of TCP data in packets of the largest MSS
// the MTU allows with IPv6's 60 bytes of headers, and one more. Up tells the
// kernel to put no more packets than that in a segment (gso_max_segs): a
// smaller MSS (a peer's, a learnt path MTU, an application's UDP_SEGMENT)
// then makes smaller segments, not longer ones.
func BatchFor(mtu int) int {
	mss := max(mtu, 1280) - 60
	return (65535+mss-1)/mss + 1
}

// unboundedSegs is the batch a Reader uses on a device whose segments Up
// could not bound (an older kernel or ip command): enough for 64 KiB in
// packets of an MSS of 512 or more.
const unboundedSegs = 128

// Up sets the device's MTU, bounds its segments to what a Reader holds
// (BatchFor), and brings it up. Where the kernel or the ip command cannot
// bound the segments, the device comes up without the bound and its Readers
// hold more buffers.
func (d *Device) Up(ctx context.Context, mtu int) error {
	segs := BatchFor(mtu) - 1
	err := IP(ctx, "link", "set", "dev", d.name, "mtu", strconv.Itoa(mtu), "gso_max_segs", strconv.Itoa(segs), "up")
	if err == nil {
		d.segs = segs
		return nil
	}
	if err := Up(ctx, d.name, mtu); err != nil {
		return err
	}
	d.segs = 0
	return nil
}

// batch is how many buffers a Reader of this device needs.
func (d *Device) batch(mtu int) int {
	if d.segs > 0 {
		return d.segs + 1
	}
	return max(BatchFor(mtu), unboundedSegs)
}

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
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		_ = unix.Close(fd)
		return nil, permission(fmt.Errorf("create tun device %q: %w", name, err))
	}
	// The TCP offloads: segments of TCP (v4 and v6) and partial checksums.
	if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, unix.TUN_F_CSUM|unix.TUN_F_TSO4|unix.TUN_F_TSO6); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("tun device %q: setting its offloads: %w", ifr.Name(), err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		_ = unix.Close(fd)
		return nil, err
	}
	got := ifr.Name()
	f := os.NewFile(uintptr(fd), "/dev/net/tun:"+got)
	raw, err := f.SyscallConn()
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	return &Device{f: f, raw: raw, name: got}, nil
}

func permission(err error) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("%w: creating a tun device needs CAP_NET_ADMIN (run as root, or grant it: sudo setcap cap_net_admin+ep $(command -v tp))", err)
	}
	return err
}

// deviceGone reports whether err from a read means the device is closed or
// broken, not that one segment was malformed.
func deviceGone(err error) bool {
	var pe *os.PathError
	return errors.Is(err, os.ErrClosed) || errors.As(err, &pe)
}
