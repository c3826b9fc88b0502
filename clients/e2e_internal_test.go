package clients

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

// countingConn counts the Writes that reach a connection.
type countingConn struct {
	net.Conn
	writes atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// batchedPair is a TLS 1.3 session over a loopback TCP connection whose client
// writes through a transport.BatchConn; the server side is returned for reading.
func batchedPair(t *testing.T) (*transport.BatchedTLS, *countingConn, *tls.Conn) {
	t.Helper()
	ca := testpki.New(t)
	cert := ca.ServerCert(t, "agent.rev.test")
	raw, accepted := testnet.Pair(t)
	srv := tls.Server(accepted, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})
	counted := &countingConn{Conn: raw}
	batch := &transport.BatchConn{Conn: counted}
	cli := tls.Client(batch, &tls.Config{RootCAs: ca.Pool, ServerName: "agent.rev.test", MinVersion: tls.VersionTLS13})
	errc := make(chan error, 1)
	go func() { errc <- srv.Handshake() }()
	if err := cli.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close(); srv.Close() })
	return &transport.BatchedTLS{Conn: cli, Batch: batch}, counted, srv
}

// One Write of the inner session reaches the stream as one Write, not one per
// record; the data arrives intact.
func TestBatchedTLSOneWritePerBatch(t *testing.T) {
	t.Parallel()
	c, counted, srv := batchedPair(t)
	data := bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB: four full records
	got := make(chan []byte, 1)
	go func() {
		b := make([]byte, len(data))
		_, _ = io.ReadFull(srv, b)
		got <- b
	}()
	before := counted.writes.Load()
	if _, err := c.Write(data); err != nil {
		t.Fatal(err)
	}
	if n := counted.writes.Load() - before; n != 1 {
		t.Fatalf("a 64 KiB write reached the stream in %d writes; want 1", n)
	}
	if !bytes.Equal(<-got, data) {
		t.Fatal("data changed on the way")
	}
	// A large write is cut into batches of at most transport.MaxBatch bytes.
	big := bytes.Repeat([]byte{7}, 1<<20)
	go func() { _, _ = io.CopyN(io.Discard, srv, int64(len(big))) }()
	before = counted.writes.Load()
	if _, err := c.Write(big); err != nil {
		t.Fatal(err)
	}
	if n := counted.writes.Load() - before; n > int64(len(big)/(16<<10)/4+1) {
		t.Fatalf("a 1 MiB write reached the stream in %d writes", n)
	}
}

// Concurrent Writes and a close_notify keep records in order: a record out of
// order fails the reader's decryption.
func TestBatchedTLSConcurrentWritesKeepOrder(t *testing.T) {
	t.Parallel()
	c, _, srv := batchedPair(t)
	const writers, each = 4, 300 << 10
	var wg sync.WaitGroup
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			chunk := bytes.Repeat([]byte{byte(i)}, 20<<10)
			for sent := 0; sent < each; sent += len(chunk) {
				if _, err := c.Write(chunk); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	done := make(chan error, 1)
	go func() {
		n, err := io.Copy(io.Discard, srv)
		if err == nil && n != writers*int64((each+(20<<10)-1)/(20<<10)*(20<<10)) {
			err = errors.New("short read")
		}
		done <- err
	}()
	wg.Wait()
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("reader: %v", err)
	}
}
