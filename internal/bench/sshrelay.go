package bench

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/crypto/ssh"
)

// The Go SSH relay is `ssh -L` written in Go: the same protocol as OpenSSH's
// (a direct-tcpip channel per tunnel on one open SSH connection), run by Go's
// runtime and golang.org/x/crypto/ssh instead of one thread around poll. Beside
// ssh -L in the setup scenario it separates what OpenSSH's design costs a new
// tunnel from what a Go program on this machine costs it; beside TP it is the
// Go floor of a new tunnel on an open connection.
//
//	ssh-relay-server: SSH on TCP; the host key is -key, the one client key it
//	                  accepts the public key of -client-cert; each direct-tcpip
//	                  channel is copied both ways to a new TCP connection to
//	                  -target (whatever the channel asked for)
//	ssh-relay-client: plain TCP listener; one SSH connection to -server (host key:
//	                  -server-cert's public key, client key -key), each local
//	                  connection a new direct-tcpip channel on it
func runSSHRelayHelper(ctx context.Context, role string, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet(role, flag.ContinueOnError)
	keyFile := fs.String("key", "", "private key PEM: the host key (server) or the client key (client)")
	clientCert := fs.String("client-cert", "", "ssh-relay-server: the certificate whose public key may log in")
	serverCert := fs.String("server-cert", "", "ssh-relay-client: the certificate whose public key is the host key")
	target := fs.String("target", "", "ssh-relay-server: destination host:port")
	server := fs.String("server", "", "ssh-relay-client: ssh-relay-server host:port")
	if err := fs.Parse(args); err != nil {
		return err
	}
	keyPEM, err := os.ReadFile(*keyFile)
	if err != nil {
		return err
	}
	key, err := ssh.ParsePrivateKey(keyPEM)
	if err != nil {
		return fmt.Errorf("%s: %w", *keyFile, err)
	}
	switch role {
	case "ssh-relay-server":
		allowed, err := certPublicKey(*clientCert)
		if err != nil {
			return err
		}
		cfg := &ssh.ServerConfig{PublicKeyCallback: func(_ ssh.ConnMetadata, k ssh.PublicKey) (*ssh.Permissions, error) {
			if bytes.Equal(k.Marshal(), allowed.Marshal()) {
				return nil, nil
			}
			return nil, errors.New("unknown key")
		}}
		cfg.AddHostKey(key)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "ADDR %s\n", ln.Addr())
		stop := serve(ln, func(c net.Conn) {
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			conn, chans, reqs, err := ssh.NewServerConn(c, cfg)
			if err != nil {
				return
			}
			_ = c.SetDeadline(time.Time{})
			defer conn.Close()
			go ssh.DiscardRequests(reqs)
			for nc := range chans {
				if nc.ChannelType() != "direct-tcpip" {
					_ = nc.Reject(ssh.UnknownChannelType, "direct-tcpip only")
					continue
				}
				go func() {
					// Like sshd: connect, then confirm the channel.
					dst, err := net.DialTimeout("tcp", *target, 10*time.Second)
					if err != nil {
						_ = nc.Reject(ssh.ConnectionFailed, err.Error())
						return
					}
					defer dst.Close()
					ch, reqs, err := nc.Accept()
					if err != nil {
						return
					}
					go ssh.DiscardRequests(reqs)
					relayChannel(dst, ch)
				}()
			}
		})
		<-ctx.Done()
		stop()
		return nil
	case "ssh-relay-client":
		hostKey, err := certPublicKey(*serverCert)
		if err != nil {
			return err
		}
		client, err := ssh.Dial("tcp", *server, &ssh.ClientConfig{
			User:            "tpbench",
			Auth:            []ssh.AuthMethod{ssh.PublicKeys(key)},
			HostKeyCallback: ssh.FixedHostKey(hostKey),
			Timeout:         10 * time.Second,
		})
		if err != nil {
			return err
		}
		defer client.Close()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "ADDR %s\n", ln.Addr())
		stop := serve(ln, func(c net.Conn) {
			dst, err := client.DialContext(ctx, "tcp", *target)
			if err != nil {
				return
			}
			defer dst.Close()
			relay(c, dst)
		})
		<-ctx.Done()
		stop()
		return nil
	}
	return errors.New("unknown SSH relay role " + role)
}

// relayChannel copies between a TCP connection and an SSH channel both ways,
// half-closing each direction when its source ends.
func relayChannel(c net.Conn, ch ssh.Channel) {
	done := make(chan struct{}, 2)
	go func() {
		_, _ = io.Copy(ch, c)
		_ = ch.CloseWrite()
		done <- struct{}{}
	}()
	go func() {
		_, _ = io.Copy(c, ch)
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
		done <- struct{}{}
	}()
	<-done
	<-done
	_ = ch.Close()
}

// certPublicKey is the SSH form of the public key of the (first) certificate
// in the PEM file.
func certPublicKey(file string) (ssh.PublicKey, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s: no PEM certificate", file)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return ssh.NewPublicKey(cert.PublicKey)
}

// sshRelayChain starts the Go SSH relay's two halves toward target and returns
// the client half's TCP address. The server's host key is the bench CA's server
// key; the client logs in with the device's key (the one in TP's home).
func (e *Env) sshRelayChain(ctx context.Context, target string) (string, error) {
	ca, err := e.ca()
	if err != nil {
		return "", err
	}
	srvAddr, _, err := e.startHelper(ctx, "ssh-relay-server", "-key", ca.keyFile,
		"-client-cert", filepath.Join(e.home, "cert.pem"), "-target", target)
	if err != nil {
		return "", err
	}
	cliAddr, _, err := e.startHelper(ctx, "ssh-relay-client", "-key", filepath.Join(e.home, "key.pem"),
		"-server-cert", ca.certFile, "-server", srvAddr, "-target", target)
	return cliAddr, err
}
