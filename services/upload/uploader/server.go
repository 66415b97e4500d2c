package uploader

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/backoff"
	"github.com/bucketlb/bucketlb/pkg/config"
	"github.com/bucketlb/bucketlb/pkg/mimecheck"
	"github.com/bucketlb/bucketlb/pkg/objectkey"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/telemetry"
)

// AllocatorServiceConfig is the gRPC service config of the upload
// service's connection to the allocator. Calls, not connections, are
// balanced round robin over the replicas (a headless Service's addresses,
// dns:///allocator:7001). A call that fails UNAVAILABLE, as every call in
// flight to a replica that dies or restarts does, is tried again, on
// another replica, so a client never sees a replica go: an Allocate whose
// answer was lost leaves a reservation that lapses by itself. Commit is
// the exception: the upload service tries it again itself (commit), as it
// must see every try's answer. A try whose answer was lost may yet apply,
// and a later try's refusal must not then be taken for "nothing applied",
// which removes the object. Allocator calls are small, well within gRPC's
// 256 KiB retry buffer. Throttling stops retries when most calls fail (no
// replica left), instead of tripling the load.
const AllocatorServiceConfig = `{
  "loadBalancingConfig": [{"round_robin": {}}],
  "methodConfig": [
    {
      "name": [{"service": "bucketlb.allocator.v1.AllocatorService"}],
      "retryPolicy": {
        "maxAttempts": 3,
        "initialBackoff": "0.05s",
        "maxBackoff": "0.5s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"]
      }
    },
    {
      "name": [{"service": "bucketlb.allocator.v1.AllocatorService", "method": "Commit"}]
    }
  ],
  "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1}
}`

// Allocator is what the upload service needs of the control plane.
type Allocator interface {
	Allocate(ctx context.Context, in *allocatorv1.AllocateRequest, opts ...grpc.CallOption) (*allocatorv1.AllocateResponse, error)
	Renew(ctx context.Context, in *allocatorv1.RenewRequest, opts ...grpc.CallOption) (*allocatorv1.RenewResponse, error)
	Commit(ctx context.Context, in *allocatorv1.CommitRequest, opts ...grpc.CallOption) (*allocatorv1.CommitResponse, error)
	Release(ctx context.Context, in *allocatorv1.ReleaseRequest, opts ...grpc.CallOption) (*allocatorv1.ReleaseResponse, error)
	ReportOutcome(ctx context.Context, in *allocatorv1.ReportOutcomeRequest, opts ...grpc.CallOption) (*allocatorv1.ReportOutcomeResponse, error)
	LookupBucket(ctx context.Context, in *allocatorv1.LookupBucketRequest, opts ...grpc.CallOption) (*allocatorv1.LookupBucketResponse, error)
	GetUploadRecord(ctx context.Context, in *allocatorv1.GetUploadRecordRequest, opts ...grpc.CallOption) (*allocatorv1.GetUploadRecordResponse, error)
	EndClaim(ctx context.Context, in *allocatorv1.EndClaimRequest, opts ...grpc.CallOption) (*allocatorv1.EndClaimResponse, error)
}

var _ Allocator = allocatorv1.AllocatorServiceClient(nil)

