package clients

import (
	"context"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/wire"
)

// Carriers (docs/PROTOCOL.md, "Carriers") are in package transport
// (transport.CarrierConn, transport.CarrierDialer).

// Carriers lists the carriers a Dialer can use, in the order auto falls back.
var Carriers = []string{wire.CarrierUDP, wire.CarrierTLS, wire.CarrierWS, wire.CarrierHTTP}

// carrierDialer returns how to open links of the named carrier; each link is
// opened with the Dialer's fields as they are then.
func (d *Dialer) carrierDialer(kind string) (func(context.Context) (transport.CarrierLink, error), error) {
	if _, err := d.carrierLinks().Dial(kind); err != nil {
		return nil, err
	}
	return func(ctx context.Context) (transport.CarrierLink, error) {
		dial, _ := d.carrierLinks().Dial(kind)
		return dial(ctx)
	}, nil
}

// carrierLinks opens the stream carriers' links to the Dialer's server.
func (d *Dialer) carrierLinks() transport.CarrierDialer {
	return transport.CarrierDialer{Server: d.Server, TLSConfig: d.TLSConfig, Proxy: d.CarrierProxy, HTTPURL: d.CarrierHTTPURL}
}

// CarrierAuto starts on UDP and moves to tls, then ws, when UDP gets no answer
// at connect or stops delivering later (carrier_switch.go).
const CarrierAuto = "auto"

// carrier is the Dialer's first carrier, "udp" when unset or auto.
func (d *Dialer) carrier() string {
	if d.Carrier == "" || d.Carrier == CarrierAuto {
		return wire.CarrierUDP
	}
	return d.Carrier
}

// mode is the transport dials use: a stream carrier (or auto, which falls
// back to one) carries QUIC, so it forces "quic".
func (d *Dialer) mode() string {
	if d.Carrier != "" && d.Carrier != wire.CarrierUDP {
		return TransportQUIC
	}
	return d.Transport
}
