package tpd

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/proxy"
)

// ipTunnels builds the CONNECT-IP server of cfg (docs/IP.md); nil when
// ip-tunnel is off.
func ipTunnels(cfg config.IPTunnel) (*proxy.IPTunnels, error) {
	if !cfg.IPTunnel {
		return nil, nil
	}
	v4, v6, err := cfg.Pools()
	if err != nil {
		return nil, err
	}
	return proxy.NewIPTunnels(proxy.IPTunnelOptions{
		Pool4: v4, Pool6: v6,
		Hook: cfg.IPHook, HookTimeout: cfg.IPHookTimeout, MTU: cfg.IPMTU,
		PacketsPerSecond: cfg.IPPacketsPerSecond, BytesPerSecond: cfg.IPBytesPerSecond,
	})
}

var (
	ipTunnelsDesc = prometheus.NewDesc("tp_ip_tunnels_total",
		"CONNECT-IP tunnels by outcome (opened, refused).", []string{"outcome"}, nil)
	ipActiveDesc = prometheus.NewDesc("tp_ip_tunnels_active",
		"CONNECT-IP tunnels open now.", nil, nil)
	ipPacketsDesc = prometheus.NewDesc("tp_ip_packets_total",
		"IP packets relayed through CONNECT-IP tunnels, by direction (up: from devices).", []string{"direction"}, nil)
	ipBytesDesc = prometheus.NewDesc("tp_ip_bytes_total",
		"Bytes of IP packets relayed through CONNECT-IP tunnels, by direction.", []string{"direction"}, nil)
	ipDroppedDesc = prometheus.NewDesc("tp_ip_packets_dropped_total",
		"IP packets TP dropped, by reason: source (not the device's address), destination (a prefix or protocol the policy does not grant), inbound (to a device from outside its grant), rate, malformed, too_big, queue (from a device, the tunnel's receive queue full).", []string{"reason"}, nil)
	ipStreamDesc = prometheus.NewDesc("tp_ip_stream_packets_total",
		"IP packets that crossed a tunnel's request stream in DATAGRAM capsules rather than as QUIC DATAGRAM frames (every packet over HTTP/2; TCP segments over HTTP/3 when the client asks for TCP on the stream), by direction.", []string{"direction"}, nil)
	ipSegmentsDesc = prometheus.NewDesc("tp_ip_segments_total",
		"TCP segments of up to 64 KiB that crossed a tunnel whole (TCP_SEGMENT capsules, when the client asks for them), by direction; their packets count in tp_ip_packets_total and tp_ip_stream_packets_total.", []string{"direction"}, nil)
)

// ipCollector exports the CONNECT-IP counters.
type ipCollector struct{ t *proxy.IPTunnels }

func (c ipCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{ipTunnelsDesc, ipActiveDesc, ipPacketsDesc, ipBytesDesc, ipDroppedDesc, ipStreamDesc, ipSegmentsDesc} {
		ch <- d
	}
}

func (c ipCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.t.Stats()
	counter := func(d *prometheus.Desc, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	counter(ipTunnelsDesc, st.Opened, "opened")
	counter(ipTunnelsDesc, st.Refused, "refused")
	ch <- prometheus.MustNewConstMetric(ipActiveDesc, prometheus.GaugeValue, float64(st.Active))
	counter(ipPacketsDesc, st.PacketsUp, "up")
	counter(ipPacketsDesc, st.PacketsDown, "down")
	counter(ipBytesDesc, st.BytesUp, "up")
	counter(ipBytesDesc, st.BytesDown, "down")
	counter(ipDroppedDesc, st.DroppedSource, "source")
	counter(ipDroppedDesc, st.DroppedDestination, "destination")
	counter(ipDroppedDesc, st.DroppedInbound, "inbound")
	counter(ipDroppedDesc, st.DroppedRate, "rate")
	counter(ipDroppedDesc, st.DroppedMalformed, "malformed")
	counter(ipDroppedDesc, st.DroppedTooBig, "too_big")
	counter(ipDroppedDesc, st.DroppedQueue, "queue")
	counter(ipStreamDesc, st.StreamUp, "up")
	counter(ipStreamDesc, st.StreamDown, "down")
	counter(ipSegmentsDesc, st.SegmentsUp, "up")
	counter(ipSegmentsDesc, st.SegmentsDown, "down")
}
