package bench

import (
	"encoding/binary"
	"io"
	"net"
	"sync"
)

// Sink protocol: on accept the sink writes one byte ('R', the tunnel is up), then
// reads until EOF and answers with the byte count it received as 8 bytes big
// endian. The sender stops its clock when that count arrives, so a variant is
// measured only when every byte reached the destination.
const sinkReady = 'R'

// serve accepts on ln until it is closed, running handle in a goroutine per connection.
func serve(ln net.Listener, handle func(net.Conn)) func() {
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]struct{}{}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				handle(c)
				c.Close()
				mu.Lock()
				delete(conns, c)
				mu.Unlock()
			}()
		}
	}()
	return func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	}
}

func sinkHandler(c net.Conn) {
	if _, err := c.Write([]byte{sinkReady}); err != nil {
		return
	}
	buf := make([]byte, 256<<10)
	var n int64
	for {
		k, err := c.Read(buf)
		n += int64(k)
		if err == io.EOF {
			break
		}
		if err != nil {
			return
		}
	}
	var ack [8]byte
	binary.BigEndian.PutUint64(ack[:], uint64(n))
	c.Write(ack[:])
}

// The counted sink is the sink for a tunnel that cannot pass a half-close
// (chisel ends both directions when one ends): after its ready byte it reads the
// byte count as 8 bytes big endian, then that many bytes, and answers with the
// count it received, as the sink does.
func countedSinkHandler(c net.Conn) {
	if _, err := c.Write([]byte{sinkReady}); err != nil {
		return
	}
	var hdr [8]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return
	}
	want := int64(binary.BigEndian.Uint64(hdr[:]))
	n, _ := io.CopyBuffer(io.Discard, io.LimitReader(c, want), make([]byte, 256<<10))
	var ack [8]byte
	binary.BigEndian.PutUint64(ack[:], uint64(n))
	c.Write(ack[:])
}

func echoHandler(c net.Conn) {
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
