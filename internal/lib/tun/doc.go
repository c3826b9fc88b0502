// Package tun opens Linux tun devices (layer 3, no packet information header)
// and configures them with iproute2's ip command: the server side of CONNECT-IP
// (proxy/connectip.go) opens one per peer, `tp ip` (clients/ip.go) one per
// tunnel. Elsewhere than Linux, Open says that tun devices are not supported.
package tun
