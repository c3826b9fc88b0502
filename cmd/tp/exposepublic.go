package main

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/clients"
)

// publicFlags are tp expose's public-mode flags.
type publicFlags struct {
	port            int
	sni             string
	udp             bool
	tlsCert, tlsKey string
}

func (p *publicFlags) register(cmd *cobra.Command) {
	f := cmd.Flags()
	f.IntVar(&p.port, "public", 0, "public mode: anyone reaches NAME on this TCP (with --udp, UDP) port of the TP server (if its administrator and policy allow the port)")
	f.StringVar(&p.sni, "public-sni", "", "public mode: anyone reaches NAME by TLS to this server name on the TP server's port, TLS not ended at the server")
	f.BoolVar(&p.udp, "udp", false, "LOCAL_ADDR is a UDP service: TP clients reach it with tp forward --udp, and with --public anyone on that UDP port")
	f.StringVar(&p.tlsCert, "tls-cert", "", "with --public-sni or --public: end the public clients' TLS here with this certificate (PEM chain) before LOCAL_ADDR")
	f.StringVar(&p.tlsKey, "tls-key", "", "the private key (PEM) of --tls-cert")
}

func (p *publicFlags) public() bool { return p.port != 0 || p.sni != "" }

// exposed builds the main exposure from NAME, LOCAL_ADDR and the flags.
func (p *publicFlags) exposed(name, local string) (clients.Exposed, error) {
	e := clients.Exposed{Name: name, Local: local, PublicPort: p.port, PublicSNI: p.sni, UDP: p.udp}
	switch {
	case p.udp && p.sni != "":
		return e, errors.New("--udp with --public-sni: a UDP service is exposed on a public port (--public PORT --udp), not by TLS server name")
	case p.udp && p.tlsCert != "":
		return e, errors.New("--tls-cert applies to TCP services; a UDP service gets its datagrams as they are")
	case p.port < 0 || p.port > 65535:
		return e, fmt.Errorf("--public %d must be a port from 1 to 65535", p.port)
	case p.port != 0 && p.sni != "":
		return e, errors.New("use one of --public and --public-sni per name (add another with a second tp expose)")
	case (p.tlsCert != "") != (p.tlsKey != ""):
		return e, errors.New("--tls-cert and --tls-key go together")
	case p.tlsCert != "" && !p.public():
		return e, errors.New("--tls-cert applies to public mode (--public or --public-sni); protected mode uses a certificate from TP's CA")
	}
	if p.tlsCert != "" {
		cert, err := tls.LoadX509KeyPair(p.tlsCert, p.tlsKey)
		if err != nil {
			return e, fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
		e.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	return e, nil
}

// publicLine tells the user where the public reaches e ("" for protected names).
func publicLine(e clients.Exposed, server string) string {
	host, port, _ := net.SplitHostPort(server)
	switch {
	case e.PublicPort != 0 && e.UDP:
		return fmt.Sprintf("Public: anyone reaches UDP %s at UDP %s", e.Local, net.JoinHostPort(host, strconv.Itoa(e.PublicPort)))
	case e.PublicPort != 0:
		return fmt.Sprintf("Public: anyone reaches %s at %s", e.Local, net.JoinHostPort(host, strconv.Itoa(e.PublicPort)))
	case e.PublicSNI != "":
		how := "raw TLS is passed to it"
		if e.TLS != nil {
			how = "TLS ends here, with --tls-cert"
		}
		return fmt.Sprintf("Public: anyone reaches %s by TLS to %s on port %s of the TP server (%s)", e.Local, e.PublicSNI, port, how)
	}
	return ""
}
