package uploader

import (
	"bytes"
	"cmp"
	"context"
	"crypto/md5"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"maps"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	allocatorv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/allocator/v1"
	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/errinfo"
	"github.com/bucketlb/bucketlb/pkg/mimecheck"
	"github.com/bucketlb/bucketlb/pkg/objectkey"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/ratelimit"
	"github.com/bucketlb/bucketlb/pkg/telemetry"
)

var sha256Hex = regexp.MustCompile(`^[0-9a-f]{64}$`)

// writeIDKey is the user metadata an object written under a client's key
// carries: a random id of the upload that wrote it. It is stripped from
// what GetObject returns.
const writeIDKey = "bucketlb-write-id"

// maxShortField bounds the header's identifiers and its content type, so a
// client cannot send (or have echoed back in an error) a megabyte of one.
const maxShortField = 256

// sha256Key is the user metadata that carries an object's sha256 when the
// service knows it before the write (always for one PUT, for multipart when
// the client declared it), so a reader can check the bytes it gets.
// GetObject returns it as ObjectInfo.sha256, not as metadata.
const sha256Key = "bucketlb-sha256"

// serviceKeys are the user metadata keys the service writes itself: a
// client may not send them, and GetObject does not return them as metadata.
var serviceKeys = []string{writeIDKey, sha256Key}

// maxMetadata is the user metadata a client may send: S3's 2 KB of keys
// and values, less the service's entries (the write id's 26 characters of
// rand.Text, the sha256's 64 hex digits).
const maxMetadata = 2048 - len(writeIDKey) - 26 - len(sha256Key) - 64

// serviceMetadataHeaderBytes is what the service's own metadata entries
// take of a write's headers.
var serviceMetadataHeaderBytes = objstore.MetadataHeaderBytes(map[string]string{
	writeIDKey: strings.Repeat("x", 26), sha256Key: strings.Repeat("0", 64),
})

// upload is the state of one Upload call.
type upload struct {
	hdr     *uploadv1.UploadHeader
	key     string
	writeID string // set under a client's key, see writeIDKey
	size    int64
	in      objstore.PutInput
	reader  *chunkReader
	head    []byte // first bytes, already read for sniffing
	// claim holds the idempotency key while the upload runs, when it
	// writes under a client's key: a second upload under the same key
	// would replace the object the first one records.
	claim *allocatorv1.IdempotencyClaim
	// digest is the sha256 of the received object once known before its
	// write (a small object, buffered whole).
	digest string
	// bucket is the bucket last granted, for the log of a failure.
	bucket string
	// granted is when the last Allocate answered, and ttl the lifetime
	// its reservation had left then: renewals are timed from the grant,
	// however long the work before their start took.
	granted time.Time
	ttl     time.Duration
}

// sha256 is the object's sha256 as far as known before its write: the
// client's declared one, else the one computed from a buffered object.
func (u *upload) sha256() string { return cmp.Or(u.hdr.GetSha256(), u.digest) }

// ownKey reports a key the service generated (128 random bits): no other
// writer uses it, so cleanup may remove whatever stands under it.
func (u *upload) ownKey() bool { return u.hdr.GetKey() == "" }

// Upload implements UploadService.
func (s *Server) Upload(stream uploadv1.UploadService_UploadServer) error {
	ctx := stream.Context()
	defer s.cfg.Metrics.TrackUploadStream(ctx)()
	start := time.Now()
	var u *upload
	resp, err := s.upload(ctx, stream, &u)
	if err != nil {
		st := toStatus(ctx, err)
		attrs := []any{"code", status.Code(st).String(), "error", status.Convert(st).Message(), "cause", err.Error(),
			"client", ratelimit.ClientID(ctx)}
		if u != nil {
			attrs = append(attrs, "key", u.key, "bucket", u.bucket, "idempotency_key", u.hdr.GetIdempotencyKey())
		}
		// The caller's mistakes and departures are routine; the rest is
		// the service's to answer for, and log alerts look for it.
		level := slog.LevelWarn
		switch o := telemetry.Outcome(st); {
		case callerFault(err), o == telemetry.OutcomeRejected, o == telemetry.OutcomeCanceled:
			level = slog.LevelInfo
		}
		s.log.Log(ctx, level, "upload failed", attrs...)
		s.cfg.Metrics.RecordUpload(ctx, telemetry.Upload{Duration: time.Since(start), Err: st, CallerFault: callerFault(err)})
		return st
	}
	s.cfg.Metrics.RecordUpload(ctx, telemetry.Upload{
		Bucket: resp.GetBucketId(), Bytes: resp.GetSize(), Duration: time.Since(start), Replay: resp.GetReplayed(),
	})
	return stream.SendAndClose(resp)
}

// callerFault reports errors the caller brought about whose codes do not
// say so: a client cut off for sending nothing or too little
// (DEADLINE_EXCEEDED), one over its own share of the buffers
// (RESOURCE_EXHAUSTED), a second upload under a running upload's
// idempotency key (ABORTED, the only use of that code here), a feature
// this service does not offer (UNIMPLEMENTED: resumable uploads).
func callerFault(err error) bool {
	var sf *shareFull
	return errors.Is(err, errIdle) || errors.As(err, &sf) || status.Code(err) == codes.Aborted || errors.Is(err, errUnsupported)
}

