package uploader_test

import (
	"context"
	"testing"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/upload/uploader"
)

// Each upload's trace holds its S3 calls: the PUT of a small object, and
// every request of a multipart one (parts go out on goroutines of their
// own), under the Upload RPC's span.
func TestUploadTraceHoldsItsS3Calls(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	st := startStackWrapped(t, []string{testenv.S3(t).Endpoint}, nil, func(c *uploader.Config) { c.TracerProvider = tp }, nil,
		grpc.StatsHandler(otelgrpc.NewServerHandler(otelgrpc.WithTracerProvider(tp))))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, c := range []struct {
		size int
		want map[string]int
	}{
		{1000, map[string]int{"S3.PutObject": 1}},
		{20 << 20, map[string]int{"S3.CreateMultipartUpload": 1, "S3.UploadPart": 3, "S3.CompleteMultipartUpload": 1}},
	} {
		rec.Reset()
		data := testenv.OpaqueBytes(t, c.size)
		if _, err := send(ctx, st.Upload, &uploadv1.UploadHeader{NameHint: "t.bin", ContentType: "application/octet-stream", Size: int64(c.size)}, data); err != nil {
			t.Fatal(err)
		}
		// The server ends its span after the client has the answer.
		var rpc sdktrace.ReadOnlySpan
		for deadline := time.Now().Add(10 * time.Second); rpc == nil; time.Sleep(10 * time.Millisecond) {
			for _, sp := range rec.Ended() {
				if sp.Name() == "bucketlb.upload.v1.UploadService/Upload" {
					rpc = sp
				}
			}
			if rpc == nil && time.Now().After(deadline) {
				t.Fatalf("%d bytes: no Upload span", c.size)
			}
		}
		got := map[string]int{}
		for _, sp := range rec.Ended() {
			if sp.SpanContext().TraceID() == rpc.SpanContext().TraceID() && sp.Parent().SpanID() == rpc.SpanContext().SpanID() {
				got[sp.Name()]++
			}
		}
		for op, n := range c.want {
			if got[op] != n {
				t.Fatalf("%d bytes: spans under the Upload span %v, want %v", c.size, got, c.want)
			}
		}
	}
}
