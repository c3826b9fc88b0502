//go:build !linux

package tun

import (
	"context"
	"errors"
	"runtime"
)

// Device is an open tun device; only Linux has them here.
type Device struct{}

// Headroom is the room WriteBatch and Write need in front of each packet.
const Headroom = 10

func (d *Device) Name() string { return "" }
func (d *Device) ReadBatch(bufs [][]byte, sizes []int, offset int) (int, error) {
	return 0, errUnsupported
}
func (d *Device) WriteBatch(bufs [][]byte, offset int) (int, int, error) {
	return len(bufs), 0, errUnsupported
}
func (d *Device) Write(p []byte) (int, error)    { return 0, errUnsupported }
func (d *Device) readRaw([]byte) (int, error)    { return 0, errUnsupported }
func (d *Device) writeSegment([]byte, int) error { return errUnsupported }

func split(in []byte, bufs [][]byte, sizes []int, offset int) (int, error) {
	return 0, errUnsupported
}
func splitRead(vh, pkt []byte, bufs [][]byte, sizes []int, offset int) (int, error) {
	return 0, errUnsupported
}
func keepSegment(vh, pkt []byte) int { return 0 }

const vnetHdrLen = 10

func (d *Device) Close() error { return nil }

// Up fails: tun devices are supported on Linux only.
func (d *Device) Up(context.Context, int) error { return errUnsupported }

func (d *Device) batch(mtu int) int { return BatchFor(mtu) }

// BatchFor is how many buffers ReadBatch may need for one segment.
func BatchFor(mtu int) int {
	mss := max(mtu, 1280) - 60
	return (65535+mss-1)/mss + 1
}

var errUnsupported = errors.New("tun devices are supported on Linux only, not on " + runtime.GOOS)

// Open fails: tun devices are supported on Linux only.
func Open(string) (*Device, error) { return nil, errUnsupported }

func deviceGone(err error) bool { return err != nil }
