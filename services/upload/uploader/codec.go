package uploader

import (
	"encoding/binary"
	"io"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
)

// streamWindow is the most data a client may send ahead of what an upload
// has read. Fixed windows turn off gRPC's bandwidth-delay estimate, which
// grows them to 16 MiB: a stream waiting for its part buffer to free up
// would then hold another 16 MiB of received chunks. 256 KiB keeps a
// stream within two parts plus 1 MiB and is plenty on any network a data
// centre has.
const streamWindow = 256 << 10

// ServerOptions are the gRPC server options the upload service needs: a
// codec that decodes data chunks straight into the upload's buffers, and
// bounded flow control windows. Without them the service still works, at
// the cost of an extra copy and allocation per chunk.
func (s *Server) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ForceServerCodecV2(s.codec),
		grpc.InitialWindowSize(streamWindow),
		grpc.InitialConnWindowSize(16 * streamWindow),
	}
}

// chunkField is UploadRequest's chunk field number.
const chunkField = protowire.Number(2)

// chunkCodec is the proto codec, except that an UploadRequest carrying one
// data chunk is copied from gRPC's receive buffers straight to where the
// upload wants it: into the buffer a chunkReader is filling when it
// registered a target for the message it receives into, else into a buffer
// from gRPC's pool. Fresh 256 KiB allocations per message made the kernel
// fault in and zero new pages, which cost more than everything else the
// service does per byte; decoding into the part buffer also saves a copy
// and keeps no pooled chunk per stream alive.
type chunkCodec struct {
	base encoding.CodecV2
	// targets maps the *uploadv1.UploadRequest a chunkReader receives into
	// to its *chunkTarget. gRPC calls Unmarshal on the goroutine that
	// called RecvMsg, so a target is only ever used by its own reader.
	targets sync.Map
}

// chunkTarget says where the next chunk of one stream goes, and how it went.
type chunkTarget struct {
	dst  []byte // the chunk's first bytes go here
	hit  bool   // the last message was a chunk decoded into dst
	n    int    // its bytes now in dst
	rest []byte // its bytes beyond dst
}

func newChunkCodec() *chunkCodec {
	return &chunkCodec{base: encoding.GetCodecV2(proto.Name)}
}

func (c *chunkCodec) Name() string { return proto.Name }

func (c *chunkCodec) Marshal(v any) (mem.BufferSlice, error) { return c.base.Marshal(v) }

func (c *chunkCodec) Unmarshal(data mem.BufferSlice, v any) error {
	m, ok := v.(*uploadv1.UploadRequest)
	if !ok {
		return c.base.Unmarshal(data, v)
	}
	var t *chunkTarget
	if x, ok := c.targets.Load(m); ok {
		t = x.(*chunkTarget)
	}
	if decodeChunk(data, m, t) {
		return nil
	}
	// Headers and anything unusual: the standard decoder.
	return c.base.Unmarshal(data, v)
}

// decodeChunk decodes a message that is exactly one chunk field without a
// contiguous copy of the whole message: into t.dst (and t.rest) when t has
// room, else into a pooled buffer held by m. ok is false for any other
// message.
func decodeChunk(data mem.BufferSlice, m *uploadv1.UploadRequest, t *chunkTarget) (ok bool) {
	r := data.Reader()
	defer r.Close()
	tag, err := binary.ReadUvarint(r)
	if err != nil || tag != uint64(protowire.EncodeTag(chunkField, protowire.BytesType)) {
		return false
	}
	n, err := binary.ReadUvarint(r)
	if err != nil || n != uint64(r.Remaining()) {
		return false
	}
	if t != nil && len(t.dst) > 0 {
		k := min(int(n), len(t.dst))
		if _, err := io.ReadFull(r, t.dst[:k]); err != nil {
			return false
		}
		// The rest is rare (the first chunk after the sniffed head, a
		// chunk straddling two parts) and gets a buffer of its own size:
		// gRPC's pool would hand out a 1 MiB one for it.
		var rest []byte
		if int(n) > k {
			rest = make([]byte, int(n)-k)
			if _, err := io.ReadFull(r, rest); err != nil {
				return false
			}
		}
		m.Reset()
		t.hit, t.n, t.rest = true, k, rest
		return true
	}
	chunk, ok := pooledCopy(r, int(n))
	if !ok {
		return false
	}
	m.Reset()
	m.Payload = &uploadv1.UploadRequest_Chunk{Chunk: chunk}
	return true
}

// pooledCopy reads n bytes from r into a buffer from gRPC's pool.
func pooledCopy(r io.Reader, n int) ([]byte, bool) {
	p := mem.DefaultBufferPool().Get(n)
	if _, err := io.ReadFull(r, *p); err != nil {
		mem.DefaultBufferPool().Put(p)
		return nil, false
	}
	return *p, true
}

// releaseChunk gives a chunk decoded by chunkCodec back to the pool once
// its bytes were copied out. Chunks from another codec (tests calling the
// server directly) are simply collected.
func releaseChunk(b []byte) {
	if cap(b) == 0 {
		return
	}
	b = b[:cap(b)]
	mem.DefaultBufferPool().Put(&b)
}