// Config configures the upload service.
type Config struct {
	// MaxObjectSize is the largest accepted object; default 5 GiB.
	MaxObjectSize int64
	// AllowedContentTypes is the allowlist; empty means mimecheck.DefaultAllowed.
	AllowedContentTypes []string
	// PartSize is the smallest multipart part; objects up to one part go
	// in one PUT. Default 8 MiB (S3's floor is 5 MiB).
	PartSize int64
	// MaxBucketAttempts bounds failover of small objects; default 3.
	MaxBucketAttempts int
	// PartAttempts bounds retries of one part on the same bucket; default 3.
	PartAttempts int
	// BufferParts sends each part only once it is whole, with a
	// Content-MD5 the store checks. Off (the default), a part's PUT starts
	// with its first bytes and its ETag is checked against its MD5 after
	// (a mismatch re-sends it with Content-MD5): two parts upload at once
	// within the same two part buffers. Streaming is also off with
	// SDKDefaultChecksums, whose trailers need a TLS endpoint.
	BufferParts bool
	// StreamStall is how long a streamed part waits for the client's next
	// bytes before the rest of the upload goes buffered; default 5s, long
	// enough that only a client that really paused pays a resent part.
	StreamStall time.Duration
	// BufferBudget bounds the bytes of object and part buffers all uploads
	// on this replica hold at once (a small object takes its size, a large
	// one two parts, a GetObject 512 KiB); an upload beyond it waits for
	// room before reading its data; one whose buffers exceed the whole
	// budget waits for all of it.
	// Keep it well under the process's memory limit. Default 512 MiB.
	BufferBudget int64
	// ClientBufferShare bounds the part of BufferBudget one client (as the
	// rate limiter names it) holds at once, so one client's streams cannot
	// keep every other client waiting; a call whose buffers exceed it
	// waits for all of it. A client past it waits, then gets
	// RESOURCE_EXHAUSTED. Default a quarter of BufferBudget; set it to
	// BufferBudget for no per-client bound.
	ClientBufferShare int64
	// ClientInFlightBytes bounds the sizes one client's running uploads
	// declare on this replica together, which the allocator holds
	// reserved while they run: a client past it gets RESOURCE_EXHAUSTED.
	// 0: no bound.
	ClientInFlightBytes int64
	// BufferWait is how long an upload waits for buffer room before it
	// fails with UNAVAILABLE (retryable); default 10s.
	BufferWait time.Duration
	// IdleTimeout abandons an upload whose client sends nothing for this
	// long (DEADLINE_EXCEEDED), returning its buffers and reservation and
	// removing what it stored, and ends a read whose client takes nothing
	// for this long; default 1m.
	IdleTimeout time.Duration
	// MinDataRate is the fewest bytes a second a client must send, judged
	// over each IdleTimeout of time the service spends waiting for its
	// data; a client below it is cut off like an idle one. Default 1 KiB;
	// negative turns the check off.
	MinDataRate int64
	// BackoffBase is the first failover backoff; default 50ms.
	BackoffBase time.Duration
	// Credentials resolve bucket credentials_ref. Required.
	Credentials objstore.Credentials
	// CAFile is an extra PEM bundle for S3 endpoints.
	CAFile string
	// SDKDefaultChecksums keeps the SDK's default request checksums.
	SDKDefaultChecksums bool
	// CallTimeout and DataTimeout bound each S3 call without and with a
	// body; defaults 30s and 5m.
	CallTimeout, DataTimeout time.Duration
	// HTTPClient overrides the S3 HTTP client (tests).
	HTTPClient aws.HTTPClient
	// Now is the clock; default time.Now.
	Now func() time.Time
	// Metrics records uploads and failovers; nil records nothing.
	Metrics *telemetry.Metrics
	// TracerProvider, when set, traces every S3 call as a span under the
	// RPC's; nil adds no tracing cost.
	TracerProvider trace.TracerProvider
}

// Server implements UploadService.
type Server struct {
	uploadv1.UnsafeUploadServiceServer

	cfg   Config
	alloc Allocator
	store *objstore.Store
	mime  *mimecheck.Checker
	log   *slog.Logger
	codec *chunkCodec
	// buffers bounds the memory that upload buffers take across streams.
	buffers  *bufferBudget
	inFlight *inFlight
	// targets remembers where buckets live for reads and deletes.
	targets *targetCache
	// plainETags holds the ids of buckets whose part ETags turned out not
	// to be MD5s: their parts are sent buffered, with Content-MD5.
	plainETags sync.Map

	// Successful outcomes are reported off the upload's path; these bound
	// and track those reports.
	reportSlots chan struct{}
	reports     sync.WaitGroup
	// background tracks cleanups that outlive their upload (see
	// createMultipart).
	background sync.WaitGroup
}

