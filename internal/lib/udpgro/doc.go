// Package udpgro reads a UDP socket for quic-go with the kernel's receive
// coalescing (UDP_GRO, Linux): a burst of same-size datagrams from one sender,
// such as the QUIC packets of one GSO send, reaches user space as one buffer
// instead of one datagram each, and Reader splits it into the messages quic-go
// asks for. The kernel then queues, wakes and copies once per burst, which is
// most of what a receiver of a bulk transfer spends in it.
//
// quic-go reads through a conn's own ReadBatch when it has one: Wrap gives a
// *net.UDPConn one, and a PacketConn of its own (as proxy/carrier's Mux) reads
// through a Reader. Elsewhere than Linux, or where the kernel refuses UDP_GRO,
// a Reader reads datagram by datagram in batches, as quic-go does itself.
package udpgro
