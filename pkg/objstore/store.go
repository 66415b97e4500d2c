package objstore

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"mime"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	//lint:ignore SA1019 its successor, smithy-go's smithyoteltracing adapter, is not served by the module proxy this project builds from; otelaws v0.72.0 works with the pinned SDK
	"go.opentelemetry.io/contrib/instrumentation/github.com/aws/aws-sdk-go-v2/otelaws"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/net/http/httpguts"
)

// Target says where a bucket lives (mirrors allocatorv1.BucketTarget so
// this package does not depend on the API).
type Target struct {
	ID, Name, Endpoint, Region, CredentialsRef string
	PathStyle                                  bool
}

// R2Endpoint is Cloudflare R2's S3 endpoint for an account. It is per
// account, not per bucket: the bucket is a request parameter, so every
// bucket of an account shares one client.
func R2Endpoint(accountID string) string {
	return "https://" + accountID + ".r2.cloudflarestorage.com"
}

// Options configure a Store.
type Options struct {
	Credentials Credentials
	// CAFile is an extra PEM bundle to trust (self-signed dev gateway).
	CAFile string
	// SDKDefaultChecksums keeps aws-sdk-go-v2's default request checksums
	// (CRC32 aws-chunked trailers). Off, checksums are sent only when an
	// operation requires them, plus our own Content-MD5: the setting that
	// works with every S3 server including R2 (see FIELD-NOTES).
	SDKDefaultChecksums bool
	// MaxConnsPerHost sizes the shared connection pool; default 64.
	MaxConnsPerHost int
	// CallTimeout bounds small calls (head, create, complete, delete);
	// default 30s. DataTimeout bounds calls carrying a body; default 5m.
	CallTimeout, DataTimeout time.Duration
	// ReadIdleTimeout is how long reading a Get body waits for the
	// bucket's next bytes before failing with ErrReadStalled; default
	// CallTimeout. A read as a whole has no bound: it goes at the pace
	// its reader takes the bytes.
	ReadIdleTimeout time.Duration
	// HTTPClient overrides the shared HTTP client (fault-injection tests).
	HTTPClient aws.HTTPClient
	// TracerProvider, when set, makes every S3 operation a client span
	// (otelaws), a child of the span in the caller's context. Nil adds no
	// middleware at all, so an untraced service pays nothing for it.
	TracerProvider trace.TracerProvider
	// CredentialsTTL is how long resolved keys are used before Credentials
	// is asked again, so rotated keys (a mounted secret the kubelet updates
	// in place) take effect without a restart; default 1 min.
	CredentialsTTL time.Duration
}

// Store hands out cached bucket handles.
type Store struct {
	opts      Options
	http      aws.HTTPClient
	transport *http.Transport

	now func() time.Time // time.Now; tests move it

	mu      sync.Mutex
	clients map[clientKey]*cachedClient
	swept   time.Time // when clients was last pruned
}

// clientIdle is how long a client may go unused before it is dropped: an
// account whose endpoint, region, key reference or path style changed is
// never asked for again under its old settings, and a client holds its
// middleware stack and signing keys.
const clientIdle = time.Hour

// cachedClient is an account's client and the keys it signs with.
type cachedClient struct {
	c        *s3.Client
	creds    aws.Credentials
	resolved time.Time
	used     time.Time
}

type clientKey struct {
	endpoint, region, ref string
	pathStyle             bool
}

