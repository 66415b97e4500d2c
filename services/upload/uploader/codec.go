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
// would then hold another 16 MiB of received chunks. 128 KiB keeps a
// stream clearly within two parts plus 1 MiB (256 KiB touched the limit
// once parts streamed) and still moves ~250 MB/s per stream at a 0.5 ms
// round trip, more than one upload gets into R2.
const streamWindow = 128 << 10

// MaxChunk is the most data one Upload message may carry. gRPC takes in a
// whole message before the handler sees it, outside the buffer budget, so
// its default limit of 4 MiB would let each busy stream hold 4 MiB more
// than the budget counts. Clients do best with 64 KiB to 1 MiB.
const MaxChunk = 1 << 20

// maxMessage is gRPC's receive limit: a chunk, or a header, with room for
// the message's framing. gRPC refuses a longer message from its length
// prefix, before reading it, with RESOURCE_EXHAUSTED "received message
// larger than max" that it writes itself; chunks over MaxChunk below this
// limit get INVALID_ARGUMENT from the chunk reader.
const maxMessage = MaxChunk + 64<<10

// ServerOptions are the gRPC server options the upload service needs: a
// codec that decodes data chunks straight into the upload's buffers,
// bounded flow control windows and messages. Without them the service
// still works, at the cost of an extra copy and allocation per chunk and
// of memory outside its budget.
func (s *Server) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ForceServerCodecV2(s.codec),
		grpc.InitialWindowSize(streamWindow),
		grpc.InitialConnWindowSize(16 * streamWindow),
		grpc.MaxRecvMsgSize(maxMessage),
	}
}

// chunkField is UploadRequest's chunk field number.
const chunkField = protowire.Number(2)

// chunkCodec is the proto codec, except that an UploadRequest carrying one
// data chunk, received into a message a chunkReader registered a target
// for, is copied from gRPC's receive buffers straight into the buffer the
// reader is filling (a part buffer, or a small object's body): no
// allocation and no extra copy per chunk. Fresh 256 KiB allocations per
// message made the kernel fault in and zero new pages, which cost more
// than everything else the service does per byte.
type chunkCodec struct {
	base encoding.CodecV2
	// targets maps the *uploadv1.UploadRequest a chunkReader receives into
	// to its *chunkTarget. gRPC calls Unmarshal on the goroutine that
	// called RecvMsg, so a target is only ever used by its own reader.
	targets sync.Map
	// failed maps an *uploadv1.UploadRequest that did not decode to its
	// error until its receiver reads it (undecodable): gRPC answers a
	// decoding error on its own, as INTERNAL, before the handler sees it.
	failed sync.Map
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
	if m, ok := v.(*uploadv1.UploadRequest); ok {
		if x, ok := c.targets.Load(m); ok && decodeChunk(data, m, x.(*chunkTarget)) {
			return nil
		}
	}
	// Headers, unregistered messages and anything unusual: the standard
	// decoder.
	err := c.base.Unmarshal(data, v)
	if m, ok := v.(*uploadv1.UploadRequest); ok && err != nil {
		m.Reset()
		c.failed.Store(m, err)
		return nil
	}
	return err
}

// undecodable returns the decoding error of the UploadRequest m last
// received into, if it had one, once. A nil codec (a server run without
// ServerOptions) knows of none.
func (c *chunkCodec) undecodable(m any) error {
	if c == nil {
		return nil
	}
	if err, ok := c.failed.LoadAndDelete(m); ok {
		return err.(error)
	}
	return nil
}

// decodeChunk decodes a message that is exactly one chunk field into t.dst
// (and t.rest), without a contiguous copy of the whole message first. ok
// is false for any other message, or when t has no room.
func decodeChunk(data mem.BufferSlice, m *uploadv1.UploadRequest, t *chunkTarget) (ok bool) {
	if len(t.dst) == 0 {
		return false
	}
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
	k := min(int(n), len(t.dst))
	if _, err := io.ReadFull(r, t.dst[:k]); err != nil {
		return false
	}
	// A rest is rare (the first chunk after the sniffed head, a chunk
	// straddling two parts).
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
