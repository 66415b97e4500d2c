package uploader

import (
	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
)

// ServerOptions are the gRPC server options the upload service needs: a
// codec that decodes data chunks into pooled buffers.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{grpc.ForceServerCodecV2(chunkCodec{base: encoding.GetCodecV2(proto.Name)})}
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
	buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
	defer buf.Free()
	b := buf.ReadOnlyData()
	if num, typ, n := protowire.ConsumeTag(b); n > 0 && num == chunkField && typ == protowire.BytesType {
		if chunk, k := protowire.ConsumeBytes(b[n:]); k == len(b)-n {
			p := mem.DefaultBufferPool().Get(len(chunk))
			copy(*p, chunk)
			m.Reset()
			m.Payload = &uploadv1.UploadRequest_Chunk{Chunk: *p}
			return nil
		}
	}
	// Headers and anything unusual: the standard decoder.
	return c.base.Unmarshal(mem.BufferSlice{buf}, v)
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