// New builds a store with one shared HTTP client.
func New(opts Options) (*Store, error) {
	if opts.Credentials == nil {
		return nil, errors.New("objstore: credentials resolver is required")
	}
	if opts.MaxConnsPerHost == 0 {
		opts.MaxConnsPerHost = 64
	}
	if opts.CallTimeout == 0 {
		opts.CallTimeout = 30 * time.Second
	}
	if opts.DataTimeout == 0 {
		opts.DataTimeout = 5 * time.Minute
	}
	if opts.ReadIdleTimeout == 0 {
		opts.ReadIdleTimeout = opts.CallTimeout
	}
	if opts.CredentialsTTL == 0 {
		opts.CredentialsTTL = time.Minute
	}
	hc := opts.HTTPClient
	var tr *http.Transport
	if hc == nil {
		pool, err := rootCAs(opts.CAFile)
		if err != nil {
			return nil, err
		}
		tr = http.DefaultTransport.(*http.Transport).Clone()
		tr.MaxIdleConnsPerHost = opts.MaxConnsPerHost
		tr.MaxIdleConns = 4 * opts.MaxConnsPerHost
		tr.IdleConnTimeout = 90 * time.Second
		// A bucket that accepts the request and then says nothing (a stall)
		// fails fast enough for failover; Get bodies stream past this.
		tr.ResponseHeaderTimeout = opts.CallTimeout
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		hc = &http.Client{Transport: tr}
	}
	return &Store{opts: opts, http: hc, transport: tr, now: time.Now, clients: map[clientKey]*cachedClient{}}, nil
}

// rootCAs is the system pool plus AWS_CA_BUNDLE (honoured like the SDK's
// default config does) plus caFile.
func rootCAs(caFile string) (*x509.CertPool, error) {
	pool, err := x509.SystemCertPool()
	if err != nil || pool == nil {
		pool = x509.NewCertPool()
	}
	for _, f := range []string{os.Getenv("AWS_CA_BUNDLE"), caFile} {
		if f == "" {
			continue
		}
		pem, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("objstore: read CA bundle: %w", err)
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("objstore: no certificate in %s", f)
		}
	}
	return pool, nil
}

// Close drops idle connections, so servers can shut down promptly.
func (s *Store) Close() {
	if s.transport != nil {
		s.transport.CloseIdleConnections()
	}
}

// client returns the cached client for t's account, made anew when its
// credentials resolve to other keys than it was made with (checked every
// CredentialsTTL): the SDK keeps a signing key derived from the secret
// for as long as the access key id and the day stay the same, so only a
// new client picks up a rotated secret.
func (s *Store) client(t Target) (*s3.Client, error) {
	k := clientKey{t.Endpoint, t.Region, t.CredentialsRef, t.PathStyle}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	s.prune(now)
	cc := s.clients[k]
	if cc != nil {
		cc.used = now
	}
	if cc != nil && now.Sub(cc.resolved) < s.opts.CredentialsTTL {
		return cc.c, nil
	}
	cr, err := s.opts.Credentials.Resolve(t.CredentialsRef)
	switch {
	case err != nil && cc != nil:
		// Keep the keys that worked so far; ask again after the TTL.
		cc.resolved = now
		return cc.c, nil
	case err != nil:
		return nil, err
	case cc != nil && cr.AccessKeyID == cc.creds.AccessKeyID && cr.SecretAccessKey == cc.creds.SecretAccessKey:
		cc.resolved = now
		return cc.c, nil
	}
	c := s.newClient(t, cr)
	s.clients[k] = &cachedClient{c: c, creds: cr, resolved: now, used: now}
	return c, nil
}

// prune drops clients unused for clientIdle, at most once per clientIdle.
// Called with s.mu held.
func (s *Store) prune(now time.Time) {
	if now.Sub(s.swept) < clientIdle {
		return
	}
	s.swept = now
	for k, cc := range s.clients {
		if now.Sub(cc.used) >= clientIdle {
			delete(s.clients, k)
		}
	}
}

