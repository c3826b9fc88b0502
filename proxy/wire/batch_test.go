package wire_test

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy/wire"
)

// countingConn counts the Writes that reach the transport.
type countingConn struct {
	net.Conn
	writes atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// tlsOverEOFConn is a TLS 1.3 server connection running on an EOFConn over a
// counted loopback TCP connection, and the client at the other end.
func tlsOverEOFConn(t *testing.T) (server *tls.Conn, eof *wire.EOFConn, counted *countingConn, client *tls.Conn) {
	t.Helper()
	ca := testpki.New(t)
	a, b := testnet.Pair(t)
	counted = &countingConn{Conn: a}
	eof = wire.NewEOFConn(counted)
	server = tls.Server(eof, &tls.Config{Certificates: []tls.Certificate{ca.ServerCert(t, "localhost", "127.0.0.1")}})
	client = tls.Client(b, &tls.Config{RootCAs: ca.Pool, ServerName: "localhost"})
	errs := make(chan error, 1)
	go func() { errs <- client.Handshake() }()
	if err := server.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	return server, eof, counted, client
}

// Batch gathers the records of one large Write (crypto/tls writes one per 16
// KiB) into few writes of the transport, and the peer reads every byte.
func TestEOFConnBatchGathersRecords(t *testing.T) {
	server, eof, counted, client := tlsOverEOFConn(t)
	data := bytes.Repeat([]byte("0123456789abcdef"), 200<<10/16) // 200 KiB: 13 records
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(client, int64(len(data))))
		got <- b
	}()
	before := counted.writes.Load()
	if err := eof.Batch(func() error { _, err := server.Write(data); return err }); err != nil {
		t.Fatal(err)
	}
	if n := counted.writes.Load() - before; n != 1 {
		t.Fatalf("%d transport writes for a 200 KiB batch; want 1 (13 records gathered)", n)
	}
	before = counted.writes.Load()
	if _, err := server.Write(data); err != nil {
		t.Fatal(err)
	}
	if n := counted.writes.Load() - before; n < 13 {
		t.Fatalf("%d transport writes for 200 KiB outside a batch; want one per record (13)", n)
	}
	select {
	case b := <-got:
		if !bytes.Equal(b, data) {
			t.Fatal("the peer read other bytes than the batch's")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the peer did not read the batch")
	}
}

// Writes from other goroutines while batches run (the bad input a batch
// must survive: records made concurrently) never overtake a batch's records:
// the peer's TLS decrypts every record in order and reads every byte.
func TestEOFConnBatchKeepsRecordOrder(t *testing.T) {
	server, eof, _, client := tlsOverEOFConn(t)
	const writers, rounds, size = 4, 50, 40 << 10
	// A reader that fails stops reading: the writers then fail at the deadline.
	_ = server.SetWriteDeadline(time.Now().Add(30 * time.Second))
	_ = client.SetReadDeadline(time.Now().Add(30 * time.Second))
	type result struct {
		n   int64
		err error
	}
	read := make(chan result, 1)
	go func() {
		n, err := io.Copy(io.Discard, io.LimitReader(client, writers*rounds*size))
		read <- result{n, err}
	}()
	var total atomic.Int64
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			chunk := bytes.Repeat([]byte{byte(w)}, size)
			for range rounds {
				var err error
				if w%2 == 0 {
					err = eof.Batch(func() error { _, err := server.Write(chunk); return err })
				} else {
					_, err = server.Write(chunk)
				}
				if err != nil {
					t.Error(err)
					return
				}
				total.Add(size)
			}
		}()
	}
	wg.Wait()
	select {
	case r := <-read: // a record out of order fails the client's decryption
		if r.err != nil || r.n != total.Load() {
			t.Fatalf("the peer read %d of %d bytes, then %v; want all of them, in order", r.n, total.Load(), r.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the peer did not read the %d bytes written", total.Load())
	}
}
