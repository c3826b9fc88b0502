package tun

import (
	"errors"
	"fmt"
	"sync"
)

// WriteBatchSize is how many packets a Writer gathers for one WriteBatch:
// up to 32 packets of a TCP flow become one segment the kernel takes in one
// system call.
const WriteBatchSize = 32

// Writer gathers packets for the device's WriteBatch. Its buffers come from
// a pool shared by all devices between the first Add and Flush, so an idle
// tunnel holds none: a batch's buffers must each have room for the whole
// batch's data, as the flow's first packet becomes the segment (about
// 1.3 MB per batch at an MTU of 1280).
type Writer struct {
	dev    *Device
	slot   int // bytes per buffer: Headroom and a whole batch of packets
	b      *writeBatch
	bufs   [][]byte
	counts WriteCounts // since the last TakeCounts
}

// WriteCounts are the packets a Writer wrote (the kernel took them) and
// those the kernel refused, each packet counted once, also when it went in a
// segment joined with others.
type WriteCounts struct {
	Packets, Bytes, Refused int64
}

// TakeCounts returns what was written and refused since the last call.
func (w *Writer) TakeCounts() WriteCounts {
	c := w.counts
	w.counts = WriteCounts{}
	return c
}

type writeBatch struct {
	arena []byte
}

var batchPools sync.Map // slot size → *sync.Pool of *writeBatch

// NewWriter returns a Writer for packets of up to mtu bytes.
func (d *Device) NewWriter(mtu int) *Writer {
	slot := Headroom + min(WriteBatchSize*mtu, 65535)
	return &Writer{dev: d, slot: slot, bufs: make([][]byte, 0, WriteBatchSize)}
}

func (w *Writer) pool() *sync.Pool {
	if p, ok := batchPools.Load(w.slot); ok {
		return p.(*sync.Pool)
	}
	slot := w.slot
	p, _ := batchPools.LoadOrStore(slot, &sync.Pool{New: func() any {
		return &writeBatch{arena: make([]byte, slot*WriteBatchSize)}
	}})
	return p.(*sync.Pool)
}

// Add copies pkt into the batch and reports whether the batch is full
// (Flush it then). A packet longer than the batch's buffers is written at
// once, alone, and its error returned.
func (w *Writer) Add(pkt []byte) (full bool, err error) {
	if len(pkt) > w.slot-Headroom {
		// Alone, after what the batch holds: the order stays. (What the
		// kernel refuses of the batch is not told apart here.)
		_, _ = w.Flush()
		if _, err := w.dev.Write(pkt); err != nil {
			w.counts.Refused++
			return false, err
		}
		w.counts.Packets++
		w.counts.Bytes += int64(len(pkt))
		return false, nil
	}
	if w.b == nil {
		w.b = w.pool().Get().(*writeBatch)
	}
	i := len(w.bufs)
	start := i * w.slot
	buf := w.b.arena[start : start+Headroom+len(pkt) : start+w.slot]
	copy(buf[Headroom:], pkt)
	w.bufs = append(w.bufs, buf)
	return len(w.bufs) == WriteBatchSize, nil
}

// WriteSegment writes seg, a TCP segment from the tunnel's peer, whole:
// the kernel cuts it into packets of size bytes of payload (the last one
// may be shorter) and computes their checksums. What the batch holds is
// written first. A segment CheckSegment refuses is not written, and its
// error returned; seg's checksum fields are changed in place. The counts
// are of the packets it makes.
func (w *Writer) WriteSegment(seg []byte, size int) error {
	_, _ = w.Flush()
	n, err := CheckSegment(seg, size)
	if err != nil {
		w.counts.Refused++
		return err
	}
	if err := w.dev.writeSegment(seg, size); err != nil {
		w.counts.Refused += int64(n)
		return err
	}
	w.counts.Packets += int64(n)
	w.counts.Bytes += int64(SegmentWireBytes(seg, n))
	return nil
}

// Len is how many packets wait for Flush.
func (w *Writer) Len() int { return len(w.bufs) }

// Flush writes the gathered packets and returns how many of them the kernel
// refused (a segment of several refused counts all of them) and the first
// error; TakeCounts tells the rest.
func (w *Writer) Flush() (refused int, err error) {
	if len(w.bufs) == 0 {
		return 0, nil
	}
	n, bytes := len(w.bufs), 0
	for _, b := range w.bufs {
		bytes += len(b) - Headroom
	}
	refused, refusedBytes, err := w.write()
	w.bufs = w.bufs[:0]
	w.pool().Put(w.b)
	w.b = nil
	if errors.Is(err, errJoin) {
		refused, refusedBytes = n, bytes
	}
	w.counts.Packets += int64(n - refused)
	w.counts.Bytes += int64(bytes - refusedBytes)
	w.counts.Refused += int64(refused)
	if j, ok := err.(interface{ Unwrap() []error }); ok && len(j.Unwrap()) > 0 {
		err = j.Unwrap()[0]
	}
	return refused, err
}