func (s *Store) newClient(t Target, cr aws.Credentials) *s3.Client {
	region := t.Region
	if region == "" {
		region = "auto"
	}
	o := s3.Options{
		Region:       region,
		BaseEndpoint: aws.String(t.Endpoint),
		Credentials:  credentials.NewStaticCredentialsProvider(cr.AccessKeyID, cr.SecretAccessKey, ""),
		UsePathStyle: t.PathStyle,
		HTTPClient:   s.http,
		// bucketlb fails over to another bucket itself, so the SDK tries
		// each request at most twice (a write that creates something
		// once, see writeOnce), and without the shared retry quota
		// that empties under sustained failure ("retry quota exceeded").
		// Throttling (429, 503 SlowDown) is not retried at all: waiting on
		// a busy bucket only makes it busier, another bucket is the answer.
		Retryer: retry.NewStandard(func(o *retry.StandardOptions) {
			o.MaxAttempts = 2
			o.RateLimiter = ratelimit.None
			o.Retryables = append([]retry.IsErrorRetryable{retry.IsErrorRetryableFunc(noThrottleRetry)}, o.Retryables...)
		}),
	}
	if s.opts.TracerProvider != nil {
		// No propagator: a bucket has no use for our trace context, and
		// headers added after signing only cost bytes.
		otelaws.AppendMiddlewares(&o.APIOptions, otelaws.WithTracerProvider(s.opts.TracerProvider),
			otelaws.WithTextMapPropagator(propagation.NewCompositeTextMapPropagator()))
	}
	if !s.opts.SDKDefaultChecksums {
		o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
		o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
	}
	return s3.New(o)
}

// Bucket is a handle on one bucket.
type Bucket struct {
	s      *Store
	c      *s3.Client
	Target Target
}

// Bucket returns a handle; clients are cached per account and credentials.
// A handle keeps the client it was given: take one per operation to follow
// rotated keys.
func (s *Store) Bucket(t Target) (*Bucket, error) {
	c, err := s.client(t)
	if err != nil {
		return nil, err
	}
	return &Bucket{s: s, c: c, Target: t}, nil
}

// unsignedPayload signs a data request's headers but not its body: the
// body is covered by Content-MD5, which is itself a signed header (a
// streamed part by its ETag, checked against its MD5 after), so hashing
// every byte once more with SHA-256 for SigV4 adds CPU on the hottest path
// and no protection (R2 is reached over TLS besides). A streamed part could
// not be hashed ahead of its bytes anyway.
func unsignedPayload(o *s3.Options) {
	o.APIOptions = append(o.APIOptions, v4.SwapComputePayloadSHA256ForUnsignedPayloadMiddleware)
}

func contentMD5(b []byte) *string {
	sum := md5.Sum(b)
	return aws.String(base64.StdEncoding.EncodeToString(sum[:]))
}

// PutInput describes an object write.
type PutInput struct {
	Key, ContentType string
	Metadata         map[string]string
}

// ErrInvalidRequest: the request cannot be sent as given (user metadata
// or a content type that is not a valid header). Classify calls it
// NotBucketFault: it would fail the same on every bucket, and counting it
// against their health would let one bad client cool them all down.
var ErrInvalidRequest = errors.New("objstore: invalid request")

// MaxMetadataHeaderBytes bounds what user metadata takes of a request's
// headers: each entry is a "x-amz-meta-<key>: <value>" line and its name
// again in the signature's list of signed headers. S3 refuses a request
// whose headers pass 8 KB (RequestHeaderSectionTooLarge), often while the
// body is still being sent, which then looks like a broken connection
// and so like the bucket's fault; the other headers take about 2 KB.
const MaxMetadataHeaderBytes = 4096

// MetadataProblem says why user metadata cannot travel as x-amz-meta-*
// headers (net/http would refuse to send it, or S3 would refuse the
// request for its size), or "" when it can.
func MetadataProblem(md map[string]string) string {
	for k, v := range md {
		if !httpguts.ValidHeaderFieldName(k) {
			return fmt.Sprintf("metadata key %q is not a valid header name (ASCII letters, digits and !#$%%&'*+-.^_`|~ only)", k)
		}
		if !httpguts.ValidHeaderFieldValue(v) {
			return fmt.Sprintf("metadata value of %q has a control character such as a line break, which a header cannot carry", k)
		}
	}
	if n := MetadataHeaderBytes(md); n > MaxMetadataHeaderBytes {
		return fmt.Sprintf("the %d metadata entries would take %d bytes of request headers, and at most %d fit (each entry costs its key twice and about 30 bytes more): send fewer entries", len(md), n, MaxMetadataHeaderBytes)
	}
	return ""
}

