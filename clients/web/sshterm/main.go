//go:build js && wasm

// Command sshterm is the SSH client of TP.js's terminal page (ssh.html),
// compiled to WebAssembly (deploy/build-web.sh): it runs SSH over a TP.js
// connection, inside TLS with the exposing agent when the name is protected
// (docs/PROTOCOL.md 11.4), so that the SSH session and the keys stay in the
// browser and on the exposed machine. Both keys are WebCrypto keys the page
// holds and never exports: the page signs for it.
//
// It sets globalThis.tpSSH(options), which returns a promise of
// {write(bytes), resize(cols, rows), close()}; tp.d.ts describes options.
package main

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"sync"
	"syscall/js"
	"time"

	"golang.org/x/crypto/ssh"
)

func main() {
	js.Global().Set("tpSSH", js.FuncOf(func(_ js.Value, args []js.Value) any {
		if len(args) != 1 {
			return reject(errors.New("tpSSH takes one options object"))
		}
		opts := args[0]
		return promise(func() (any, error) { return start(opts) })
	}))
	select {}
}

// promise runs f on a goroutine of its own and returns a JavaScript promise
// of its result.
func promise(f func() (any, error)) js.Value {
	var handler js.Func
	handler = js.FuncOf(func(_ js.Value, args []js.Value) any {
		resolve, rejectFn := args[0], args[1]
		go func() {
			defer handler.Release()
			v, err := f()
			if err != nil {
				rejectFn.Invoke(js.Global().Get("Error").New(err.Error()))
				return
			}
			resolve.Invoke(v)
		}()
		return nil
	})
	return js.Global().Get("Promise").New(handler)
}

func reject(err error) js.Value {
	return js.Global().Get("Promise").Call("reject", js.Global().Get("Error").New(err.Error()))
}

// await waits for a JavaScript promise; it must not run on the event loop's
// own goroutine (a callback's), as Go's wasm port runs others while it waits.
func await(p js.Value) (js.Value, error) {
	type result struct {
		v   js.Value
		err error
	}
	ch := make(chan result, 1)
	var then, catch js.Func
	then = js.FuncOf(func(_ js.Value, args []js.Value) any {
		ch <- result{v: arg0(args)}
		return nil
	})
	catch = js.FuncOf(func(_ js.Value, args []js.Value) any {
		e := arg0(args)
		msg := "rejected"
		if e.Truthy() {
			msg = e.Call("toString").String()
		}
		ch <- result{err: errors.New(msg)}
		return nil
	})
	p.Call("then", then, catch)
	r := <-ch
	then.Release()
	catch.Release()
	return r.v, r.err
}

func arg0(args []js.Value) js.Value {
	if len(args) == 0 {
		return js.Undefined()
	}
	return args[0]
}

func bytesOf(v js.Value) []byte {
	b := make([]byte, v.Get("length").Int())
	js.CopyBytesToGo(b, v)
	return b
}

func uint8Array(b []byte) js.Value {
	a := js.Global().Get("Uint8Array").New(len(b))
	js.CopyBytesToJS(a, b)
	return a
}

// streamConn is a TP.js connection's WHATWG streams as a net.Conn.
type streamConn struct {
	r, w js.Value // the default reader and writer
	buf  []byte
	once sync.Once
}

func (c *streamConn) Read(p []byte) (int, error) {
	for len(c.buf) == 0 {
		v, err := await(c.r.Call("read"))
		if err != nil {
			return 0, fmt.Errorf("the connection through TP was cut: %v", err)
		}
		if v.Get("done").Bool() {
			return 0, io.EOF
		}
		c.buf = bytesOf(v.Get("value"))
	}
	n := copy(p, c.buf)
	c.buf = c.buf[n:]
	return n, nil
}

func (c *streamConn) Write(p []byte) (int, error) {
	if _, err := await(c.w.Call("write", uint8Array(p))); err != nil {
		return 0, fmt.Errorf("the connection through TP was cut: %v", err)
	}
	return len(p), nil
}

func (c *streamConn) Close() error {
	c.once.Do(func() {
		c.w.Call("close").Call("catch", js.FuncOf(func(js.Value, []js.Value) any { return nil }))
		c.r.Call("cancel").Call("catch", js.FuncOf(func(js.Value, []js.Value) any { return nil }))
	})
	return nil
}

type addr string

func (a addr) Network() string { return "tp" }
func (a addr) String() string  { return string(a) }