// errSplit: a segment whose packets did not fit the reader's buffers.
var errSplit = errors.New("a segment from the tun device does not split into packets of its MTU")

// errJoin: joining the batch's packets failed (a panic in the join, which
// packets from a peer must never turn into a crashed server): the batch is
// dropped.
var errJoin = errors.New("joining packets for the tun device failed; the batch was dropped")

// write is WriteBatch that turns a panic in the join into errJoin.
func (w *Writer) write() (refused, refusedBytes int, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%w: %v", errJoin, p)
		}
	}()
	return w.dev.WriteBatch(w.bufs, Headroom)
}

// Reader reads a device in batches into buffers of its own, each with
// room of the caller's in front of the packet.
type Reader struct {
	dev     *Device
	offset  int
	raw     []byte // one read: [pad][virtio-net header][packet or segment]
	pad     int    // so that the room fits in front of the header's end
	n       int    // the last read's length, from raw[pad:]
	vh      [vnetHdrLen]byte
	bufs    [][]byte
	sizes   []int
	out     [][]byte
	dropped int64
}

// NewReader returns a Reader for a device of MTU mtu whose packets each
// come with offset bytes in front for the caller (a datagram's prefix).
func (d *Device) NewReader(mtu, offset int) *Reader {
	n := d.batch(mtu)
	pad := max(0, offset-vnetHdrLen)
	r := &Reader{dev: d, offset: offset, pad: pad, raw: make([]byte, pad+vnetHdrLen+maxSegmentLength),
		bufs: make([][]byte, n), sizes: make([]int, n), out: make([][]byte, 0, n)}
	// Packets are at most the MTU (1500 at least, should someone raise it
	// a little); a longer one is dropped and counted (Dropped).
	slot := offset + max(mtu, 1500)
	arena := make([]byte, slot*n)
	for i := range n {
		r.bufs[i] = arena[i*slot : (i+1)*slot : (i+1)*slot]
	}
	return r
}

// Read returns the next batch: each element is the caller's offset bytes
// followed by one packet, valid until the next Read. What the kernel hands
// over that cannot be split into packets (a malformed segment, one of more
// packets than the batch holds) is dropped and counted (Dropped); Read
// fails only when the device does (closed, or removed).
func (r *Reader) Read() ([][]byte, error) {
	pkts, _, err := r.next(false)
	return pkts, err
}

// ReadSegment is Read, except that a TCP segment that may cross a tunnel
// whole (CheckSegment) comes as the batch's one element, unsplit, with its
// segment size (the payload bytes of each packet it makes); size is 0 for a
// batch of packets. Split cuts such a segment into packets after all, for a
// peer that takes none.
func (r *Reader) ReadSegment() (pkts [][]byte, size int, err error) {
	return r.next(true)
}

func (r *Reader) next(keep bool) ([][]byte, int, error) {
	for {
		n, err := r.dev.readRaw(r.raw[r.pad:])
		if err != nil {
			if deviceGone(err) {
				return nil, 0, err
			}
			r.dropped++
			continue
		}
		if n < vnetHdrLen {
			r.dropped++
			continue
		}
		r.n = n
		start := r.pad + vnetHdrLen
		copy(r.vh[:], r.raw[r.pad:start]) // the caller's room may cover it
		pkt := r.raw[start : r.pad+n]
		if keep {
			if size := keepSegment(r.vh[:], pkt); size > 0 {
				r.out = append(r.out[:0], r.raw[start-r.offset:r.pad+n])
				return r.out, size, nil
			}
		}
		k, err := r.split(pkt)
		if err != nil {
			r.dropped++
		}
		if k == 0 {
			continue
		}
		return r.batchOf(k), 0, nil
	}
}

// Split cuts the segment the last ReadSegment returned into packets, as
// Read would have (the caller's room in front of each); the segment's own
// buffer is unchanged by it. Packets that did not fit are dropped, counted
// (Dropped) and reported in the error beside those that did.
func (r *Reader) Split() ([][]byte, error) {
	k, err := r.split(r.raw[r.pad+vnetHdrLen : r.pad+r.n])
	if err != nil {
		r.dropped++
	}
	return r.batchOf(k), err
}

func (r *Reader) batchOf(k int) [][]byte {
	r.out = r.out[:0]
	for i := range k {
		r.out = append(r.out, r.bufs[i][:r.offset+r.sizes[i]])
	}
	return r.out
}

// split is splitRead of the last read's header and pkt that turns a panic
// in the segment split (a segment whose packets do not fit the buffers)
// into an error.
func (r *Reader) split(pkt []byte) (n int, err error) {
	defer func() {
		if p := recover(); p != nil {
			n, err = 0, errSplit
		}
	}()
	return splitRead(r.vh[:], pkt, r.bufs, r.sizes, r.offset)
}

// Dropped is how many reads were dropped as Read says.
func (r *Reader) Dropped() int64 { return r.dropped }
