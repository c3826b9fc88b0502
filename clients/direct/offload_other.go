//go:build !linux

package direct

import "net"

func offload(*net.UDPConn) (gso, gro bool) { return false, false }

func segmentControl(int) []byte { return nil }

func coalescedSize([]byte) int { return 0 }