// upload runs one upload; *seen is its state once its header passed, for
// the log of a failure.
func (s *Server) upload(ctx context.Context, stream uploadv1.UploadService_UploadServer, seen **upload) (*uploadv1.UploadResponse, error) {
	rcv := newReceiver(stream, s.cfg.IdleTimeout, s.codec)
	defer rcv.close()
	first := &uploadv1.UploadRequest{}
	err := rcv.do(first)
	if errors.Is(err, io.EOF) {
		return nil, badRequest("the stream ended before a header; send a header as the first message")
	}
	if err != nil {
		return nil, err
	}
	hdr := first.GetHeader()
	if hdr == nil {
		if first.GetPayload() == nil {
			return nil, badRequest("the first message must be a header, but it was empty")
		}
		return nil, badRequest("the first message must be a header, but it was a data chunk")
	}
	u, err := s.validate(hdr)
	if err != nil {
		return nil, err
	}
	*seen = u
	// An upload that claims its key learns of a record from its Allocate
	// (see allocate), which spares the first try, the usual case, this
	// round trip; a replay then answers once the head of the data is in.
	small := u.size <= s.cfg.PartSize
	if hdr.GetIdempotencyKey() != "" && u.claim == nil && (hdr.GetSha256() != "" || !small) {
		// Answered at once, the client's remaining chunks are discarded.
		// A small object without a declared sha256 is checked once
		// received (uploadSmall): other bytes of the same size under a
		// recorded key must not be told they are stored.
		if resp, err := s.recorded(ctx, u); resp != nil || err != nil {
			return resp, err
		}
	}
	// Checked before any byte is read or reserved: the declared size is
	// what the allocator will hold for as long as the upload runs.
	done, err := s.inFlight.take(ratelimit.ClientID(ctx), max(u.size, 1))
	if err != nil {
		return nil, err
	}
	defer done()
	need := u.size
	if !small {
		need = 2 * s.partSize(u.size) // the two part buffers
	}
	// The budget comes before the first chunk is read: an upload waiting
	// for it then holds only its flow-control window in gRPC's transport,
	// not a whole received chunk the budget does not count.
	release, err := s.buffers.acquire(ctx, need)
	if err != nil {
		return nil, err
	}
	defer release()
	u.reader = s.newChunkReader(rcv, u.size)
	defer u.reader.Close()
	u.head = make([]byte, min(u.size, mimecheck.SniffLen))
	if err := u.reader.fill(u.head); err != nil {
		return nil, err
	}
	if err := s.mime.CheckData(hdr.GetContentType(), u.head); err != nil {
		return nil, badField("header.content_type", "%v", err)
	}
	var resp *uploadv1.UploadResponse
	if small {
		resp, err = s.uploadSmall(ctx, u)
	} else {
		resp, err = s.uploadLarge(ctx, u)
	}
	var rp *replayed
	switch {
	case errors.As(err, &rp):
		return rp.resp, nil
	case err != nil && u.claim != nil:
		s.endClaim(ctx, u.claim)
	}
	return resp, err
}

func (s *Server) validate(hdr *uploadv1.UploadHeader) (*upload, error) {
	// Tools differ in case (PowerShell's Get-FileHash prints upper case);
	// the service compares and answers in lower case.
	hdr.Sha256 = strings.ToLower(hdr.GetSha256())
	ctProblem := objstore.ContentTypeProblem(hdr.GetContentType())
	switch {
	case hdr.GetResumable() || hdr.GetUploadId() != "" || hdr.GetOffset() != 0:
		return nil, fmt.Errorf("%w: resumable upload sessions are not enabled on this server yet", errUnsupported)
	case len(hdr.GetIdempotencyKey()) > maxShortField:
		return nil, badField("header.idempotency_key", "the idempotency key is longer than %d bytes", maxShortField)
	case len(hdr.GetAffinityKey()) > maxShortField:
		return nil, badField("header.affinity_key", "the affinity key is longer than %d bytes", maxShortField)
	case len(hdr.GetContentType()) > maxShortField:
		// Checked before the allowlist, whose errors quote the type.
		return nil, badField("header.content_type", "the content type is longer than %d bytes", maxShortField)
	case ctProblem != "":
		return nil, badField("header.content_type", "%s", ctProblem)
	case hdr.GetSize() < 0:
		return nil, badField("header.size", "the header must declare the object's size in bytes, 0 for an empty object (got %d)", hdr.GetSize())
	case hdr.GetSize() > s.cfg.MaxObjectSize:
		return nil, badField("header.size", "the object is %d bytes; this service accepts at most %d", hdr.GetSize(), s.cfg.MaxObjectSize)
	case hdr.GetSha256() != "" && !sha256Hex.MatchString(hdr.GetSha256()):
		return nil, badField("header.sha256", "sha256 must be 64 hex characters")
	}
	if err := s.mime.CheckDeclared(hdr.GetContentType()); err != nil {
		return nil, badField("header.content_type", "%v", err)
	}
	key := hdr.GetKey()
	if key == "" {
		if hdr.GetNameHint() == "" {
			return nil, badField("header.key", "give a key or a name_hint to build one from")
		}
		key = objectkey.FromName(hdr.GetNameHint(), s.cfg.Now())
	}
	if err := objectkey.Validate(key); err != nil {
		field := "header.key"
		if hdr.GetKey() == "" {
			field = "header.name_hint"
		}
		return nil, badField(field, "%v", err)
	}
	// The size first: the other metadata errors quote a key.
	metaBytes := 0
	for k, v := range hdr.GetMetadata() {
		metaBytes += len(k) + objstore.EncodedLen(v)
	}
	if metaBytes > maxMetadata {
		return nil, badField("header.metadata", "the metadata takes %d bytes; at most %d are allowed (S3 stores 2 KB of user metadata, and the service keeps a little of it; a value beyond ASCII counts as its RFC 2047 encoding, about 4/3 of its UTF-8 bytes)", metaBytes, maxMetadata)
	}
	seen := make(map[string]string, len(hdr.GetMetadata()))
	for k := range hdr.GetMetadata() {
		for _, sk := range serviceKeys {
			if strings.EqualFold(k, sk) {
				return nil, badField("header.metadata", "metadata key %q is reserved for the service", k)
			}
		}
		// Buckets keep metadata keys in lower case: of two keys that
		// differ only in case, one would silently replace the other.
		lk := strings.ToLower(k)
		if other, dup := seen[lk]; dup {
			a, b := min(k, other), max(k, other)
			return nil, badField("header.metadata", "metadata keys %q and %q differ only in case; buckets store keys in lower case, so one would replace the other", a, b)
		}
		seen[lk] = k
	}
	// Metadata travels as x-amz-meta-* headers: objstore would refuse one
	// that cannot, but only after the data arrived. The header budget is
	// checked here with the service's own entries, before objstore's check
	// without them, which would quote a smaller number.
	if n := objstore.MetadataHeaderBytes(hdr.GetMetadata()) + serviceMetadataHeaderBytes; n > objstore.MaxMetadataHeaderBytes {
		return nil, badField("header.metadata", "the %d metadata entries would take %d bytes of request headers with the service's own, and at most %d fit (each entry costs its key twice and about 30 bytes more): send fewer entries",
			len(hdr.GetMetadata()), n, objstore.MaxMetadataHeaderBytes)
	}
	if p := objstore.MetadataProblem(hdr.GetMetadata()); p != "" {
		return nil, badField("header.metadata", "%s", p)
	}
	md := maps.Clone(hdr.GetMetadata())
	if md == nil {
		md = map[string]string{}
	}
	u := &upload{
		hdr: hdr, key: key, size: hdr.GetSize(),
		in: objstore.PutInput{Key: key, ContentType: hdr.GetContentType(), Metadata: md},
	}
	if !u.ownKey() {
		// Under a client's key an older object may stand: the id tells
		// this upload's object from it (see removeOurs).
		u.writeID = rand.Text()
		md[writeIDKey] = u.writeID
		if k := hdr.GetIdempotencyKey(); k != "" {
			u.claim = &allocatorv1.IdempotencyClaim{IdempotencyKey: k, Token: u.writeID}
		}
	}
	if d := hdr.GetSha256(); d != "" {
		md[sha256Key] = d // a mismatch fails the upload before it completes
	}
	return u, nil
}