// MetadataHeaderBytes is what md takes of a request's headers: its lines
// and its names in the list of signed headers.
func MetadataHeaderBytes(md map[string]string) int {
	n := 0
	for k, v := range md {
		name := len("x-amz-meta-") + len(k)
		n += name + len(": ") + len(encodeValue(v)) + len("\r\n") + name + len(";")
	}
	return n
}

// ContentTypeProblem says why a content type cannot travel as a header
// that every S3 service accepts, or "" when it can. Outside printable
// ASCII, net/http refuses to send a control character, and S3 signs a
// non-ASCII byte differently from the SDK and answers 403, which looks
// like the bucket's fault.
func ContentTypeProblem(ct string) string {
	for i := 0; i < len(ct); i++ {
		if c := ct[i]; c < ' ' || c > '~' {
			return fmt.Sprintf("the content type has a byte 0x%02x outside printable ASCII at offset %d, which an S3 request header cannot carry", c, i)
		}
	}
	return ""
}

// encodeValue makes a metadata value ASCII for the wire: a value with
// bytes beyond ASCII becomes RFC 2047 encoded words, which S3 itself
// decodes and stores as UTF-8 (and encodes again when it answers), and
// other S3 services keep as sent. Raw UTF-8 would be signed differently
// by the SDK and by S3, which answers 403 SignatureDoesNotMatch.
//
// An ASCII value holding "=?" is encoded too, so that one that looks like
// an encoded word reads back as sent rather than decoded.
//
// Leading and trailing spaces and tabs go first: HTTP drops an ASCII
// value's, and every value must read back the same way.
func encodeValue(v string) string {
	v = strings.Trim(v, " \t")
	if !strings.Contains(v, "=?") {
		return mime.BEncoding.Encode("utf-8", v)
	}
	// Words of at most 45 bytes, cut between characters, keep each under
	// RFC 2047's 75 characters.
	var b strings.Builder
	for len(v) > 0 {
		n := min(len(v), 45)
		for n < len(v) && !utf8.RuneStart(v[n]) {
			n--
		}
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		b.WriteString("=?utf-8?b?" + base64.StdEncoding.EncodeToString([]byte(v[:n])) + "?=")
		v = v[n:]
	}
	return b.String()
}

// EncodedLen is the bytes a metadata value takes on the wire, and stored
// by an S3 service that keeps encoded words as sent.
func EncodedLen(v string) int { return len(encodeValue(v)) }

// encodeMetadata is md with every value made ASCII (see encodeValue).
func encodeMetadata(md map[string]string) map[string]string {
	if len(md) == 0 {
		return md
	}
	out := make(map[string]string, len(md))
	for k, v := range md {
		out[k] = encodeValue(v)
	}
	return out
}

// decodeMetadata undoes encodeMetadata on metadata read back. A value
// that does not decode is returned as stored.
func decodeMetadata(md map[string]string) map[string]string {
	var dec mime.WordDecoder
	for k, v := range md {
		if strings.Contains(v, "=?") {
			if d, err := dec.DecodeHeader(v); err == nil {
				md[k] = d
			}
		}
	}
	return md
}

func (in PutInput) check() error {
	if p := ContentTypeProblem(in.ContentType); p != "" {
		return fmt.Errorf("%w: %s", ErrInvalidRequest, p)
	}
	if p := MetadataProblem(in.Metadata); p != "" {
		return fmt.Errorf("%w: %s", ErrInvalidRequest, p)
	}
	return nil
}

