package uploader

// WaitingStreams counts the Upload streams whose header has been accepted
// and which now wait for data (each has a chunk reader registered with
// the codec), so tests can wait for streams to settle instead of sleeping.
func (s *Server) WaitingStreams() int {
	n := 0
	s.codec.targets.Range(func(_, _ any) bool { n++; return true })
	return n
}

// BufferPeak is the most upload buffer memory ever held at once.
func (s *Server) BufferPeak() int64 { return s.buffers.peak.Load() }

// BufferHeld is the upload buffer memory held now.
func (s *Server) BufferHeld() int64 { return s.buffers.held.Load() }

// BufferWaiters counts the calls waiting for buffer room.
func (s *Server) BufferWaiters() int64 { return s.buffers.waiting.Load() }

// BufferClients counts the clients holding or awaiting buffer room.
func (s *Server) BufferClients() int {
	s.buffers.mu.Lock()
	defer s.buffers.mu.Unlock()
	return len(s.buffers.clients)
}

// GetChunk is the size of the chunks GetObject sends.
const GetChunk = getChunk
