//go:build !linux && !darwin && !windows

package direct

import "net"

func offload(*net.UDPConn) (gso, gro bool) { return false, false }

func segmentControl(b []byte, _ int) []byte { return b }

func coalescedSize([]byte) int { return 0 }