// writeOnce gives a call that creates something one try instead of the
// SDK's two. If the first try lands with its answer lost and the retry
// fails with a 5xx, the error the caller gets says the write did not land
// (see MayHaveLanded), and what the first try made stays behind: an
// object no usage counts, or an upload no one knows the id of. Tried
// once, a lost answer reaches the caller, which removes what may have
// landed and fails over to another bucket, as it does for any bucket
// fault. Parts and removals are idempotent and keep the retry.
func writeOnce(o *s3.Options) { o.RetryMaxAttempts = 1 }

// readOnce gives a GET one try: resumingBody tries again itself, and
// counts every GET against readAttempts, so a hung bucket holds a read
// for readAttempts call timeouts, not twice that.
func readOnce(o *s3.Options) { o.RetryMaxAttempts = 1 }

// Put writes body in one PUT and returns the ETag.
func (b *Bucket) Put(ctx context.Context, in PutInput, body []byte) (string, error) {
	if err := in.check(); err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, b.s.opts.DataTimeout)
	defer cancel()
	// One try (see writeOnce).
	out, err := b.c.PutObject(ctx, &s3.PutObjectInput{
		Bucket: aws.String(b.Target.Name), Key: aws.String(in.Key), Body: bytes.NewReader(body),
		ContentLength: aws.Int64(int64(len(body))), ContentType: aws.String(in.ContentType),
		ContentMD5: contentMD5(body), Metadata: encodeMetadata(in.Metadata),
	}, unsignedPayload, writeOnce)
	if err != nil {
		return "", fmt.Errorf("put %s/%s: %w", b.Target.Name, in.Key, err)
	}
	return writtenETag(out.ETag, "put", b.Target.Name, in.Key)
}

// ErrNoETag fails a write whose 2xx answer carried no ETag. S3 and R2
// always send one, so the answer did not come from a bucket that stored
// the object (a proxy's empty page, a wrong endpoint): taken as success,
// it would commit bytes that are nowhere. Like a lost answer, the write
// may or may not have landed (MayHaveLanded).
var ErrNoETag = errors.New("objstore: the bucket answered the write without an ETag")

func writtenETag(etag *string, op, bucket, key string) (string, error) {
	if aws.ToString(etag) == "" {
		return "", fmt.Errorf("%s %s/%s: %w", op, bucket, key, ErrNoETag)
	}
	return *etag, nil
}

// CreateMultipart starts a multipart upload.
func (b *Bucket) CreateMultipart(ctx context.Context, in PutInput) (string, error) {
	if err := in.check(); err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, b.s.opts.CallTimeout)
	defer cancel()
	// One try (see writeOnce): a retry of a create whose answer was lost
	// would make a second upload, leaving the first open with no one
	// knowing its id.
	out, err := b.c.CreateMultipartUpload(ctx, &s3.CreateMultipartUploadInput{
		Bucket: aws.String(b.Target.Name), Key: aws.String(in.Key), ContentType: aws.String(in.ContentType), Metadata: encodeMetadata(in.Metadata),
	}, writeOnce)
	if err != nil {
		return "", fmt.Errorf("create multipart %s/%s: %w", b.Target.Name, in.Key, err)
	}
	return aws.ToString(out.UploadId), nil
}

// UploadPart writes part number n (from 1) and returns its ETag.
func (b *Bucket) UploadPart(ctx context.Context, key, uploadID string, n int32, body []byte) (string, error) {
	sum := md5.Sum(body)
	return b.UploadPartMD5(ctx, key, uploadID, n, body, sum[:])
}

// UploadPartMD5 is UploadPart with the body's MD5 already known, for a
// caller that hashed the part while it was still arriving.
func (b *Bucket) UploadPartMD5(ctx context.Context, key, uploadID string, n int32, body, md5sum []byte) (string, error) {
	return b.uploadPart(ctx, &s3.UploadPartInput{
		Bucket: aws.String(b.Target.Name), Key: aws.String(key), UploadId: aws.String(uploadID), PartNumber: aws.Int32(n),
		Body: bytes.NewReader(body), ContentLength: aws.Int64(int64(len(body))),
		ContentMD5: aws.String(base64.StdEncoding.EncodeToString(md5sum)),
	}, unsignedPayload)
}

