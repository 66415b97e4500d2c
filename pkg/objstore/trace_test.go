package objstore_test

import (
	"context"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/bucketlb/bucketlb/pkg/objstore"
)

// With a TracerProvider every S3 operation is a client span under the
// caller's span, named after the operation, and a failed one is marked
// as an error: a slow upload's trace shows which bucket call took the
// time.
func TestS3OperationsAreSpans(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	b, _ := newBucket(t, objstore.Options{TracerProvider: tp}, false)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx, parent := tp.Tracer("test").Start(ctx, "upload")
	if _, err := b.Put(ctx, objstore.PutInput{Key: "k", ContentType: "application/octet-stream"}, []byte("data")); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Head(ctx, "missing"); err == nil {
		t.Fatal("head of a missing key succeeded")
	}
	parent.End()

	spans := map[string]sdktrace.ReadOnlySpan{}
	for _, sp := range rec.Ended() {
		spans[sp.Name()] = sp
	}
	for _, op := range []string{"S3.PutObject", "S3.HeadObject"} {
		sp, ok := spans[op]
		if !ok {
			t.Fatalf("no %s span; spans: %v", op, keys(spans))
		}
		if sp.Parent().SpanID() != parent.SpanContext().SpanID() || sp.SpanKind() != trace.SpanKindClient {
			t.Fatalf("%s: parent %v kind %v, want a client span under the caller's", op, sp.Parent().SpanID(), sp.SpanKind())
		}
		if !hasAttr(sp, "aws.s3.bucket", b.Target.Name) {
			t.Fatalf("%s does not name bucket %s: %v", op, b.Target.Name, sp.Attributes())
		}
	}
	if spans["S3.PutObject"].Status().Code == codes.Error || spans["S3.HeadObject"].Status().Code != codes.Error {
		t.Fatalf("statuses: put %v, head of a missing key %v; want only the head marked an error",
			spans["S3.PutObject"].Status(), spans["S3.HeadObject"].Status())
	}
}

func keys(m map[string]sdktrace.ReadOnlySpan) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func hasAttr(sp sdktrace.ReadOnlySpan, key, value string) bool {
	for _, a := range sp.Attributes() {
		if a.Key == attribute.Key(key) && a.Value.AsString() == value {
			return true
		}
	}
	return false
}
