package uploader

import (
	"encoding/binary"
	"io"

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
// would then hold another 16 MiB of received chunks. 1 MiB keeps a stream
// at two parts plus 1 MiB and is plenty on any network a data centre has.
const streamWindow = 256 << 10

// ServerOptions are the gRPC server options the upload service needs: a
// codec that decodes data chunks into pooled buffers, and bounded flow
// control windows.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ForceServerCodecV2(chunkCodec{base: encoding.GetCodecV2(proto.Name)}),
		grpc.InitialWindowSize(streamWindow),
		grpc.InitialConnWindowSize(16 * streamWindow),
	}
}

// chunkField is UploadRequest's chunk field number.
const chunkField = protowire.Number(2)

// chunkCodec is the proto codec, except that an UploadRequest carrying one
// data chunk is decoded into a buffer from gRPC's pool instead of a fresh
// allocation. Every chunk is copied out once by chunkReader and then given
// back (releaseChunk); fresh 256 KiB allocations per message made the
// kernel fault in and zero new pages, which cost more than everything else
// the service does per byte.
type chunkCodec struct{ base encoding.CodecV2 }

func (c chunkCodec) Name() string { return proto.Name }

func (c chunkCodec) Marshal(v any) (mem.BufferSlice, error) { return c.base.Marshal(v) }

func (c chunkCodec) Unmarshal(data mem.BufferSlice, v any) error {
	m, ok := v.(*uploadv1.UploadRequest)
	if !ok {
		return c.base.Unmarshal(data, v)
	}
	if chunk, ok := decodeChunk(data); ok {
		m.Reset()
		m.Payload = &uploadv1.UploadRequest_Chunk{Chunk: chunk}
		return nil
	}
	// Headers and anything unusual: the standard decoder.
	return c.base.Unmarshal(data, v)
}

// decodeChunk copies a message that is exactly one chunk field from gRPC's
// receive buffers straight into a pooled buffer (no contiguous copy of the
// whole message first); ok is false for any other message.
func decodeChunk(data mem.BufferSlice) (chunk []byte, ok bool) {
	r := data.Reader()
	defer r.Close()
	tag, err := binary.ReadUvarint(r)
	if err != nil || tag != uint64(protowire.EncodeTag(chunkField, protowire.BytesType)) {
		return nil, false
	}
	n, err := binary.ReadUvarint(r)
	if err != nil || n != uint64(r.Remaining()) {
		return nil, false
	}
	p := mem.DefaultBufferPool().Get(int(n))
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