func (b *Bucket) uploadPart(ctx context.Context, in *s3.UploadPartInput, opts ...func(*s3.Options)) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, b.s.opts.DataTimeout)
	defer cancel()
	out, err := b.c.UploadPart(ctx, in, opts...)
	if err != nil {
		return "", fmt.Errorf("upload part %d of %s/%s: %w", aws.ToInt32(in.PartNumber), b.Target.Name, aws.ToString(in.Key), err)
	}
	return aws.ToString(out.ETag), nil
}

// UploadPartStream writes part number n from body, which yields exactly
// size bytes, while they are still arriving: the part's upload overlaps its
// receipt instead of following it. No Content-MD5 can be sent ahead of
// bytes not yet seen, so the caller compares the returned ETag with the
// part's MD5 (PartETagMD5) and re-sends the part with Content-MD5 if they
// differ. The body cannot be rewound, so the SDK does not retry; the
// caller retries from its own copy of the part. body must not be an
// *io.PipeReader: smithy sends those with chunked encoding and no length,
// which R2 refuses (411).
func (b *Bucket) UploadPartStream(ctx context.Context, key, uploadID string, n int32, body io.Reader, size int64) (string, error) {
	return b.uploadPart(ctx, &s3.UploadPartInput{
		Bucket: aws.String(b.Target.Name), Key: aws.String(key), UploadId: aws.String(uploadID), PartNumber: aws.Int32(n),
		Body: body, ContentLength: aws.Int64(size),
	}, unsignedPayload, func(o *s3.Options) { o.RetryMaxAttempts = 1 })
}

// PartETagMD5 returns the MD5 a part's ETag carries. R2 (for uploads since
// June 2023), S3 without SSE-KMS and versitygw answer UploadPart with the
// hex MD5 of the bytes they stored; ok is false for any other ETag, when
// the store's ETags say nothing about the content.
func PartETagMD5(etag string) (sum []byte, ok bool) {
	sum, err := hex.DecodeString(strings.Trim(etag, `"`))
	if err != nil || len(sum) != md5.Size {
		return nil, false
	}
	return sum, true
}

// Part is a completed part.
type Part struct {
	Number int32
	ETag   string
}

// CompleteMultipart finishes an upload and returns the object's ETag.
func (b *Bucket) CompleteMultipart(ctx context.Context, key, uploadID string, parts []Part) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, b.s.opts.CallTimeout)
	defer cancel()
	cp := make([]types.CompletedPart, len(parts))
	for i, p := range parts {
		cp[i] = types.CompletedPart{PartNumber: aws.Int32(p.Number), ETag: aws.String(p.ETag)}
	}
	// One try (see writeOnce).
	out, err := b.c.CompleteMultipartUpload(ctx, &s3.CompleteMultipartUploadInput{
		Bucket: aws.String(b.Target.Name), Key: aws.String(key), UploadId: aws.String(uploadID),
		MultipartUpload: &types.CompletedMultipartUpload{Parts: cp},
	}, writeOnce)
	if err != nil {
		return "", fmt.Errorf("complete multipart %s/%s: %w", b.Target.Name, key, err)
	}
	return writtenETag(out.ETag, "complete multipart", b.Target.Name, key)
}

// ObjectInfo describes a stored object.
type ObjectInfo struct {
	Size, ContentLength int64
	ContentType, ETag   string
	Metadata            map[string]string
}

