package mux

// Held is the memory of the payloads s holds (the size of its buffers).
func (s *Stream) Held() int { return s.held() }

// Buffered is how many received bytes s holds unread.
func (s *Stream) Buffered() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := -s.roff
	for _, l := range s.rlens {
		n += l
	}
	return n
}

// ReadsWaiting is how many Reads of s wait for data or an end.
func (s *Stream) ReadsWaiting() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rwaiting
}

// ReaderDone is closed when m's reader goroutine returned.
func (m *Conn) ReaderDone() <-chan struct{} { return m.rdone }
