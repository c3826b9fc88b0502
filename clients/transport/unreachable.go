package transport

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/proxy/wire"
)

// UnreachableError is a connection to the TP server that could not be made:
// every transport and carrier tried failed. Its message is one sentence for a
// person, the server and the most telling of the attempts' causes ("nothing
// listens there", "no answer within 30s", "it refused this device's
// certificate"); the attempts' own errors, joined, are Err, for a debug log.
type UnreachableError struct {
	Server string // host:port of the TP server
	Cause  string // the most telling cause, for a person
	Err    error  // every attempt's error
}

func (e *UnreachableError) Error() string {
	return "cannot reach the TP server at " + e.Server + ": " + e.Cause
}

func (e *UnreachableError) Unwrap() error { return e.Err }

// ErrCertificateRejected matches a TLS session the server ended with an alert
// during the handshake: the client certificate was refused. The alert does not
// say why; clients.Client.WhyRejected asks the server.
var ErrCertificateRejected = errors.New("the server rejected the client certificate")

// RejectedError is a TLS session the server ended with an alert during the
// handshake (ErrCertificateRejected); Err is the handshake's error.
type RejectedError struct{ Err error }

func (e *RejectedError) Error() string {
	return "the server rejected the TLS session, most likely the client certificate (expired, from another CA or not for client authentication: dlogin gets a new one; revoked: ask your TP administrator; tp whoami asks the server which): " + e.Err.Error()
}
func (e *RejectedError) Unwrap() error        { return e.Err }
func (e *RejectedError) Is(target error) bool { return target == ErrCertificateRejected }

// ClosedUnanswered reports whether a handshake failed because the server closed
// the connection without a TLS alert: refused at accept, not rejected.
func ClosedUnanswered(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)
}

// ReachCause is the most telling of the causes joined in err, the failures of
// the attempts to connect to the server: an answer from the server (it refused
// the certificate, it is stopping) before a refusal of the TCP connection
// (nothing listens), that before silence (a timeout), which is also what an
// attempt over UDP meets when nothing listens. timeout is the bound of an
// attempt; udpOnly says that no attempt went over TCP; expired is what to do
// about an expired client certificate (the caller knows whether it can be
// renewed).
func ReachCause(err error, timeout time.Duration, udpOnly bool, expired string) string {
	var ae *quic.ApplicationError
	var te *quic.TransportError
	var verify *tls.CertificateVerificationError
	var unknownCA x509.UnknownAuthorityError
	var wrongName x509.HostnameError
	var dnsErr *net.DNSError
	var connect *login.ConnectError
	remoteApp := func(code quic.ApplicationErrorCode) bool {
		return errors.As(err, &ae) && ae.Remote && ae.ErrorCode == code
	}
	switch {
	case errors.Is(err, ErrCertificateRejected):
		return "it refused this device's certificate (tp whoami asks it why; dlogin gets a new certificate, unless the device was revoked)"
	case remoteApp(wire.QUICCertExpired):
		return "it refused the expired client certificate (" + expired + ")"
	case errors.As(err, &verify), errors.As(err, &unknownCA), errors.As(err, &wrongName):
		return fmt.Sprintf("its certificate is not one this device trusts for it (%s): is this the TP server, or was it set up anew (then enroll again with dlogin)?", certProblem(err))
	case remoteApp(wire.QUICShutdown):
		return "it is shutting down or restarting"
	case remoteApp(wire.QUICRefused):
		return "it is busy and refused the connection"
	case errors.As(err, &te) && te.Remote && te.ErrorCode == quic.ConnectionRefused:
		return "it refused the connection (it is stopping, or has too many handshakes under way)"
	case errors.As(err, &connect):
		// The first bytes of the answer were not TLS, or the port hung up:
		// said as dlogin says it.
		if cause, ok := strings.CutPrefix(connect.Reason, "cannot reach the TP server at "+connect.Addr+": "); ok {
			return cause
		}
		return connect.Reason
	case errors.Is(err, syscall.ECONNREFUSED):
		return "nothing listens there (TCP connection refused); is tpd running, and is this its address?"
	case errors.As(err, &dnsErr):
		return "its name does not resolve (" + dnsErr.Error() + ")"
	case errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EHOSTUNREACH):
		return "this network has no route to it"
	case ClosedUnanswered(err) && !udpOnly:
		return "it closed the connection without answering (too many handshakes from this address, or something in between that is not the TP server)"
	case timedOut(err) && udpOnly:
		return fmt.Sprintf("no answer over UDP within %s: is tpd running there, and does this network let UDP through (--transport tls avoids UDP)?", timeout)
	case timedOut(err):
		return fmt.Sprintf("no answer within %s: is it reachable from this network, and is this its address?", timeout)
	}
	return strings.ReplaceAll(err.Error(), "\n", "; ")
}

// certProblem is what crypto/x509 says is wrong with the server's certificate.
func certProblem(err error) string {
	var verify *tls.CertificateVerificationError
	var unknownCA x509.UnknownAuthorityError
	var wrongName x509.HostnameError
	switch {
	case errors.As(err, &verify) && verify.Err != nil:
		return verify.Err.Error()
	case errors.As(err, &unknownCA):
		return unknownCA.Error()
	case errors.As(err, &wrongName):
		return wrongName.Error()
	}
	return "it does not verify"
}

// timedOut reports whether an attempt in err ended because nothing answered
// in time.
func timedOut(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) ||
		errors.As(err, new(*quic.HandshakeTimeoutError)) || errors.As(err, new(*quic.IdleTimeoutError)) ||
		errors.As(err, &ne) && ne.Timeout()
}