// maxBackgroundReports bounds success reports in flight; beyond it they
// are sent inline, never dropped.
const maxBackgroundReports = 256

// S3's limits on one object and one part (R2's are the same or lower).
const (
	maxObject = 5 << 40
	maxPart   = 5 << 30
)

// checkSizes refuses sizes the service could not serve: an object larger
// than S3 stores, a part larger than it takes, or two parts of the largest
// object (an upload's buffers) beyond the buffer budget, which would
// break the memory bound the budget is sized for.
func checkSizes(cfg Config) error {
	if cfg.MaxObjectSize > maxObject {
		return fmt.Errorf("uploader: maxObjectSize %d bytes is over S3's 5 TiB object limit", cfg.MaxObjectSize)
	}
	if cfg.PartSize > maxPart {
		return fmt.Errorf("uploader: part size %d bytes is over S3's 5 GiB part limit", cfg.PartSize)
	}
	if p := partSizeFor(cfg.PartSize, cfg.MaxObjectSize); 2*p > cfg.BufferBudget {
		return fmt.Errorf("uploader: an upload of maxObjectSize (%d bytes) streams through two %d-byte part buffers, more than bufferBudget (%d bytes): raise bufferBudget, and the memory limit with it, or lower maxObjectSize",
			cfg.MaxObjectSize, p, cfg.BufferBudget)
	}
	return nil
}

// New builds the service.
func New(cfg Config, alloc Allocator, log *slog.Logger) (*Server, error) {
	if cfg.MaxObjectSize == 0 {
		cfg.MaxObjectSize = 5 << 30
	}
	if cfg.PartSize == 0 {
		cfg.PartSize = 8 << 20
	}
	if cfg.PartSize < 5<<20 {
		return nil, fmt.Errorf("uploader: part size %d is below S3's 5 MiB minimum", cfg.PartSize)
	}
	if cfg.MaxBucketAttempts == 0 {
		cfg.MaxBucketAttempts = 3
	}
	if cfg.BufferBudget == 0 {
		cfg.BufferBudget = 512 << 20
	}
	if err := checkSizes(cfg); err != nil {
		return nil, err
	}
	if cfg.PartAttempts == 0 {
		cfg.PartAttempts = 3
	}
	if cfg.StreamStall == 0 {
		cfg.StreamStall = 5 * time.Second
	}
	if cfg.ClientBufferShare == 0 {
		cfg.ClientBufferShare = cfg.BufferBudget / 4
	}
	if cfg.BufferWait == 0 {
		cfg.BufferWait = 10 * time.Second
	}
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = time.Minute
	}
	if cfg.MinDataRate == 0 {
		cfg.MinDataRate = 1 << 10
	}
	if cfg.BackoffBase == 0 {
		cfg.BackoffBase = 50 * time.Millisecond
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	store, err := objstore.New(objstore.Options{
		Credentials: cfg.Credentials, CAFile: cfg.CAFile, SDKDefaultChecksums: cfg.SDKDefaultChecksums, HTTPClient: cfg.HTTPClient,
		CallTimeout: cfg.CallTimeout, DataTimeout: cfg.DataTimeout, TracerProvider: cfg.TracerProvider,
	})
	if err != nil {
		return nil, err
	}
	return &Server{cfg: cfg, alloc: alloc, store: store, mime: mimecheck.New(cfg.AllowedContentTypes), log: log,
		codec:       newChunkCodec(),
		buffers:     newBufferBudget(cfg.BufferBudget, cfg.ClientBufferShare, cfg.BufferWait, cfg.Metrics, log),
		inFlight:    newInFlight(cfg.ClientInFlightBytes, cfg.IdleTimeout/2),
		targets:     newTargetCache(cfg.Now),
		reportSlots: make(chan struct{}, maxBackgroundReports)}, nil
}