// Get opens an object, optionally a range [offset, offset+length).
// length 0 means to the end. The caller closes the body. A bucket's
// passing fault is ridden over (see resumingBody): the request is tried
// again, and a body that breaks off goes on from its next byte.
func (b *Bucket) Get(ctx context.Context, key string, offset, length int64) (io.ReadCloser, ObjectInfo, error) {
	r := &resumingBody{b: b, ctx: ctx, key: key, left: readAttempts}
	info, start, err := r.open(offset, length, nil)
	if offset == 0 && length > 0 && IsInvalidRange(err) {
		// Only an empty object has no byte 0; S3 refuses any range of it.
		// Read from its start, it is empty, as a file would be.
		info, start, err = r.open(0, 0, nil)
	}
	if err != nil {
		return nil, ObjectInfo{}, err
	}
	r.etag, r.next, r.end = info.ETag, start, start+info.ContentLength
	return r, info, nil
}

// get is one GET of [offset, offset+length) (length 0: to the end); it
// returns where the bytes start.
func (b *Bucket) get(ctx context.Context, key string, offset, length int64) (io.ReadCloser, ObjectInfo, int64, error) {
	in := &s3.GetObjectInput{Bucket: aws.String(b.Target.Name), Key: aws.String(key)}
	if offset > 0 || length > 0 {
		r := fmt.Sprintf("bytes=%d-", offset)
		// A range past the largest offset is the same as to the end; its
		// last byte would overflow into a malformed header, which servers
		// ignore and answer with the whole object.
		if length > 0 && length-1 <= math.MaxInt64-offset {
			r = fmt.Sprintf("bytes=%d-%d", offset, offset+length-1)
		}
		in.Range = aws.String(r)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	out, err := b.c.GetObject(ctx, in, readOnce)
	if err != nil {
		cancel(nil)
		return nil, ObjectInfo{}, 0, fmt.Errorf("get %s/%s: %w", b.Target.Name, key, err)
	}
	// refuse gives up an answer that must not pass for the object.
	refuse := func(why error) (io.ReadCloser, ObjectInfo, int64, error) {
		out.Body.Close()
		cancel(nil)
		return nil, ObjectInfo{}, 0, fmt.Errorf("get %s/%s: %w", b.Target.Name, key, why)
	}
	if aws.ToString(out.ETag) == "" {
		// S3 and R2 always send one: without it the answer is no
		// object's (a proxy's empty page), and a resumed read could not
		// tell the object from another put meanwhile.
		return refuse(ErrReadNoETag)
	}
	info := ObjectInfo{
		ContentLength: aws.ToInt64(out.ContentLength), ContentType: aws.ToString(out.ContentType),
		ETag: aws.ToString(out.ETag), Metadata: decodeMetadata(out.Metadata), Size: aws.ToInt64(out.ContentLength),
	}
	var start, end int64
	ranged := out.ContentRange != nil // "bytes a-b/size"
	if ranged {
		if _, err := fmt.Sscanf(*out.ContentRange, "bytes %d-%d/%d", &start, &end, &info.Size); err != nil {
			ranged = false
		}
	}
	if in.Range != nil && (!ranged || start != offset) {
		// Bytes from elsewhere in the object must never pass for the range.
		return refuse(fmt.Errorf("asked for %s, the bucket answered with %q: %w", *in.Range, aws.ToString(out.ContentRange), ErrRangeIgnored))
	}
	if out.ContentLength == nil {
		// A chunked answer without a length (a proxy on the way; S3 and
		// R2 send one): a range's Content-Range still gives it. A whole
		// object's extent is unknown, and whatever came would pass for it,
		// and a resumed read would ask for a range of its own making.
		if !ranged {
			return refuse(ErrReadNoLength)
		}
		info.ContentLength = end - start + 1
	}
	return newStallGuard(ctx, cancel, out.Body, b.s.opts.ReadIdleTimeout), info, start, nil
}

// ErrReadNoETag fails a read whose 2xx answer carried no ETag.
var ErrReadNoETag = errors.New("objstore: the bucket answered the read without an ETag")

// ErrReadNoLength fails a read of a whole object whose 2xx answer carried
// no Content-Length.
var ErrReadNoLength = errors.New("objstore: the bucket answered the read without a Content-Length")

// ErrRangeIgnored: a range read was answered with other bytes than those
// asked for (a server that ignores Range sends the whole object).
var ErrRangeIgnored = errors.New("objstore: the bucket did not answer with the range asked for")

// ErrReadStalled fails a Get body read that waited longer than
// Options.ReadIdleTimeout for the bucket's next bytes. It is a timeout, so
// Classify calls it BucketTimeout.
var ErrReadStalled = fmt.Errorf("the bucket stopped sending the object: %w", os.ErrDeadlineExceeded)

// stallGuard cancels a Get whose body read waits longer than idle: a bucket
// that stops sending midway (the connection open, no bytes) would
// otherwise hold the read, and the reader's buffers, until its caller gives
// up, which for a client without a deadline is never. Only the time spent
// inside Read counts, not the reader's own pace between reads.
type stallGuard struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	body   io.ReadCloser
	idle   time.Duration
	timer  *time.Timer
}

