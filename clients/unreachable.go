package clients

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/wire"
)

// unreachable makes err, the failure of a connection to the server, an
// *UnreachableError; nil, a closed Dialer and an error already made one stay
// as they are.
func (d *Dialer) unreachable(err error) error {
	if err == nil || errors.Is(err, ErrDialerClosed) || errors.As(err, new(*UnreachableError)) {
		return err
	}
	timeout := d.Timeout
	if timeout <= 0 {
		timeout = DefaultDialTimeout
	}
	if ce := (*clientCertError)(nil); errors.As(err, &ce) {
		// No attempt got as far as the server's answer: this device had no
		// certificate to show, which its own error explains.
		return &UnreachableError{Server: d.Server, Cause: "this device has no certificate to show it: " + ce.Error(), Err: err}
	}
	udpOnly := d.mode() == TransportQUIC && (d.Carrier == "" || d.Carrier == wire.CarrierUDP) && len(d.FallbackCarriers) == 0
	return &UnreachableError{Server: d.Server, Cause: transport.ReachCause(err, timeout, udpOnly, d.expiredAdvice()), Err: err}
}

// retryLine is what a long-running client says when it could not connect to
// the server and tries again after wait: one sentence, the cause first.
func retryLine(err error, wait time.Duration) string {
	msg := err.Error()
	if !strings.HasSuffix(msg, "?") && !strings.HasSuffix(msg, ".") {
		msg += "."
	}
	return fmt.Sprintf("%s Next attempt in %s.", msg, wait)
}