// Register adds the UploadService to r.
func (s *Server) Register(r grpc.ServiceRegistrar) { uploadv1.RegisterUploadServiceServer(r, s) }

// Close waits for outcome reports and cleanups still in flight and drops
// idle S3 connections.
func (s *Server) Close() error {
	s.reports.Wait()
	s.background.Wait()
	s.store.Close()
	return nil
}

func bucketTarget(t *allocatorv1.BucketTarget) objstore.Target {
	return objstore.Target{ID: t.GetId(), Name: t.GetName(), Endpoint: t.GetEndpoint(), Region: t.GetRegion(),
		CredentialsRef: t.GetCredentialsRef(), PathStyle: t.GetPathStyle()}
}

// report feeds the shared health model; failures to report are logged
// only, since health is advisory.
func (s *Server) report(ctx context.Context, bucketID string, err error, f objstore.Failure, latency time.Duration) {
	out := allocatorv1.Outcome_OUTCOME_SUCCESS
	msg := ""
	if err != nil {
		msg = err.Error()
		switch f {
		case objstore.NotBucketFault:
			return // our request or our caller, not the bucket
		case objstore.BucketThrottled:
			out = allocatorv1.Outcome_OUTCOME_THROTTLED
		case objstore.BucketTimeout:
			out = allocatorv1.Outcome_OUTCOME_TIMEOUT
		default:
			out = allocatorv1.Outcome_OUTCOME_ERROR
		}
	}
	req := &allocatorv1.ReportOutcomeRequest{BucketId: bucketID, Outcome: out, Latency: durationpb.New(latency), Error: msg}
	ctx = context.WithoutCancel(ctx)
	if err == nil {
		// A success only feeds latency and the score: the upload need not
		// wait a round trip to the allocator for it. Failures stay inline,
		// so a failing bucket cools down before the next attempt.
		select {
		case s.reportSlots <- struct{}{}:
			s.reports.Go(func() {
				defer func() { <-s.reportSlots }()
				s.sendReport(ctx, req)
			})
			return
		default:
		}
	}
	s.sendReport(ctx, req)
}

func (s *Server) sendReport(ctx context.Context, req *allocatorv1.ReportOutcomeRequest) {
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := s.alloc.ReportOutcome(rctx, req); err != nil {
		s.log.Warn("could not report bucket outcome", "bucket", req.GetBucketId(), "error", err.Error())
	}
}

// release returns a reservation's capacity, even after the client left.
func (s *Server) release(ctx context.Context, a *allocatorv1.AllocateResponse) {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if _, err := s.alloc.Release(rctx, &allocatorv1.ReleaseRequest{ReservationId: a.GetReservationId(), BucketId: a.GetBucket().GetId()}); err != nil {
		// The reservation's lease returns the capacity within its TTL.
		s.log.Warn("release failed; capacity returns when the reservation expires", "reservation", a.GetReservationId(), "error", err.Error())
	}
}

// backoff waits before try attempt+1 of a failover or a Commit.
func (s *Server) backoff(ctx context.Context, attempt int) error {
	return backoff.Wait(ctx, s.cfg.BackoffBase, attempt)
}

// DeleteObject implements UploadService. Deleting does not return
// capacity: the monthly budget counts bytes written in the period.
func (s *Server) DeleteObject(ctx context.Context, req *uploadv1.DeleteObjectRequest) (*uploadv1.DeleteObjectResponse, error) {
	b, err := s.lookup(ctx, req.GetBucketId(), req.GetKey())
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	// S3 answers a delete the same whether an object was there or not;
	// asked first (a HEAD, billed as a read), a name that holds nothing is
	// NOT_FOUND, as the API promises for an unknown object.
	if _, err := b.Head(ctx, req.GetKey()); err != nil {
		return nil, toStatus(ctx, s.storeErr(ctx, b, req.GetKey(), b.Missing(ctx, err), "look up the object"))
	}
	if err := b.Delete(ctx, req.GetKey()); err != nil {
		return nil, toStatus(ctx, s.storeErr(ctx, b, req.GetKey(), err, "delete"))
	}
	return &uploadv1.DeleteObjectResponse{}, nil
}

