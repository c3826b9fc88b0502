package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
)

// FuzzCarrierFrames: any bytes a peer sends on a tls carrier (or in an http
// carrier body). ReadCarrierFrame yields only packets of 1 to
// MaxCarrierPacket octets, exactly the ones the framing holds, in order, and
// stops at the first frame whose length is 0 or beyond the bound (an error
// that says so, ErrCarrierFrame) or that is cut short (io.ErrUnexpectedEOF);
// written again with WriteCarrierFrame, the packets it read are the bytes
// it consumed. It never reads more than MaxCarrierPacket+2 octets per packet.
func FuzzCarrierFrames(f *testing.F) {
	f.Add([]byte{0, 3, 'a', 'b', 'c', 0, 1, 'd'})
	f.Add([]byte{0, 0})                                      // length 0
	f.Add([]byte{0x05, 0xdd, 1})                             // 1501: beyond the bound
	f.Add([]byte{0, 5, 'a'})                                 // cut short
	f.Add([]byte{0})                                         // a header cut short
	f.Add(append([]byte{0x05, 0xdc}, make([]byte, 1500)...)) // exactly the bound
	f.Fuzz(func(t *testing.T, raw []byte) {
		r := bytes.NewReader(raw)
		var rewritten bytes.Buffer
		b := make([]byte, MaxCarrierPacket)
		wbuf := make([]byte, MaxCarrierPacket+2)
		for {
			before := r.Len()
			n, err := ReadCarrierFrame(r, b)
			if err != nil {
				consumed := raw[:len(raw)-r.Len()]
				if !bytes.HasPrefix(consumed, rewritten.Bytes()) {
					t.Fatalf("the packets read do not frame back to the bytes consumed")
				}
				rest := raw[rewritten.Len():]
				switch {
				case errors.Is(err, io.EOF):
					if len(rest) != 0 {
						t.Fatalf("EOF with %d octets left", len(rest))
					}
				case errors.Is(err, io.ErrUnexpectedEOF):
					if len(rest) >= 2 && int(binary.BigEndian.Uint16(rest)) <= len(rest)-2 {
						t.Fatalf("a whole frame %x reported cut short", rest)
					}
				case errors.Is(err, ErrCarrierFrame):
					if l := int(binary.BigEndian.Uint16(rest)); l != 0 && l <= MaxCarrierPacket {
						t.Fatalf("a frame of length %d refused: %v", l, err)
					}
				default:
					t.Fatalf("unexpected error %v", err)
				}
				return
			}
			if n < 1 || n > MaxCarrierPacket || before-r.Len() != n+2 {
				t.Fatalf("a packet of %d octets from %d consumed", n, before-r.Len())
			}
			if err := WriteCarrierFrame(&rewritten, b[:n], wbuf); err != nil {
				t.Fatal(err)
			}
		}
	})
}