func (s *Server) allocate(ctx context.Context, u *upload, exclude []string) (*allocatorv1.AllocateResponse, error) {
	// A reservation holds at least one byte, so an empty object reserves
	// one while it is written and commits 0.
	a, err := s.alloc.Allocate(ctx, &allocatorv1.AllocateRequest{
		Size: max(u.size, 1), AffinityKey: u.hdr.GetAffinityKey(), ExcludeBucketIds: exclude, Claim: u.claim,
	})
	if status.Code(err) == codes.AlreadyExists && u.claim != nil {
		// Another upload under the key finished after this one began.
		resp, rerr := s.recorded(ctx, u)
		switch {
		case rerr != nil:
			return nil, rerr
		case resp != nil:
			return nil, &replayed{resp: resp}
		}
	}
	if err == nil {
		u.bucket = a.GetBucket().GetId()
		u.granted, u.ttl = time.Now(), time.Until(a.GetExpiresAt().AsTime())
	}
	return a, s.unreachable(ctx, err, "nothing was stored")
}

// recorded answers an upload whose idempotency key has a record: with
// that record, as a replay, or with the error that the key names another
// object. Both are nil when the key has no record.
func (s *Server) recorded(ctx context.Context, u *upload) (*uploadv1.UploadResponse, error) {
	rec, err := s.alloc.GetUploadRecord(ctx, &allocatorv1.GetUploadRecordRequest{IdempotencyKey: u.hdr.GetIdempotencyKey()})
	if status.Code(err) == codes.NotFound {
		return nil, nil
	}
	if err != nil {
		return nil, s.unreachable(ctx, err, "nothing was stored")
	}
	if err := reusedFor(rec.GetRecord(), u.size, u.sha256(), u.hdr.GetKey()); err != nil {
		return nil, err
	}
	return replay(rec.GetRecord()), nil
}

// replayed ends an upload with the result another upload under its
// idempotency key recorded.
type replayed struct{ resp *uploadv1.UploadResponse }

func (r *replayed) Error() string { return "an upload under this idempotency key already finished" }

// endClaim gives the upload's idempotency key back after the upload
// failed, so a retry need not wait for the claim to lapse. It runs after
// the client may have gone, and a claim it cannot end lapses by itself.
func (s *Server) endClaim(ctx context.Context, cl *allocatorv1.IdempotencyClaim) {
	ectx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if _, err := s.alloc.EndClaim(ectx, &allocatorv1.EndClaimRequest{Claim: cl}); err != nil {
		s.log.Warn("could not give back an idempotency claim; it lapses with the reservation TTL", "error", err.Error())
	}
}

// openGranted returns a handle on the bucket the allocator granted. When
// this replica lacks the bucket's keys, it gives the reservation back and
// counts the failover, so the caller can ask for another bucket.
func (s *Server) openGranted(ctx context.Context, a *allocatorv1.AllocateResponse) (*objstore.Bucket, error) {
	b, err := s.bucket(a.GetBucket())
	if err != nil {
		s.release(ctx, a)
		s.cfg.Metrics.RecordFailover(ctx, a.GetBucket().GetId(), telemetry.FailoverNoKeys)
		return nil, err
	}
	return b, nil
}

// uploadSmall buffers the object once and PUTs it, failing over to the
// next bucket the allocator picks when a bucket fails.
func (s *Server) uploadSmall(ctx context.Context, u *upload) (*uploadv1.UploadResponse, error) {
	body := make([]byte, u.size)
	copy(body, u.head)
	if err := u.reader.fill(body[len(u.head):]); err != nil {
		return nil, err
	}
	if err := u.reader.Finish(); err != nil {
		return nil, err
	}
	sum := sha256.Sum256(body)
	digest := hex.EncodeToString(sum[:])
	// Checked before anything is stored: a mismatch leaves nothing behind.
	if want := u.hdr.GetSha256(); want != "" && want != digest {
		return nil, badField("header.sha256", "sha256 of the received data is %s but the header declared %s", digest, want)
	}
	u.in.Metadata[sha256Key] = digest
	u.digest = digest
	if u.hdr.GetIdempotencyKey() != "" && u.claim == nil && u.hdr.GetSha256() == "" {
		if resp, err := s.recorded(ctx, u); resp != nil || err != nil {
			return resp, err
		}
	}
	var exclude []string
	var lastErr error
	for attempt := 0; attempt < s.cfg.MaxBucketAttempts; attempt++ {
		if attempt > 0 {
			if err := s.backoff(ctx, attempt-1); err != nil {
				return nil, err
			}
		}
		a, err := s.allocate(ctx, u, exclude)
		if err != nil {
			if lastErr != nil && status.Code(err) != codes.InvalidArgument {
				return nil, noOtherBucket(lastErr, exclude, err)
			}
			return nil, err
		}
		b, err := s.openGranted(ctx, a)
		if err != nil {
			lastErr = err
			exclude = append(exclude, a.GetBucket().GetId())
			continue
		}
		// A PUT may take longer than the reservation and the idempotency
		// claim live (a slow link, a slow bucket): they are renewed as
		// for a multipart upload, which stops the PUT if either is lost.
		// The client going does not stop it: its bytes are all here, and
		// a PUT cut off may still land after the removal that follows.
		putCtx, stopPut := context.WithCancelCause(context.WithoutCancel(ctx))
		renewDone := s.keepRenewing(putCtx, a, u, stopPut)
		start := time.Now()
		etag, err := b.Put(putCtx, u.in, body)
		took := time.Since(start)
		renewDone()
		lost := context.Cause(putCtx)
		stopPut(nil)
		if err == nil {
			return s.commit(ctx, u, a, b, written{etag: etag, sha256: digest, took: took})
		}
		if lost != nil {
			// The renewal gave up: not the bucket's fault, and the PUT,
			// cut short, may have landed.
			return s.dropLost(ctx, b, u, a, lost)
		}
		// The PUT ran to its own end, whether or not the client stayed:
		// how it failed is the bucket's doing (or its refusal), and
		// health must hear of it either way.
		f := objstore.Classify(context.WithoutCancel(ctx), err)
		s.report(ctx, a.GetBucket().GetId(), err, f, took)
		if objstore.MayHaveLanded(err) {
			s.removeOurs(ctx, b, u, mayHaveLanded)
		}
		s.release(ctx, a)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if f == objstore.NotBucketFault {
			return nil, fmt.Errorf("bucket %s rejected the object: %w", a.GetBucket().GetId(), err)
		}
		s.log.Warn("bucket failed; trying another", "bucket", a.GetBucket().GetId(), "attempt", attempt+1, "error", err.Error())
		lastErr = err
		exclude = append(exclude, a.GetBucket().GetId())
		s.cfg.Metrics.RecordFailover(ctx, a.GetBucket().GetId(), telemetry.FailoverBucketFailed)
	}
	return nil, bucketFailed(lastErr, fmt.Sprintf("the upload failed on %d buckets, the last (%s) with ", len(exclude), exclude[len(exclude)-1]), "")
}