// QueryUpload implements UploadService.
func (s *Server) QueryUpload(ctx context.Context, req *uploadv1.QueryUploadRequest) (*uploadv1.QueryUploadResponse, error) {
	return nil, toStatus(ctx, fmt.Errorf("%w: resumable upload sessions are not enabled on this server yet", errUnsupported))
}

func (s *Server) lookup(ctx context.Context, bucketID, key string) (*objstore.Bucket, error) {
	if bucketID == "" {
		return nil, badField("bucket_id", "bucket_id is required")
	}
	if !config.ValidBucketID(bucketID) {
		// No bucket has such an id; the allocator need not be asked.
		return nil, badField("bucket_id", "bucket ids are %s; this one (%d bytes) is not", config.BucketIDRule, len(bucketID))
	}
	if key == "" {
		return nil, badField("key", "key is required")
	}
	// Upload wrote no key that breaks these rules; checked here, a key a
	// bucket would refuse (too long, say) is the caller's error, not an
	// internal one.
	if err := objectkey.Readable(key); err != nil {
		return nil, badField("key", "%v", err)
	}
	t := s.targets.get(bucketID)
	if t == nil {
		resp, err := s.alloc.LookupBucket(ctx, &allocatorv1.LookupBucketRequest{BucketId: bucketID})
		if err != nil {
			return nil, s.unreachable(ctx, err, "the bucket could not be looked up")
		}
		t = resp.GetBucket()
		s.targets.put(bucketID, t)
	}
	return s.bucket(t)
}

// bucket returns a handle on t. Failing, this replica lacks the bucket's
// keys (its secret is not mounted here): another replica or another
// bucket may do, and the bucket itself is not at fault.
func (s *Server) bucket(t *allocatorv1.BucketTarget) (*objstore.Bucket, error) {
	b, err := s.store.Bucket(bucketTarget(t))
	if err != nil {
		// The client is told which bucket, not where its keys should be
		// (the credentials reference and variables name the setup).
		s.log.Error("this replica cannot reach a bucket", "bucket", t.GetId(), "error", err.Error())
		return nil, bucketTroublef("this upload replica has no keys for bucket %s (an operator must give it the bucket's credentials)", t.GetId())
	}
	return b, nil
}

func (s *Server) storeErr(ctx context.Context, b *objstore.Bucket, key string, err error, op string) error {
	if objstore.IsNoSuchBucket(err) {
		// Not the object's absence: the bucket's spec names a bucket its
		// endpoint does not have (a typo, a renamed or deleted bucket).
		s.log.Error("a bucket's S3 bucket does not exist", "bucket", b.Target.ID, "name", b.Target.Name, "key", key, "op", op, "error", err.Error())
		return bucketTroublef("could not %s in bucket %s: its S3 bucket does not exist at its endpoint, so its objects cannot be reached until an operator corrects the bucket's spec", op, b.Target.ID)
	}
	if objstore.IsNotFound(err) {
		return fmt.Errorf("%w: no such object in bucket %s", errNotFound, b.Target.ID)
	}
	if f := objstore.Classify(ctx, err); f != objstore.NotBucketFault {
		s.logBucketFault(b, key, op, err)
		return bucketFailed(err, fmt.Sprintf("could not %s in bucket %s: ", op, b.Target.ID), "")
	}
	return fmt.Errorf("%s in bucket %s: %w", op, b.Target.ID, err)
}

// logBucketFault logs a bucket's failure of a read or delete with the
// SDK's whole text, which the client's few words leave out. (An upload's
// failures are logged once, as the upload's.)
func (s *Server) logBucketFault(b *objstore.Bucket, key, op string, err error) {
	s.log.Warn("a bucket failed a call", "bucket", b.Target.ID, "key", key, "op", op, "error", err.Error())
}
