package uploader

import (
	"bytes"
	"testing"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	protolib "google.golang.org/protobuf/proto"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
)

// TestChunkCodecDecodesLikeProto: with a target registered, every
// UploadRequest shape decodes to the same message as the standard codec
// (a chunk's bytes read back from the target), whether the wire bytes
// arrive in one buffer or split across several, and a decoded chunk does
// not alias the wire buffer (gRPC reuses it once Unmarshal returns).
func TestChunkCodecDecodesLikeProto(t *testing.T) {
	c := newChunkCodec()
	m := &uploadv1.UploadRequest{}
	target := &chunkTarget{}
	c.targets.Store(m, target)
	decode := func(data mem.BufferSlice) (*uploadv1.UploadRequest, error) {
		*target = chunkTarget{dst: make([]byte, 300<<10)}
		if err := c.Unmarshal(data, m); err != nil {
			return nil, err
		}
		if err := c.undecodable(m); err != nil {
			return nil, err
		}
		if !target.hit {
			return m, nil
		}
		chunk := append(target.dst[:target.n:target.n], target.rest...)
		return &uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: chunk}}, nil
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), 16<<10) // 256 KiB
	msgs := []*uploadv1.UploadRequest{
		{Payload: &uploadv1.UploadRequest_Header{Header: &uploadv1.UploadHeader{Key: "a/b.bin", Size: 7, ContentType: "image/png"}}},
		{Payload: &uploadv1.UploadRequest_Chunk{Chunk: []byte("hello")}},
		{Payload: &uploadv1.UploadRequest_Chunk{Chunk: big}},
		{Payload: &uploadv1.UploadRequest_Chunk{Chunk: []byte{}}},
		{},
	}
	for i, want := range msgs {
		wire, err := protolib.Marshal(want)
		if err != nil {
			t.Fatal(err)
		}
		for _, split := range []int{0, 1, len(wire) / 2} {
			var data mem.BufferSlice
			if split > 0 && split < len(wire) {
				data = mem.BufferSlice{mem.SliceBuffer(wire[:split]), mem.SliceBuffer(wire[split:])}
			} else {
				data = mem.BufferSlice{mem.SliceBuffer(wire)}
			}
			got, err := decode(data)
			if err != nil {
				t.Fatalf("message %d split %d: %v", i, split, err)
			}
			clear(wire)
			if !protolib.Equal(got, want) {
				t.Fatalf("message %d split %d decoded as %v, want %v", i, split, got, want)
			}
			if wire, err = protolib.Marshal(want); err != nil {
				t.Fatal(err)
			}
		}
	}
	// A chunk field followed by more fields is not the fast path's shape:
	// the standard decoder takes it and the last value wins, as in proto.
	wire := protowire.AppendTag(nil, chunkField, protowire.BytesType)
	wire = protowire.AppendBytes(wire, []byte("first"))
	wire = protowire.AppendTag(wire, chunkField, protowire.BytesType)
	wire = protowire.AppendBytes(wire, []byte("second"))
	got, err := decode(mem.BufferSlice{mem.SliceBuffer(wire)})
	if err != nil {
		t.Fatal(err)
	}
	if string(got.GetChunk()) != "second" {
		t.Fatalf("repeated chunk field decoded as %q, want %q", got.GetChunk(), "second")
	}
	// Bad wire data is an error, not a panic.
	if _, err := decode(mem.BufferSlice{mem.SliceBuffer([]byte{0x12, 0xff})}); err == nil {
		t.Fatal("truncated chunk decoded without error")
	}
}

