package proxy_test

import (
	"context"
	"io"
	"net"
	"testing"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

const benchChunk = 1 << 20

// startSink runs a loopback TCP server that discards everything and reports the
// byte count of each connection when it ends.
func startSink(b *testing.B) (string, <-chan int64) {
	b.Helper()
	counts := make(chan int64, 16)
	addr := testnet.Serve(b, func(c *net.TCPConn) {
		n, _ := io.Copy(io.Discard, c)
		c.Close()
		counts <- n
	})
	return addr, counts
}

func benchThroughput(b *testing.B, c net.Conn, counts <-chan int64) {
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	for b.Loop() {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		b.Fatal(err)
	}
	<-counts // the sink has everything
	c.Close()
}

func BenchmarkThroughputDirect(b *testing.B) {
	addr, counts := startSink(b)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	benchThroughput(b, c, counts)
}

func BenchmarkThroughputTLSProxy(b *testing.B) {
	e := newEnv(b, nil)
	addr, counts := startSink(b)
	c, err := e.dialer().DialContext(context.Background(), "tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	benchThroughput(b, c, counts)
}

func oneByteEachWay(b *testing.B, c net.Conn) {
	var buf [1]byte
	if _, err := c.Write([]byte{'x'}); err != nil {
		b.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf[:]); err != nil {
		b.Fatal(err)
	}
	c.Close()
}

func BenchmarkNewConnDirect(b *testing.B) {
	echo := testnet.Echo(b)
	for b.Loop() {
		c, err := net.Dial("tcp", echo)
		if err != nil {
			b.Fatal(err)
		}
		oneByteEachWay(b, c)
	}
}

func BenchmarkNewConnProxy(b *testing.B) {
	e := newEnv(b, nil)
	d := e.dialer()
	for b.Loop() {
		c, err := d.DialContext(context.Background(), "tcp", e.echo)
		if err != nil {
			b.Fatal(err)
		}
		oneByteEachWay(b, c)
	}
}

// startSource runs a loopback TCP server that writes to each connection until
// the connection fails.
func startSource(b *testing.B) string {
	b.Helper()
	return testnet.Serve(b, func(c *net.TCPConn) {
		buf := make([]byte, benchChunk)
		for {
			if _, err := c.Write(buf); err != nil {
				c.Close()
				return
			}
		}
	})
}

// benchDownload reads benchChunk bytes from c per iteration.
func benchDownload(b *testing.B, c net.Conn) {
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	for b.Loop() {
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
	}
	c.Close()
}