func (c *streamConn) LocalAddr() net.Addr              { return addr("browser") }
func (c *streamConn) RemoteAddr() net.Addr             { return addr("tp") }
func (c *streamConn) SetDeadline(time.Time) error      { return nil }
func (c *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (c *streamConn) SetWriteDeadline(time.Time) error { return nil }

// webKey is a WebCrypto ECDSA P-256 key: the page signs a message with it
// (sign(bytes) → r||s); TLS 1.3 hands it the message (crypto.MessageSigner).
type webKey struct {
	pub  *ecdsa.PublicKey
	sign js.Value
}

func (k webKey) Public() crypto.PublicKey { return k.pub }

func (k webKey) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) {
	return nil, errors.New("a WebCrypto key signs messages, not digests")
}

func (k webKey) SignMessage(_ io.Reader, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	if opts.HashFunc() != crypto.SHA256 {
		return nil, fmt.Errorf("a P-256 WebCrypto key signs with SHA-256, not %v", opts.HashFunc())
	}
	r, s, err := k.rs(msg)
	if err != nil {
		return nil, err
	}
	return asn1.Marshal(struct{ R, S *big.Int }{r, s})
}

func (k webKey) rs(msg []byte) (*big.Int, *big.Int, error) {
	v, err := await(k.sign.Invoke(uint8Array(msg)))
	if err != nil {
		return nil, nil, fmt.Errorf("the page did not sign: %v", err)
	}
	sig := bytesOf(v)
	if len(sig) != 64 {
		return nil, nil, fmt.Errorf("the page's signature is %d bytes, not r||s of P-256", len(sig))
	}
	return new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:]), nil
}

// sshKey is a webKey as an SSH signer (ecdsa-sha2-nistp256).
type sshKey struct {
	webKey
	pk ssh.PublicKey
}

func (k sshKey) PublicKey() ssh.PublicKey { return k.pk }

func (k sshKey) Sign(_ io.Reader, data []byte) (*ssh.Signature, error) {
	r, s, err := k.rs(data)
	if err != nil {
		return nil, err
	}
	return &ssh.Signature{Format: ssh.KeyAlgoECDSA256, Blob: ssh.Marshal(struct{ R, S *big.Int }{r, s})}, nil
}

func p256(spki []byte) (*ecdsa.PublicKey, error) {
	k, err := x509.ParsePKIXPublicKey(spki)
	if err != nil {
		return nil, err
	}
	pub, ok := k.(*ecdsa.PublicKey)
	if !ok {
		return nil, errors.New("not an ECDSA key")
	}
	return pub, nil
}

// start opens the SSH session the options describe.
func start(o js.Value) (any, error) {
	conn := o.Get("conn")
	sc := &streamConn{r: conn.Get("readable").Call("getReader"), w: conn.Get("writable").Call("getWriter")}
	var c net.Conn = sc
	if conn.Get("hello").Get("e2e").Truthy() {
		tc, err := endToEnd(sc, o.Get("tls"))
		if err != nil {
			sc.Close()
			return nil, err
		}
		c = tc
	}
	spki := bytesOf(o.Get("sshPublicKey"))
	pub, err := p256(spki)
	if err != nil {
		return nil, fmt.Errorf("the SSH key: %v", err)
	}
	pk, err := ssh.NewPublicKey(pub)
	if err != nil {
		return nil, err
	}
	signer := sshKey{webKey: webKey{pub: pub, sign: o.Get("sshSign")}, pk: pk}
	onHostKey := o.Get("onHostKey")
	cfg := &ssh.ClientConfig{
		User: o.Get("user").String(),
		Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: func(_ string, _ net.Addr, key ssh.PublicKey) error {
			if onHostKey.Type() != js.TypeFunction {
				return errors.New("the page checks no host key (onHostKey): refusing " + ssh.FingerprintSHA256(key))
			}
			v, err := await(js.Global().Get("Promise").Call("resolve", onHostKey.Invoke(ssh.FingerprintSHA256(key))))
			if err != nil {
				return err
			}
			if !v.Truthy() {
				return errors.New("the page refused the server's host key " + ssh.FingerprintSHA256(key))
			}
			return nil
		},
		Timeout: 30 * time.Second,
	}
	cc, chans, reqs, err := ssh.NewClientConn(c, o.Get("host").String(), cfg)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("ssh: %v", err)
	}
	client := ssh.NewClient(cc, chans, reqs)
	sess, err := client.NewSession()
	if err != nil {
		client.Close()
		return nil, fmt.Errorf("ssh: %v", err)
	}
	cols, rows := o.Get("cols").Int(), o.Get("rows").Int()
	if err := sess.RequestPty("xterm-256color", rows, cols, ssh.TerminalModes{ssh.ECHO: 1}); err != nil {
		client.Close()
		return nil, fmt.Errorf("ssh: no terminal: %v", err)
	}
	stdin, err := sess.StdinPipe()
	if err != nil {
		client.Close()
		return nil, err
	}
	onData, onClose := o.Get("onData"), o.Get("onClose")
	out := &jsWriter{f: onData}
	sess.Stdout, sess.Stderr = out, out
	if cmd := o.Get("command"); cmd.Truthy() {
		err = sess.Start(cmd.String())
	} else {
		err = sess.Shell()
	}
	if err != nil {
		client.Close()
		return nil, fmt.Errorf("ssh: %v", err)
	}
	go func() {
		err := sess.Wait()
		client.Close()
		why := "the SSH session ended"
		var ee *ssh.ExitError
		switch {
		case errors.As(err, &ee):
			why = fmt.Sprintf("the SSH session ended with status %d", ee.ExitStatus())
		case err != nil:
			why = "the SSH session was cut: " + err.Error()
		}
		if onClose.Type() == js.TypeFunction {
			onClose.Invoke(why)
		}
	}()
	// One writer, in order: keystrokes reach the session as typed. The page
	// cannot wait (its callback would block the event loop), so what it
	// hands over queues here until the session takes it.
	var qmu sync.Mutex
	var queue [][]byte
	wake := make(chan struct{}, 1)
	go func() {
		for range wake {
			qmu.Lock()
			batch := queue
			queue = nil
			qmu.Unlock()
			for _, b := range batch {
				if _, err := stdin.Write(b); err != nil {
					return
				}
			}
		}
	}()
	h := js.Global().Get("Object").New()
	h.Set("write", js.FuncOf(func(_ js.Value, args []js.Value) any {
		qmu.Lock()
		queue = append(queue, bytesOf(arg0(args)))
		qmu.Unlock()
		select {
		case wake <- struct{}{}:
		default: // the writer is awake already
		}
		return nil
	}))
	h.Set("resize", js.FuncOf(func(_ js.Value, args []js.Value) any {
		if len(args) == 2 {
			go func() { _ = sess.WindowChange(args[1].Int(), args[0].Int()) }()
		}
		return nil
	}))
	h.Set("close", js.FuncOf(func(js.Value, []js.Value) any {
		go client.Close()
		return nil
	}))
	return h, nil
}