func newStallGuard(ctx context.Context, cancel context.CancelCauseFunc, body io.ReadCloser, idle time.Duration) *stallGuard {
	g := &stallGuard{ctx: ctx, cancel: cancel, body: body, idle: idle}
	g.timer = time.AfterFunc(idle, func() { cancel(ErrReadStalled) })
	g.timer.Stop()
	return g
}

func (g *stallGuard) Read(p []byte) (int, error) {
	g.timer.Reset(g.idle)
	n, err := g.body.Read(p)
	g.timer.Stop()
	if err != nil && errors.Is(context.Cause(g.ctx), ErrReadStalled) {
		err = fmt.Errorf("no bytes for %v: %w", g.idle, ErrReadStalled)
	}
	return n, err
}

func (g *stallGuard) Close() error {
	g.timer.Stop()
	err := g.body.Close()
	g.cancel(nil)
	return err
}

// Exists asks the bucket whether it exists (a HeadBucket). A HEAD's 404
// has no body to say whether the object or the bucket is missing; this
// tells them apart where it matters.
func (b *Bucket) Exists(ctx context.Context) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, b.s.opts.CallTimeout)
	defer cancel()
	_, err := b.c.HeadBucket(ctx, &s3.HeadBucketInput{Bucket: aws.String(b.Target.Name)})
	switch {
	case err == nil:
		return true, nil
	case IsNotFound(err):
		return false, nil
	}
	return false, fmt.Errorf("head bucket %s: %w", b.Target.Name, err)
}

// Missing says which is missing after a not-found err: a 404 that names
// no missing key (a HEAD's 404 has no body; a host that is not S3 sends a
// bare 404) is checked with Exists, and a bucket found missing makes err
// match ErrNoSuchBucket. Any other err is returned as it is. A client
// told NOT_FOUND drops its record of an object, so a missing bucket must
// not pass for a missing key.
func (b *Bucket) Missing(ctx context.Context, err error) error {
	if !IsNotFound(err) || IsNoSuchBucket(err) {
		return err
	}
	switch apiCode(err) {
	case "NoSuchKey", "NoSuchUpload":
		return err // the bucket said it
	}
	if ok, berr := b.Exists(ctx); berr == nil && !ok {
		return fmt.Errorf("%w: %w", ErrNoSuchBucket, err)
	}
	return err
}

// Head returns an object's info.
func (b *Bucket) Head(ctx context.Context, key string) (ObjectInfo, error) {
	ctx, cancel := context.WithTimeout(ctx, b.s.opts.CallTimeout)
	defer cancel()
	out, err := b.c.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String(b.Target.Name), Key: aws.String(key)})
	if err != nil {
		return ObjectInfo{}, fmt.Errorf("head %s/%s: %w", b.Target.Name, key, err)
	}
	n := aws.ToInt64(out.ContentLength)
	return ObjectInfo{Size: n, ContentLength: n, ContentType: aws.ToString(out.ContentType), ETag: aws.ToString(out.ETag), Metadata: decodeMetadata(out.Metadata)}, nil
}
