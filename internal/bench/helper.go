package bench

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// helperArg is the hidden first argument that makes tpbench run as one of its
// baseline servers in a separate process, so that its CPU and memory are its own.
const helperArg = "__helper"

// IsHelper reports whether args ask for a helper role.
func IsHelper(args []string) bool { return len(args) > 0 && args[0] == helperArg }

// RunHelper runs a baseline server until ctx ends. It prints "ADDR host:port" once listening.
//
//	relay-server: TLS 1.3, verified client certificate, then io.Copy both ways to -target
//	relay-client: plain TCP listener, each connection dialled to -server over mTLS
//	tls-echo:     TLS 1.3, verified client certificate, echoes bytes (handshake baseline)
//	quic-relay-server, quic-relay-client: raw quic-go, TP's QUIC baseline (quicrelay.go)
//	ssh-relay-server, ssh-relay-client: ssh -L in Go (golang.org/x/crypto/ssh), sshrelay.go
//	loss-server, loss-client: scenario 6, run inside its network namespace (loss.go)
//	idle-echo:    scenario 4's holder of idle tunnels, commanded on stdin (memory.go)
func RunHelper(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) < 2 {
		return errors.New("helper role missing")
	}
	role := args[1]
	if role == "echo" { // scenario concurrency (concurrency.go)
		return runEchoHelper(ctx, stdout)
	}
	if role == "loss-server" || role == "loss-client" {
		return runLossHelper(ctx, role, args[2:], stdout)
	}
	if role == "quic-relay-server" || role == "quic-relay-client" {
		return runQUICRelayHelper(ctx, role, args[2:], stdout) // quicrelay.go
	}
	if role == "ssh-relay-server" || role == "ssh-relay-client" {
		return runSSHRelayHelper(ctx, role, args[2:], stdout) // sshrelay.go
	}
	if role == "idle-echo" {
		return runIdleHelper(ctx, os.Stdin, stdout)
	}
	fs := flag.NewFlagSet(role, flag.ContinueOnError)
	certFile := fs.String("cert", "", "certificate chain PEM")
	keyFile := fs.String("key", "", "key PEM")
	clientCA := fs.String("client-ca", "", "CA that signs client certificates")
	rootFile := fs.String("root", "", "CA that signs the server's certificate")
	target := fs.String("target", "", "relay-server: destination host:port")
	server := fs.String("server", "", "relay-client: relay-server host:port")
	if err := fs.Parse(args[2:]); err != nil {
		return err
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	var handle func(net.Conn)
	switch role {
	case "relay-server", "tls-echo":
		pool, err := loadPool(*clientCA)
		if err != nil {
			return err
		}
		cfg := &tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{cert},
			ClientCAs:    pool,
			ClientAuth:   tls.RequireAndVerifyClientCert,
		}
		ln = tls.NewListener(ln, cfg)
		if role == "tls-echo" {
			handle = echoHandler
		} else {
			handle = func(c net.Conn) {
				hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				err := c.(*tls.Conn).HandshakeContext(hctx)
				cancel()
				if err != nil {
					return
				}
				dst, err := net.DialTimeout("tcp", *target, 10*time.Second)
				if err != nil {
					return
				}
				defer dst.Close()
				relay(c, dst)
			}
		}
	case "relay-client":
		pool, err := loadPool(*rootFile)
		if err != nil {
			return err
		}
		cfg := &tls.Config{
			MinVersion:         tls.VersionTLS13,
			Certificates:       []tls.Certificate{cert},
			RootCAs:            pool,
			ServerName:         "127.0.0.1",
			ClientSessionCache: tls.NewLRUClientSessionCache(16),
		}
		handle = func(c net.Conn) {
			dst, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", *server, cfg)
			if err != nil {
				return
			}
			defer dst.Close()
			relay(c, dst)
		}
	default:
		return fmt.Errorf("unknown helper role %q", role)
	}
	fmt.Fprintf(stdout, "ADDR %s\n", ln.Addr())
	stop := serve(ln, handle)
	<-ctx.Done()
	stop()
	return nil
}

// relay is the minimal copy loop: io.Copy each way, half-close when one ends.
func relay(a, b net.Conn) {
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		io.Copy(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
		done <- struct{}{}
	}
	go cp(a, b)
	go cp(b, a)
	<-done
	<-done
}

func loadPool(file string) (*x509.CertPool, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s holds no certificate", file)
	}
	return pool, nil
}

// benchCA mints the baselines' server certificate: root → intermediate → leaf,
// ECDSA P-256, the same shape as tpd's own (leaf and intermediate are sent).
type benchCA struct {
	rootFile, certFile, keyFile string
	roots                       *x509.CertPool
}

func newBenchCA(dir string) (*benchCA, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	now := time.Now()
	mk := func(tmpl, parent *x509.Certificate, pub, signer any) (*x509.Certificate, error) {
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
		if err != nil {
			return nil, err
		}
		return x509.ParseCertificate(der)
	}
	rootKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	interKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := func(serial int64, cn string) *x509.Certificate {
		return &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
		}
	}
	rootTmpl := caTmpl(1, "tpbench root")
	root, err := mk(rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	if err != nil {
		return nil, err
	}
	inter, err := mk(caTmpl(2, "tpbench intermediate"), root, &interKey.PublicKey, rootKey)
	if err != nil {
		return nil, err
	}
	leaf, err := mk(&x509.Certificate{
		SerialNumber: big.NewInt(3), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
	}, inter, &leafKey.PublicKey, interKey)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(leafKey)
	if err != nil {
		return nil, err
	}
	pemCert := func(c *x509.Certificate) []byte {
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	ca := &benchCA{
		rootFile: filepath.Join(dir, "root.pem"),
		certFile: filepath.Join(dir, "server.pem"),
		keyFile:  filepath.Join(dir, "server.key"),
		roots:    x509.NewCertPool(),
	}
	ca.roots.AddCert(root)
	if err := errors.Join(
		os.WriteFile(ca.rootFile, pemCert(root), 0o644),
		os.WriteFile(ca.certFile, append(pemCert(leaf), pemCert(inter)...), 0o644),
		os.WriteFile(ca.keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600),
	); err != nil {
		return nil, err
	}
	return ca, nil
}