// An upload's Commit is tried commitAttempts times within commitTimeout;
// the tries run on after the client has gone.
const (
	commitTimeout = 30 * time.Second
	// Tries of a Commit, each on the next replica (gRPC does not retry
	// Commit, see AllocatorServiceConfig).
	commitAttempts = 5
	// completeRetries is how often a Complete the bucket refused outright
	// is sent again.
	completeRetries = 2
)

// mayHaveLanded is the leftover message when what a write whose answer was
// lost may have stored cannot be removed.
const mayHaveLanded = "could not remove a possibly written object"

// dropLost ends an upload whose renewal lost its reservation or its
// idempotency claim (lost says which): what it wrote goes, and its
// capacity goes back.
func (s *Server) dropLost(ctx context.Context, b *objstore.Bucket, u *upload, a *allocatorv1.AllocateResponse, lost error) (*uploadv1.UploadResponse, error) {
	s.removeOurs(ctx, b, u, "could not remove an object whose reservation or claim was lost")
	s.release(ctx, a)
	return nil, lost
}

// removeOurs removes the object this upload wrote, or may have written,
// so the bucket keeps no object its usage does not count; msg says why
// for the leftover count if that fails. A key the service generated
// belongs to this upload alone. Under a client's key another object may
// be there, even one with the same bytes: an older one a write that never
// landed left in place, or a later upload's, committed and answered OK.
// It goes only if it carries this upload's write id.
func (s *Server) removeOurs(ctx context.Context, b *objstore.Bucket, u *upload, msg string) {
	var err error
	if u.ownKey() {
		err = b.Delete(ctx, u.key)
	} else {
		_, err = b.DeleteIf(ctx, u.key, func(info objstore.ObjectInfo) bool { return info.Metadata[writeIDKey] == u.writeID })
	}
	if err != nil {
		s.leftover(ctx, b.Target.ID, u.key, telemetry.LeftoverObject, msg, err)
	}
}

// leftover logs and counts what a failed upload may have left in a bucket
// because removing it failed (err) or could not be tried (nil), so that
// operators learn of uncounted objects and open multipart uploads.
func (s *Server) leftover(ctx context.Context, bucket, key string, kind telemetry.LeftoverKind, msg string, err error) {
	// "leftover" is the same on every such line, for the runbook's search.
	attrs := []any{"leftover", string(kind), "bucket", bucket, "key", key}
	if err != nil {
		attrs = append(attrs, "error", err.Error())
	}
	s.log.Warn(msg, attrs...)
	s.cfg.Metrics.RecordLeftover(ctx, bucket, kind)
}

// written is what a bucket answered to the write that stored an object.
type written struct {
	etag, sha256 string
	took         time.Duration // per request, for the bucket's health
}

// commit records usage and answers; if it cannot, it removes the object
// and returns the capacity, so a client never sees success for
// bytes that are not counted, nor leaves uncounted bytes behind. The
// Commit also carries the write's success to the health model, which
// saves the hot path a ReportOutcome call; if no Commit gets through, the
// success is reported on its own.
func (s *Server) commit(ctx context.Context, u *upload, a *allocatorv1.AllocateResponse, b *objstore.Bucket, w written) (*uploadv1.UploadResponse, error) {
	remove := func() { s.removeOurs(ctx, b, u, "could not remove an object whose usage is not counted") }
	req := &allocatorv1.CommitRequest{
		ReservationId: a.GetReservationId(), BucketId: a.GetBucket().GetId(), ReservedBytes: a.GetReservedBytes(),
		Size: u.size, Key: u.key, Etag: w.etag, Sha256: w.sha256, IdempotencyKey: u.hdr.GetIdempotencyKey(),
		WriteLatency: durationpb.New(w.took), BucketName: a.GetBucket().GetName(), Endpoint: a.GetBucket().GetEndpoint(),
	}
	// The commit runs to its end even if the client goes away meanwhile: a
	// Commit the allocator applied but whose answer was lost is settled by
	// retrying it, never by removing an object whose bytes are counted.
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), commitTimeout)
	defer cancel()
	var err error
	// mayHaveApplied: some try's answer was lost, not a refusal the
	// allocator marked as applying nothing (etcd out of space, say).
	mayHaveApplied := false
	for attempt := 0; attempt < commitAttempts; attempt++ {
		// Commit is idempotent, so an ambiguous failure is simply retried.
		var cr *allocatorv1.CommitResponse
		if cr, err = s.alloc.Commit(cctx, req); err == nil && cr.GetDuplicateOf() != nil {
			// A concurrent upload with the same idempotency key won. If it
			// wrote the same key of the same bucket, what stands there is
			// the object its record names (or, were the bytes different,
			// this upload's, which no removal could undo): it stays.
			dup := cr.GetDuplicateOf()
			if dup.GetBucketId() != a.GetBucket().GetId() || dup.GetKey() != u.key {
				remove()
			}
			s.release(ctx, a)
			if err := reusedFor(dup, u.size, w.sha256, u.hdr.GetKey()); err != nil {
				return nil, err
			}
			return replay(dup), nil
		}
		if err == nil {
			return &uploadv1.UploadResponse{
				BucketId: a.GetBucket().GetId(), BucketName: a.GetBucket().GetName(), Key: u.key,
				PublicUrl: objectkey.PublicURL(a.GetBucket().GetPublicUrl(), u.key), Size: u.size, Sha256: w.sha256, Etag: w.etag,
			}, nil
		}
		mayHaveApplied = mayHaveApplied || unanswered(err) && !errinfo.Has(err, errinfo.NotApplied)
		if !unanswered(err) || attempt == commitAttempts-1 || s.backoff(cctx, attempt) != nil {
			break
		}
	}
	s.release(ctx, a)
	s.report(ctx, a.GetBucket().GetId(), nil, objstore.NotBucketFault, w.took)
	if mayHaveApplied && u.hdr.GetIdempotencyKey() != "" {
		// The allocator may have applied the Commit and recorded this
		// object under the idempotency key; a retry with the key would
		// then be answered with it, so it must not be removed. If the
		// Commit did not apply, the object stays uncounted.
		s.leftover(ctx, a.GetBucket().GetId(), u.key, telemetry.LeftoverObject, "the allocator did not answer a Commit; the object stays for a retry with the idempotency key, uncounted if the Commit did not apply", err)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, status.Errorf(codes.Unavailable, "the object was written but the allocator did not answer whether its usage was recorded (%s); retry with the same idempotency key for the result", status.Convert(err).Message())
	}
	remove()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	return nil, unavailable("the object was written but its usage could not be recorded, so it was removed: %v", status.Convert(err).Message())
}

