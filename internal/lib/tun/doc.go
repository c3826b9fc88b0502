// Package tun opens Linux tun devices (layer 3, no packet information header,
// the kernel's TCP and UDP offloads on) and configures them with iproute2's ip
// command: the server side of CONNECT-IP (proxy/connectip.go) opens one per
// peer, `tp ip` (clients/ip.go) one per tunnel. Reader and Writer move
// packets in batches: a TCP flow's data comes and goes in segments of up to
// 64 KiB, split into packets and joined again in user space
// (offload_linux.go). Elsewhere than
// Linux, Open says that tun devices are not supported.
package tun