// TestChunkCodecDecodesIntoTarget: with a target registered for the
// message, a chunk lands in the target's buffer (the part of it that does
// not fit in a pooled rest), byte for byte, whatever the split of the wire
// buffers; other messages decode as usual and leave the target unused.
func TestChunkCodecDecodesIntoTarget(t *testing.T) {
	c := newChunkCodec()
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 4<<10) // 64 KiB
	wire, err := protolib.Marshal(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: chunk}})
	if err != nil {
		t.Fatal(err)
	}
	m := &uploadv1.UploadRequest{}
	target := &chunkTarget{}
	c.targets.Store(m, target)
	for _, room := range []int{1, 512, len(chunk) - 1, len(chunk), 2 * len(chunk)} {
		for _, split := range []int{1, 3, len(wire) / 2} {
			dst := make([]byte, room)
			*target = chunkTarget{dst: dst}
			data := mem.BufferSlice{mem.SliceBuffer(wire[:split]), mem.SliceBuffer(wire[split:])}
			if err := c.Unmarshal(data, m); err != nil {
				t.Fatalf("room %d split %d: %v", room, split, err)
			}
			if !target.hit || target.n != min(room, len(chunk)) {
				t.Fatalf("room %d split %d: hit %v, %d bytes in dst", room, split, target.hit, target.n)
			}
			got := append(append([]byte{}, dst[:target.n]...), target.rest...)
			if !bytes.Equal(got, chunk) {
				t.Fatalf("room %d split %d: decoded bytes differ from the chunk", room, split)
			}
			if m.GetChunk() != nil {
				t.Fatalf("room %d split %d: the message also holds the chunk", room, split)
			}
		}
	}
	hdr := &uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Header{Header: &uploadv1.UploadHeader{Key: "k", Size: 1}}}
	if wire, err = protolib.Marshal(hdr); err != nil {
		t.Fatal(err)
	}
	*target = chunkTarget{dst: make([]byte, 64)}
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(wire)}, m); err != nil {
		t.Fatal(err)
	}
	if target.hit || !protolib.Equal(m, hdr) {
		t.Fatalf("a header decoded as %v (target hit %v)", m, target.hit)
	}
}

// FuzzChunkCodecAgreesWithProto: for any wire bytes, any split of them into
// buffers and any target size, the codec (with undecodable) fails exactly when the standard
// decoder fails, and otherwise decodes the same message (a chunk's bytes
// read back from the target and its rest).
func FuzzChunkCodecAgreesWithProto(f *testing.F) {
	for _, m := range []*uploadv1.UploadRequest{
		{Payload: &uploadv1.UploadRequest_Chunk{Chunk: []byte("hello, world")}},
		{Payload: &uploadv1.UploadRequest_Header{Header: &uploadv1.UploadHeader{Key: "k", Size: 3}}},
		{},
	} {
		wire, err := protolib.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(wire, uint8(3), uint16(5))
	}
	f.Add([]byte{0x12, 0xff}, uint8(1), uint16(1))
	f.Add([]byte{0x92, 0x80, 0x00, 0x01, 0x61}, uint8(2), uint16(1)) // a tag in a longer varint
	f.Fuzz(func(t *testing.T, wire []byte, split uint8, dstLen uint16) {
		want := &uploadv1.UploadRequest{}
		wantErr := protolib.Unmarshal(wire, want)

		c := newChunkCodec()
		m := &uploadv1.UploadRequest{}
		target := &chunkTarget{dst: make([]byte, dstLen)}
		c.targets.Store(m, target)
		data := mem.BufferSlice{mem.SliceBuffer(wire)}
		if s := int(split); s > 0 && s < len(wire) {
			data = mem.BufferSlice{mem.SliceBuffer(wire[:s]), mem.SliceBuffer(wire[s:])}
		}
		err := c.Unmarshal(data, m)
		if err == nil {
			// An UploadRequest's decoding error waits for its receiver.
			err = c.undecodable(m)
		}
		if (err != nil) != (wantErr != nil) {
			t.Fatalf("codec error %v, proto error %v", err, wantErr)
		}
		if err != nil {
			return
		}
		got := m
		if target.hit {
			got = &uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: append(target.dst[:target.n:target.n], target.rest...)}}
		}
		if !protolib.Equal(got, want) {
			t.Fatalf("codec decoded %v, proto %v", got, want)
		}
	})
}