// unanswered reports an allocator call that may have been applied.
func unanswered(err error) bool {
	c := status.Code(err)
	return c == codes.Unavailable || c == codes.DeadlineExceeded
}

// reusedFor fails when an upload under an idempotency key is not the
// object the key already names: answering with the first object's result
// would tell the client a file it never stored is safe. Only what the
// upload states can differ: its size, and its sha256 and object key when
// given (a generated key is new on every try). The answer names what
// differs, never the recorded values: with them, anyone who learns a key
// could state the first object and be handed its location.
func reusedFor(rec *allocatorv1.UploadRecord, size int64, sha256, key string) error {
	var diffs []string
	if size != rec.GetSize() {
		diffs = append(diffs, "its size")
	}
	if sha256 != "" && sha256 != rec.GetSha256() {
		diffs = append(diffs, "its sha256")
	}
	if key != "" && key != rec.GetKey() {
		diffs = append(diffs, "its object key")
	}
	if len(diffs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: this idempotency key already names another object (this upload differs in %s); resend that object to get its result, or use a new key for a new object",
		errKeyReused, strings.Join(diffs, " and "))
}

func replay(r *allocatorv1.UploadRecord) *uploadv1.UploadResponse {
	return &uploadv1.UploadResponse{
		BucketId: r.GetBucketId(), BucketName: r.GetBucketName(), Key: r.GetKey(), PublicUrl: r.GetPublicUrl(),
		Size: r.GetSize(), Sha256: r.GetSha256(), Etag: r.GetEtag(), Replayed: true,
	}
}

// partSize keeps every part equal (R2 rejects unequal parts) and within
// S3's 10,000-part limit, rounded up to whole MiB.
func (s *Server) partSize(size int64) int64 { return partSizeFor(s.cfg.PartSize, size) }

// partSizeFor is the part size of an object of size bytes: base, or the
// least whole MiB that keeps it within 10,000 parts.
func partSizeFor(base, size int64) int64 {
	p := base
	if min := (size + 9999) / 10000; min > p {
		p = (min + (1<<20 - 1)) &^ (1<<20 - 1)
	}
	return p
}