// jsWriter hands what the session prints to the page.
type jsWriter struct{ f js.Value }

func (w *jsWriter) Write(p []byte) (int, error) {
	if w.f.Type() == js.TypeFunction {
		w.f.Invoke(uint8Array(p))
	}
	return len(p), nil
}

// endToEnd runs TLS with the agent inside the connection (PROTOCOL.md
// 11.4): the agent's certificate for the name checked against TP's root,
// the browser's device certificate presented, then the agent's hello.
func endToEnd(c net.Conn, o js.Value) (net.Conn, error) {
	if !o.Truthy() {
		return nil, errors.New("the name is protected (end to end) and the page gave no TLS options")
	}
	roots := x509.NewCertPool()
	root, err := x509.ParseCertificate(bytesOf(o.Get("root")))
	if err != nil {
		return nil, fmt.Errorf("TP's root certificate: %v", err)
	}
	roots.AddCert(root)
	var chain [][]byte
	for i, n := 0, o.Get("chain").Length(); i < n; i++ {
		chain = append(chain, bytesOf(o.Get("chain").Index(i)))
	}
	if len(chain) == 0 {
		return nil, errors.New("no device certificate for the end-to-end session")
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return nil, err
	}
	pub, ok := leaf.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return nil, errors.New("the device certificate's key is not ECDSA")
	}
	tc := tls.Client(c, &tls.Config{
		ServerName: o.Get("serverName").String(),
		RootCAs:    roots,
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{"tp-e2e/1"},
		Certificates: []tls.Certificate{{Certificate: chain, Leaf: leaf,
			PrivateKey: webKey{pub: pub, sign: o.Get("sign")}}},
	})
	if err := tc.Handshake(); err != nil {
		return nil, fmt.Errorf("the end-to-end TLS session with the agent failed: %v", err)
	}
	var n [2]byte
	if _, err := io.ReadFull(tc, n[:]); err != nil {
		return nil, fmt.Errorf("the agent sent no hello: %v", err)
	}
	body := make([]byte, binary.BigEndian.Uint16(n[:]))
	if _, err := io.ReadFull(tc, body); err != nil {
		return nil, fmt.Errorf("the agent's hello was cut: %v", err)
	}
	var h struct {
		OK           bool
		Code, Reason string
	}
	if err := json.NewDecoder(bytes.NewReader(body)).Decode(&h); err != nil {
		return nil, fmt.Errorf("the agent's hello cannot be read: %v", err)
	}
	if !h.OK {
		return nil, fmt.Errorf("%s: %s", h.Code, h.Reason)
	}
	return tc, nil
}
