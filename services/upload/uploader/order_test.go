package uploader_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// Messages out of place: exactly one header first, then only chunks. A
// message that is neither (empty, or of a kind this server does not know,
// such as a newer client's) is refused wherever it comes, never dropped
// unseen. Each is INVALID_ARGUMENT with a sentence, stores nothing and
// holds no capacity; empty chunks are fine.
func TestMessagesOutOfPlace(t *testing.T) {
	const partSize = 5 << 20
	st := startStack(t, 1, func(c *uploader.Config) { c.PartSize = partSize })
	small := testenv.OpaqueBytes(t, 100)
	large := testenv.OpaqueBytes(t, partSize+1000)
	header := func(data []byte) *uploadv1.UploadRequest {
		return &uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Header{Header: &uploadv1.UploadHeader{
			NameHint: "o.bin", ContentType: "application/octet-stream", Size: int64(len(data))}}}
	}
	chunk := func(b []byte) *uploadv1.UploadRequest {
		return &uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: b}}
	}
	// A message with a field number this server does not know.
	unknown := func() *uploadv1.UploadRequest {
		m := &uploadv1.UploadRequest{}
		m.ProtoReflect().SetUnknown(protowire.AppendBytes(protowire.AppendTag(nil, 15, protowire.BytesType), []byte("trailer")))
		return m
	}
	empty := func() *uploadv1.UploadRequest { return &uploadv1.UploadRequest{} }
	// chunks is data in 1 MiB chunks.
	chunks := func(data []byte) []*uploadv1.UploadRequest {
		var out []*uploadv1.UploadRequest
		for len(data) > 0 {
			n := min(len(data), 1<<20)
			out, data = append(out, chunk(data[:n])), data[n:]
		}
		return out
	}
	seq := func(parts ...[]*uploadv1.UploadRequest) []*uploadv1.UploadRequest {
		var out []*uploadv1.UploadRequest
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	one := func(m *uploadv1.UploadRequest) []*uploadv1.UploadRequest { return []*uploadv1.UploadRequest{m} }
	cases := []struct {
		name string
		msgs []*uploadv1.UploadRequest
		want string // in the message
	}{
		{"chunk first", []*uploadv1.UploadRequest{chunk(small), header(small)}, "must be a header"},
		{"empty message first", []*uploadv1.UploadRequest{empty(), header(small), chunk(small)}, "must be a header"},
		{"two headers", []*uploadv1.UploadRequest{header(small), header(small), chunk(small)}, "second header"},
		{"header after the data", []*uploadv1.UploadRequest{header(small), chunk(small), header(small)}, "second header"},
		{"empty message after the header", []*uploadv1.UploadRequest{header(small), empty(), chunk(small)}, "no chunk"},
		{"empty message after the data", []*uploadv1.UploadRequest{header(small), chunk(small), empty()}, "no chunk"},
		{"unknown message after the data", []*uploadv1.UploadRequest{header(small), chunk(small), unknown()}, "no chunk"},
		{"unknown message inside a multipart upload", seq(one(header(large)), chunks(large[:partSize]), one(unknown()), chunks(large[partSize:])), "no chunk"},
		{"empty message after a multipart upload's data", seq(one(header(large)), chunks(large), one(empty())), "no chunk"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			stream, err := st.Upload.Upload(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range tc.msgs {
				if err := stream.Send(m); err != nil {
					break // the server answered already; CloseAndRecv has it
				}
			}
			resp, err := stream.CloseAndRecv()
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), tc.want) {
				t.Fatalf("answered %v (%v), want INVALID_ARGUMENT saying %q", resp, err, tc.want)
			}
		})
	}
	// Empty chunks anywhere after the header carry nothing, and harm nothing.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stream, err := st.Upload.Upload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []*uploadv1.UploadRequest{header(small), chunk(nil), chunk(small[:40]), chunk([]byte{}), chunk(small[40:]), chunk(nil)} {
		if err := stream.Send(m); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := stream.CloseAndRecv(); err != nil {
		t.Fatalf("upload with empty chunks: %v", err)
	}
	objects, multiparts := st.objects(t)
	for id := range objects {
		if objects[id] > 1 || multiparts[id] != 0 {
			t.Fatalf("bucket %s holds %d objects and %d open multipart uploads, want only the one with empty chunks", id, objects[id], multiparts[id])
		}
	}
	if used, _ := st.usage(t); sumOf(used) != int64(len(small)) {
		t.Fatalf("usage %v, want only the %d bytes of the upload with empty chunks", used, len(small))
	}
	st.waitNoReservations(t)
}

func sumOf(m map[string]int64) int64 {
	total := int64(0)
	for _, v := range m {
		total += v
	}
	return total
}

// rawCodec sends and receives messages as the bytes given: a client that
// puts bytes on the stream which are not an UploadRequest.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(v.([]byte))}, nil
}
func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*v.(*[]byte) = data.Materialize()
	return nil
}
func (rawCodec) Name() string { return "proto" }

// Bytes that do not decode as an UploadRequest, first or after the header,
// are the client's fault (INVALID_ARGUMENT saying so), not an INTERNAL
// error of the service; nothing is stored and no capacity is held.
func TestUndecodableMessages(t *testing.T) {
	st := startStack(t, 1, nil)
	conn, err := grpc.NewClient(st.UploadAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	data := testenv.OpaqueBytes(t, 100)
	header, err := proto.Marshal(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Header{Header: &uploadv1.UploadHeader{
		NameHint: "o.bin", ContentType: "application/octet-stream", Size: int64(len(data))}}})
	if err != nil {
		t.Fatal(err)
	}
	chunk, err := proto.Marshal(&uploadv1.UploadRequest{Payload: &uploadv1.UploadRequest_Chunk{Chunk: data}})
	if err != nil {
		t.Fatal(err)
	}
	// A length-delimited field whose length runs past the message's end.
	garbage := []byte{0x12, 0x7f, 'x'}
	for _, tc := range []struct {
		name string
		msgs [][]byte
	}{
		{"first", [][]byte{garbage, header, chunk}},
		{"after the header", [][]byte{header, garbage, chunk}},
		{"inside the data", [][]byte{header, chunk[:60], garbage}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			stream, err := conn.NewStream(ctx, &uploadv1.UploadService_ServiceDesc.Streams[0], uploadv1.UploadService_Upload_FullMethodName,
				grpc.ForceCodecV2(rawCodec{}))
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range tc.msgs {
				if err := stream.SendMsg(m); err != nil {
					break // the server answered already
				}
			}
			if err := stream.CloseSend(); err != nil {
				t.Fatal(err)
			}
			var resp []byte
			err = stream.RecvMsg(&resp)
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "could not be read as an UploadRequest") {
				t.Fatalf("answered %v, want INVALID_ARGUMENT saying the message could not be read", err)
			}
		})
	}
	objects, multiparts := st.objects(t)
	for id := range objects {
		if objects[id] != 0 || multiparts[id] != 0 {
			t.Fatalf("bucket %s holds %d objects and %d open multipart uploads, want none", id, objects[id], multiparts[id])
		}
	}
	if used, _ := st.usage(t); sumOf(used) != 0 {
		t.Fatalf("usage %v, want none", used)
	}
	st.waitNoReservations(t)
}