// uploadLarge streams a multipart upload with equal parts in two part
// buffers, so memory stays at two parts per stream. A part's PUT starts as
// its first bytes arrive (sendPart), so while one part is still uploading
// the next is already arriving and uploading too: two parts in flight, as
// a client holding the whole object would have.
func (s *Server) uploadLarge(ctx context.Context, u *upload) (*uploadv1.UploadResponse, error) {
	partSize := s.partSize(u.size)
	m, err := s.startMultipart(ctx, u)
	if err != nil {
		return nil, err
	}
	a, b, mpID, upCtx, cancel, renewDone := m.a, m.b, m.id, m.ctx, m.cancel, m.renewDone
	defer cancel(nil)
	defer renewDone()
	bucketID := a.GetBucket().GetId()
	abort := func() {
		if err := b.AbortMultipart(ctx, u.key, mpID); err != nil {
			s.leftover(ctx, bucketID, u.key, telemetry.LeftoverMultipart, "abort failed; the bucket's lifecycle rule removes the parts", err)
		}
	}
	fail := func(err error) (*uploadv1.UploadResponse, error) {
		abort()
		// Renewals end before the release: one applied after it would
		// bring the reservation back to hold the room for a TTL.
		renewDone()
		s.release(ctx, a)
		return nil, err
	}
	// A renewal that stops the upload also ends a wait for the client.
	u.reader.stop = upCtx

	h := sha256.New()
	nParts := int((u.size + partSize - 1) / partSize)
	parts := make([]objstore.Part, nParts)
	free := make(chan []byte, 2)
	free <- make([]byte, partSize)
	free <- make([]byte, partSize)
	var wg sync.WaitGroup
	// Parts stream (see Config.BufferParts) until the client stalls one.
	var buffered atomic.Bool
	buffered.Store(!s.streamParts(bucketID))
	var spent atomic.Int64 // the bucket's time on the parts (see sendPart)
	headLeft := u.head
	// The whole-object sha256 runs beside the part's upload, not on the
	// goroutine reading the stream: parts are hashed in order (each waits
	// for the one before), and a buffer is reused once both are done.
	hashed := make(chan struct{})
	close(hashed)
	for i := 0; i < nParts; i++ {
		if upCtx.Err() != nil {
			break // a part failed: read no more of the client's data
		}
		var buf []byte
		select {
		case buf = <-free:
		case <-upCtx.Done():
		}
		if buf == nil {
			break
		}
		n := min(partSize, u.size-int64(i)*partSize)
		buf = buf[:n]
		c := copy(buf, headLeft)
		headLeft = headLeft[c:]
		var users atomic.Int32
		users.Store(2)
		done := func(data []byte) {
			if users.Add(-1) == 0 {
				free <- data[:cap(data)]
			}
		}
		md5sum := make(chan []byte, 1)
		var body *partBody
		if !buffered.Load() {
			// The PUT starts with the part's first bytes and reads the rest
			// as they arrive; a buffered part waits for all of them.
			body = newPartBody(buf, c, s.cfg.StreamStall)
		}
		wg.Add(1)
		go func(num int32, data []byte) {
			defer wg.Done()
			etag, err := s.sendPart(upCtx, b, u.key, mpID, num, data, md5sum, body, &buffered, &spent)
			if err != nil {
				// The first cause wins: a part that fails because the upload
				// already ended (the client went idle, another part failed)
				// changes nothing.
				cancel(bucketFailed(err, fmt.Sprintf("bucket %s failed during the upload (", bucketID), "), which was aborted; retry the upload"))
				return
			}
			parts[num-1] = objstore.Part{Number: num, ETag: etag}
			done(data)
		}(int32(i+1), buf)
		if err := fillHashingMD5(u.reader, buf, c, body, md5sum); err != nil {
			if body != nil {
				body.fail(err)
			}
			cancel(err)
			break
		}
		prev, mine := hashed, make(chan struct{})
		hashed = mine
		wg.Add(1)
		go func(data []byte) {
			defer wg.Done()
			<-prev
			hashWrite(h, data)
			close(mine)
			done(data)
		}(buf)
	}
	wg.Wait()
	if upCtx.Err() != nil {
		if ctx.Err() != nil {
			return fail(ctx.Err())
		}
		return fail(context.Cause(upCtx))
	}
	if err := u.reader.Finish(); err != nil {
		return fail(err)
	}
	digest := hex.EncodeToString(h.Sum(nil))
	if want := u.hdr.GetSha256(); want != "" && want != digest {
		return fail(badField("header.sha256", "sha256 of the received data is %s but the header declared %s; nothing was stored", digest, want))
	}
	completing := time.Now()
	// Once sent, the Complete runs to its answer even if the client goes:
	// cut off, it may still finish at the bucket after the cleanup below
	// looked, and leave an object nothing counts.
	etag, err := b.CompleteMultipart(context.WithoutCancel(ctx), u.key, mpID, parts)
	// A Complete the bucket refused outright (a 5xx or 429 answer: it did
	// not happen) is sent again, as a part would be, rather than throwing
	// away every byte of the upload. A repeat of one that did happen
	// finds no such upload, which the branch below settles.
	for try := 0; err != nil && try < completeRetries && !objstore.MayHaveLanded(err) && upCtx.Err() == nil &&
		objstore.Classify(context.WithoutCancel(ctx), err) != objstore.NotBucketFault; try++ {
		if s.backoff(context.WithoutCancel(ctx), try) != nil {
			break
		}
		etag, err = b.CompleteMultipart(context.WithoutCancel(ctx), u.key, mpID, parts)
	}
	// Per request, the bucket's time on the parts and the completion: not
	// the client's pace, which a slow sender would otherwise charge to
	// the bucket's latency.
	took := (time.Duration(spent.Load()) + time.Since(completing)) / time.Duration(nParts+1)
	if err != nil {
		// Not cut off by the client (see above): its failure is the bucket's.
		s.report(ctx, bucketID, err, objstore.Classify(context.WithoutCancel(ctx), err), took)
		failed := bucketFailed(err, fmt.Sprintf("completing the upload on bucket %s failed: ", bucketID), "")
		if !objstore.MayHaveLanded(err) && !objstore.IsNotFound(err) {
			return fail(failed)
		}
		// Perhaps completed with the answer lost (or, on a bucket that
		// retries internally, a second Complete found no such upload).
		// The abort goes first: once it finds the upload gone, a
		// Complete still running at the bucket has ended, and the object
		// it made is there for the removal to find.
		abort()
		s.removeOurs(ctx, b, u, mayHaveLanded)
		renewDone()
		s.release(ctx, a)
		return nil, failed
	}
	renewDone()
	if lost := context.Cause(upCtx); lost != nil && ctx.Err() == nil {
		// The renewal lost the reservation or the claim while the upload
		// was completed: the object must not stay, nor be committed.
		return s.dropLost(ctx, b, u, a, lost)
	}
	return s.commit(ctx, u, a, b, written{etag: etag, sha256: digest, took: took})
}

func hashWrite(h hash.Hash, p []byte) { _, _ = h.Write(p) }

// fillHashingMD5 fills buf[from:] from the stream while another goroutine
// computes the MD5 of all of buf (which R2 wants as Content-MD5, and which
// a streamed part's ETag must equal) a read behind, so the digest is ready
// about when the last byte arrives instead of costing the part's upload
// ~13 ms per 8 MiB afterwards. Each read asks for the whole rest of the
// part, so the codec can put every chunk that fits straight into buf, and
// is published to body (if the part streams). sum receives the digest, or
// is closed without one if the fill fails.
func fillHashingMD5(r *chunkReader, buf []byte, from int, body *partBody, sum chan<- []byte) error {
	steps := make(chan []byte, 64)
	var failed atomic.Bool
	go func() {
		h := md5.New()
		for p := range steps {
			hashWrite(h, p)
		}
		if failed.Load() {
			close(sum)
			return
		}
		sum <- h.Sum(nil)
	}()
	defer close(steps)
	if from > 0 {
		steps <- buf[:from]
	}
	for off := from; off < len(buf); {
		n, err := r.Read(buf[off:])
		if err != nil {
			failed.Store(true)
			return r.short(err)
		}
		steps <- buf[off : off+n]
		off += n
		if body != nil {
			body.filledTo(off)
		}
	}
	return nil
}

// multipart is a started multipart upload and what keeps it alive.
type multipart struct {
	a  *allocatorv1.AllocateResponse
	b  *objstore.Bucket
	id string
	// ctx ends when a renewal loses the reservation or the claim (its
	// cause says which) or cancel is called; renewDone stops renewals.
	ctx       context.Context
	cancel    context.CancelCauseFunc
	renewDone func()
}

// createMultipart opens the upload's multipart upload. The create is not
// cut off when upCtx ends (the client went, or a renewal failed): cut
// off, it may still open an upload whose id never comes back, which under
// a client's key nothing could then abort. Nor is it waited for: the
// upload ends at once, and the create's answer is awaited in the
// background (the SDK's call timeout bounds it), where an upload it
// opened is aborted by its id. pending says the create was left so.
func (s *Server) createMultipart(upCtx context.Context, b *objstore.Bucket, u *upload) (id string, pending bool, err error) {
	type created struct {
		id  string
		err error
	}
	answer := make(chan created, 1)
	cctx := context.WithoutCancel(upCtx)
	go func() {
		id, err := b.CreateMultipart(cctx, u.in)
		answer <- created{id, err}
	}()
	select {
	case r := <-answer:
		return r.id, false, r.err
	case <-upCtx.Done():
	}
	s.background.Go(func() {
		r := <-answer
		if r.err != nil {
			s.createFailed(cctx, b, u, r.err)
			return
		}
		if err := b.AbortMultipart(cctx, u.key, r.id); err != nil {
			s.leftover(cctx, b.Target.ID, u.key, telemetry.LeftoverMultipart, "abort of an upload whose client went during its create failed; the bucket's lifecycle rule removes it", err)
		}
	})
	return "", true, context.Cause(upCtx)
}

