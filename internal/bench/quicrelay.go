package bench

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/proxy/wire"
)

// The raw quic-go relay is the QUIC counterpart of the minimal Go mTLS relay:
// what quic-go itself moves between two processes, with TP's flow-control
// windows and the device's certificate, and nothing of TP's (no hello, no
// policy, no session records). TP over QUIC is measured against it.
//
//	quic-relay-server: QUIC on UDP (-listen, 127.0.0.1:0 by default), verified
//	                   client certificate; each stream is copied both ways to a
//	                   new TCP connection to -target
//	quic-relay-client: plain TCP listener; one QUIC connection to -server, each
//	                   local connection a new stream on it
func runQUICRelayHelper(ctx context.Context, role string, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet(role, flag.ContinueOnError)
	certFile := fs.String("cert", "", "certificate chain PEM")
	keyFile := fs.String("key", "", "key PEM")
	clientCA := fs.String("client-ca", "", "CA that signs client certificates")
	rootFile := fs.String("root", "", "CA that signs the server's certificate")
	target := fs.String("target", "", "quic-relay-server: destination host:port")
	server := fs.String("server", "", "quic-relay-client: quic-relay-server host:port")
	listen := fs.String("listen", "127.0.0.1:0", "quic-relay-server: the UDP address to listen on")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		return err
	}
	qcfg := &quic.Config{
		MaxIdleTimeout:                 time.Minute,
		KeepAlivePeriod:                15 * time.Second,
		MaxIncomingStreams:             10000,
		InitialStreamReceiveWindow:     wire.QUICInitialStreamWindow,
		MaxStreamReceiveWindow:         wire.QUICMaxStreamWindow,
		InitialConnectionReceiveWindow: wire.QUICInitialConnWindow,
		MaxConnectionReceiveWindow:     wire.QUICMaxConnWindow,
	}
	const alpn = "tpbench-raw-quic"
	switch role {
	case "quic-relay-server":
		pool, err := loadPool(*clientCA)
		if err != nil {
			return err
		}
		ln, err := quic.ListenAddr(*listen, &tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{cert},
			ClientCAs:    pool,
			ClientAuth:   tls.RequireAndVerifyClientCert,
			NextProtos:   []string{alpn},
		}, qcfg)
		if err != nil {
			return err
		}
		defer ln.Close()
		fmt.Fprintf(stdout, "ADDR %s\n", ln.Addr())
		for {
			conn, err := ln.Accept(ctx)
			if err != nil {
				return nil // ctx ended
			}
			go func() {
				for {
					str, err := conn.AcceptStream(ctx)
					if err != nil {
						return
					}
					go func() {
						var pre [1]byte // the client's stream opener (below)
						if _, err := io.ReadFull(str, pre[:]); err != nil {
							str.CancelWrite(1)
							return
						}
						dst, err := net.DialTimeout("tcp", *target, 10*time.Second)
						if err != nil {
							str.CancelRead(1)
							str.CancelWrite(1)
							return
						}
						defer dst.Close()
						relayStream(dst, str)
					}()
				}
			}()
		}
	case "quic-relay-client":
		pool, err := loadPool(*rootFile)
		if err != nil {
			return err
		}
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		conn, err := quic.DialAddr(dctx, *server, &tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{cert},
			RootCAs:      pool,
			ServerName:   "127.0.0.1",
			NextProtos:   []string{alpn},
		}, qcfg)
		cancel()
		if err != nil {
			return err
		}
		defer conn.CloseWithError(0, "")
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "ADDR %s\n", ln.Addr())
		stop := serve(ln, func(c net.Conn) {
			str, err := conn.OpenStreamSync(ctx)
			if err != nil {
				return
			}
			// A QUIC peer learns of a stream from its first byte; the destination
			// may speak first (the sink does), so one byte opens it, as TP's hello does.
			if _, err := str.Write([]byte{0}); err != nil {
				return
			}
			relayStream(c, str)
		})
		<-ctx.Done()
		stop()
		return nil
	}
	return errors.New("unknown QUIC relay role " + role)
}

// relayStream copies between a TCP connection and a QUIC stream both ways,
// half-closing each direction when its source ends.
func relayStream(c net.Conn, str *quic.Stream) {
	done := make(chan struct{}, 2)
	go func() {
		_, _ = io.Copy(str, c)
		_ = str.Close() // FIN: the write side only
		done <- struct{}{}
	}()
	go func() {
		_, _ = io.Copy(c, str)
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
		done <- struct{}{}
	}()
	<-done
	<-done
}

// quicRelayChain starts the raw quic-go relay's two halves toward target and
// returns the client half's TCP address.
func (e *Env) quicRelayChain(ctx context.Context, target string) (string, error) {
	ca, err := e.ca()
	if err != nil {
		return "", err
	}
	srvAddr, _, err := e.startHelper(ctx, "quic-relay-server", "-cert", ca.certFile, "-key", ca.keyFile,
		"-client-ca", filepath.Join(e.home, "root.pem"), "-target", target)
	if err != nil {
		return "", err
	}
	cliAddr, _, err := e.startHelper(ctx, "quic-relay-client", "-cert", filepath.Join(e.home, "cert.pem"),
		"-key", filepath.Join(e.home, "key.pem"), "-root", ca.rootFile, "-server", srvAddr)
	return cliAddr, err
}
