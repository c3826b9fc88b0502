//go:build !linux

package tun

import (
	"errors"
	"runtime"
)

// Device is an open tun device; only Linux has them here.
type Device struct{}

func (d *Device) Name() string                { return "" }
func (d *Device) Read(p []byte) (int, error)  { return 0, errUnsupported }
func (d *Device) Write(p []byte) (int, error) { return 0, errUnsupported }
func (d *Device) Close() error                { return nil }

var errUnsupported = errors.New("tun devices are supported on Linux only, not on " + runtime.GOOS)

// Open fails: tun devices are supported on Linux only.
func Open(string) (*Device, error) { return nil, errUnsupported }