// createFailed cleans up after a create that failed: one whose answer was
// lost may have opened an upload with its id unknown.
func (s *Server) createFailed(ctx context.Context, b *objstore.Bucket, u *upload, err error) {
	switch {
	case objstore.MayHaveLanded(err) && u.ownKey():
		// The key was made for this upload alone, so whatever upload it
		// has is this one's.
		if _, aerr := b.AbortUploads(ctx, u.key); aerr != nil {
			s.leftover(ctx, b.Target.ID, u.key, telemetry.LeftoverMultipart, "could not abort a possibly created upload", aerr)
		}
	case objstore.MayHaveLanded(err):
		// Under a client's key another writer's upload may be open,
		// which an abort by key would break: one this upload may have
		// created is left to the bucket's lifecycle rule.
		s.leftover(ctx, b.Target.ID, u.key, telemetry.LeftoverMultipart, "a possibly created upload under a client's key is left to the bucket's lifecycle rule", nil)
	}
}

// startMultipart allocates and creates the multipart upload, failing over
// to other buckets: no part has been sent yet, so nothing is lost.
func (s *Server) startMultipart(ctx context.Context, u *upload) (*multipart, error) {
	var exclude []string
	var lastErr error
	for attempt := 0; attempt < s.cfg.MaxBucketAttempts; attempt++ {
		if attempt > 0 {
			if err := s.backoff(ctx, attempt-1); err != nil {
				return nil, err
			}
		}
		a, err := s.allocate(ctx, u, exclude)
		if err != nil {
			if lastErr != nil {
				return nil, noOtherBucket(lastErr, exclude, err)
			}
			return nil, err
		}
		b, err := s.openGranted(ctx, a)
		if err != nil {
			lastErr = err
			exclude = append(exclude, a.GetBucket().GetId())
			continue
		}
		// Renewals start before the create: a slow one (up to its call
		// timeout) must not let the reservation or the claim lapse.
		upCtx, cancel := context.WithCancelCause(ctx)
		renewDone := s.keepRenewing(upCtx, a, u, cancel)
		t0 := time.Now()
		id, pending, err := s.createMultipart(upCtx, b, u)
		if err == nil {
			return &multipart{a: a, b: b, id: id, ctx: upCtx, cancel: cancel, renewDone: renewDone}, nil
		}
		renewDone()
		// Classified before cancel: a create that failed while the
		// upload was still wanted is the bucket's to answer for.
		lost, f := context.Cause(upCtx), objstore.Classify(upCtx, err)
		cancel(nil)
		s.report(ctx, a.GetBucket().GetId(), err, f, time.Since(t0))
		if !pending {
			s.createFailed(ctx, b, u, err)
		}
		s.release(ctx, a)
		if lost != nil && ctx.Err() == nil {
			// A renewal lost the reservation or the claim: that, not the
			// create it ended or left behind, is the upload's failure.
			return nil, lost
		}
		if f == objstore.NotBucketFault {
			return nil, err
		}
		lastErr = err
		exclude = append(exclude, a.GetBucket().GetId())
		s.cfg.Metrics.RecordFailover(ctx, a.GetBucket().GetId(), telemetry.FailoverBucketFailed)
	}
	return nil, bucketFailed(lastErr, fmt.Sprintf("could not start the upload on %d buckets, the last (%s) with ", len(exclude), exclude[len(exclude)-1]), "")
}

// streamParts says whether parts for this bucket may stream: not when the
// operator asked for buffered parts, not with the SDK's trailer checksums,
// and not for a bucket whose part ETags proved not to be MD5s.
func (s *Server) streamParts(bucketID string) bool {
	_, plain := s.plainETags.Load(bucketID)
	return !s.cfg.BufferParts && !s.cfg.SDKDefaultChecksums && !plain
}

// sendPart uploads one part. Without body, it waits for the whole part
// and sends it buffered. With body, its PUT reads the part while it
// arrives; once the PUT is answered, the part's MD5 must equal the ETag,
// else the part is sent again, buffered, with Content-MD5 for the store to
// check.
func (s *Server) sendPart(ctx context.Context, b *objstore.Bucket, key, mpID string, num int32, data []byte, md5sum <-chan []byte, body *partBody, buffered *atomic.Bool, spent *atomic.Int64) (string, error) {
	// The part's MD5, once all of it has arrived. Without one the stream
	// broke: the reading goroutine ends the upload with the reason, which
	// is then the error to return.
	wholeMD5 := func() ([]byte, error) {
		select {
		case sum, ok := <-md5sum:
			if ok && ctx.Err() == nil {
				return sum, nil
			}
			<-ctx.Done()
		case <-ctx.Done():
		}
		return nil, context.Cause(ctx)
	}
	// spent adds up the bucket's own time: the part's requests, less what
	// a streamed one spent waiting for the client's bytes.
	sendBuffered := func(sum []byte, first int) (string, error) {
		t := time.Now()
		defer func() { spent.Add(int64(time.Since(t))) }()
		return s.uploadPart(ctx, b, key, mpID, num, data, sum, first)
	}
	if body == nil {
		sum, err := wholeMD5()
		if err != nil {
			return "", err
		}
		return sendBuffered(sum, 0)
	}
	select {
	case <-body.arrived:
	case <-ctx.Done():
	}
	t0 := time.Now()
	etag, err := b.UploadPartStream(ctx, key, mpID, num, body, int64(len(data)))
	stalled, waited := body.detach()
	elapsed := time.Since(t0)
	spent.Add(int64(elapsed - waited))
	// A PUT that spent most of its time waiting for the client's bytes
	// failed at the client's pace (a slow, steady sender outlasting the
	// data timeout), not the bucket's.
	slowClient := err != nil && waited*2 >= elapsed
	sum, cerr := wholeMD5()
	if cerr != nil {
		return "", cerr
	}
	first := 0
	switch got, isMD5 := objstore.PartETagMD5(etag); {
	case err == nil && isMD5 && bytes.Equal(got, sum):
		return etag, nil
	case err == nil && !isMD5:
		s.plainETags.Store(b.Target.ID, true)
		buffered.Store(true)
		s.log.Warn("bucket's part ETags are not MD5s; its parts go buffered with Content-MD5 from now on", "bucket", b.Target.ID, "etag", etag)
	case err == nil:
		first = 1
		err = fmt.Errorf("part %d stored with ETag %s, but its MD5 is %x: corrupted on the way; sending it again with Content-MD5", num, etag, sum)
		s.log.Warn("streamed part corrupted", "bucket", b.Target.ID, "key", key, "error", err.Error())
		s.report(ctx, b.Target.ID, err, objstore.BucketError, elapsed-waited)
	case stalled, slowClient:
		// The client's pace, not the bucket: the rest goes buffered.
		buffered.Store(true)
	default:
		first = 1
		f := objstore.Classify(ctx, err)
		s.report(ctx, b.Target.ID, err, f, elapsed-waited)
		if f == objstore.NotBucketFault {
			return "", err
		}
	}
	return sendBuffered(sum, first)
}

// uploadPart retries one whole part on the same bucket with backoff,
// attempts first..PartAttempts-1 (a failed streamed attempt was the first).
func (s *Server) uploadPart(ctx context.Context, b *objstore.Bucket, key, mpID string, num int32, data, md5sum []byte, first int) (string, error) {
	var err error
	for attempt := first; attempt < max(s.cfg.PartAttempts, first+1); attempt++ {
		if attempt > 0 {
			if berr := s.backoff(ctx, attempt-1); berr != nil {
				return "", berr
			}
		}
		t0 := time.Now()
		var etag string
		etag, err = b.UploadPartMD5(ctx, key, mpID, num, data, md5sum)
		if err == nil {
			return etag, nil
		}
		f := objstore.Classify(ctx, err)
		s.report(ctx, b.Target.ID, err, f, time.Since(t0))
		if f == objstore.NotBucketFault {
			return "", err
		}
	}
	return "", err
}

// keepRenewing renews the reservation every third of its lifetime until
// stopped. If the allocator says the reservation is lost, or its bucket
// removed, it cancels the upload: bytes no live reservation covers must
// not be committed. A renewal that fails is tried again soon, not a third
// of the lifetime later. An upload holding an idempotency claim stops
// when renewals keep failing into the second half of the claim's
// lifetime, and at the latest with a quarter of it left, whatever the
// count (its renewals are given up on in time for that): the claim could
// then lapse, and another upload under the key take it over and write
// the same object, which this one must not write over.
func (s *Server) keepRenewing(ctx context.Context, a *allocatorv1.AllocateResponse, u *upload, cancel context.CancelCauseFunc) func() {
	// The schedule counts from the grant, with the lifetime the grant
	// gave: renewals started late (after a slow create) are due at once,
	// and each still leaves the whole slack a failure after it needs.
	claim, ttl := u.claim, u.ttl
	if ttl <= 0 {
		ttl = 3 * time.Second
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	// held is until when the claim surely holds on the allocator's side:
	// a renewal's lifetime counts from before it was sent.
	held := u.granted.Add(ttl)
	every, again := max(ttl/3, 500*time.Millisecond), max(ttl/15, 100*time.Millisecond)
	go func() {
		defer close(done)
		t := time.NewTimer(time.Until(u.granted.Add(every)))
		defer t.Stop()
		failed := 0 // renewals failed in a row
		for {
			select {
			case <-stop:
				return
			case <-ctx.Done():
				return
			case <-t.C:
			}
			sent := time.Now()
			timeout := min(5*time.Second, ttl/3)
			if claim != nil {
				// Answered or given up on while the claim holds for more
				// than a quarter of its life: a slow answer must not
				// delay the stop past the lapse. A sixth leaves room for
				// one slow renewal and a retry.
				timeout = max(time.Millisecond, min(timeout, ttl/6, time.Until(held)-ttl/4))
			}
			rctx, rcancel := context.WithTimeout(ctx, timeout)
			_, err := s.alloc.Renew(rctx, &allocatorv1.RenewRequest{
				ReservationId: a.GetReservationId(), BucketId: a.GetBucket().GetId(), ReservedBytes: a.GetReservedBytes(), Claim: claim,
				BucketName: a.GetBucket().GetName(), Endpoint: a.GetBucket().GetEndpoint(),
			})
			rcancel()
			if err == nil {
				// The next one is due a period after this one was sent,
				// as held counts: a late answer must not use up the
				// slack a failure after it needs.
				held, failed = sent.Add(ttl), 0
				t.Reset(time.Until(sent.Add(every)))
				continue
			}
			failed++
			t.Reset(again)
			if errinfo.Has(err, errinfo.BucketChanged) {
				// Disabled or moved: a commit could not count the upload
				// there, so more parts would be paid for and thrown away.
				cancel(unavailable("%s; retry the upload", status.Convert(err).Message()))
				return
			}
			if status.Code(err) == codes.FailedPrecondition {
				cancel(unavailable("the reservation for this upload lapsed and the bucket has no room to grant it again"))
				return
			}
			if status.Code(err) == codes.NotFound {
				// An operator removed the bucket from bucketlb: no commit
				// can count the upload there, so sending it more parts
				// would only be paid for and thrown away.
				cancel(unavailable("bucket %s was removed from bucketlb during the upload; retry the upload", a.GetBucket().GetId()))
				return
			}
			if status.Code(err) == codes.Aborted {
				// The claim lapsed (the allocator was out of reach) and
				// another upload holds the key now: both must not write.
				cancel(retryLater(codes.Aborted, "this upload lost its hold on the idempotency key to another upload under the same key; retry to get the result"))
				return
			}
			if left := time.Until(held); claim != nil && (failed >= 2 && left < ttl/2 || left-again < ttl/4+100*time.Millisecond) {
				cancel(retryLater(codes.Unavailable, fmt.Sprintf("the allocator did not answer this upload's renewals (%s), so its hold on the idempotency key could lapse and another upload under the key write the same object; it stopped, and nothing of it is kept: retry with the same idempotency key",
					status.Convert(err).Message())))
				return
			}
			s.log.Warn("renew failed; will retry", "reservation", a.GetReservationId(), "error", err.Error())
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(stop); <-done }) }
}
