package objstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
)

// Failure classifies an S3 error for failover and health.
type Failure int

const (
	// NotBucketFault: the request itself was wrong (4xx other than the
	// bucket refusing it, or ErrInvalidRequest), or it was cancelled by
	// our caller; another bucket would not help.
	NotBucketFault Failure = iota
	// BucketError: 5xx, connection reset or refused, bytes damaged or cut
	// short on the way (BadDigest, IncompleteBody), or a bucket that
	// refuses requests (401, 403, 3xx, no such bucket) — try another.
	BucketError
	// BucketThrottled: 429 (R2's throttling, which the SDK's retryer does
	// not treat as retryable) or 503 SlowDown.
	BucketThrottled
	// BucketTimeout: the bucket did not answer in time, or answered that
	// the request timed out (S3's 400 RequestTimeout).
	BucketTimeout
)

// Classify tells whether err is the bucket's fault and how. callerCtx is
// the request's context: its own cancellation is never the bucket's fault.
func Classify(callerCtx context.Context, err error) Failure {
	if err == nil || callerCtx.Err() != nil || errors.Is(err, ErrInvalidRequest) {
		return NotBucketFault
	}
	var re *awshttp.ResponseError
	if errors.As(err, &re) {
		code, api := re.HTTPStatusCode(), apiCode(err)
		switch {
		case code == http.StatusTooManyRequests || code == http.StatusServiceUnavailable:
			return BucketThrottled
		case code >= 500:
			return BucketError
		case code == http.StatusRequestTimeout || timeoutCode(api):
			// S3 answers 400 RequestTimeout when a body stops arriving:
			// the status is a client error, the cause is the path.
			return BucketTimeout
		case api == "BadDigest" || api == "IncompleteBody":
			// The bytes that arrived are not the bytes sent (their MD5
			// was computed from our copy), or fewer arrived than sent:
			// the path corrupted or cut them, and sending them again is
			// the cure.
			return BucketError
		case refused(code, err):
			return BucketError
		case code >= 400:
			return NotBucketFault
		}
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return BucketTimeout
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return BucketTimeout
	}
	// Resets, refused connections, truncated responses and the like.
	return BucketError
}

// Describe says in a few words what went wrong with a bucket call, for a
// client: the HTTP status and S3 code it answered with, or how the call
// failed without an answer. The SDK's text (operation, endpoint URL, key,
// request ids) is for logs.
func Describe(err error) string {
	for _, own := range []error{ErrReadStalled, ErrTruncated, ErrRangeIgnored, ErrObjectChanged, ErrNoETag, ErrReadNoETag, ErrReadNoLength} {
		if errors.Is(err, own) {
			return strings.TrimPrefix(own.Error(), "objstore: ")
		}
	}
	var re *awshttp.ResponseError
	// 0: no answer came; 2xx: the answer broke off after its status.
	if errors.As(err, &re) && re.HTTPStatusCode() >= 300 {
		if api := spokenCode(err, re.HTTPStatusCode()); api != "" {
			return fmt.Sprintf("HTTP %d (%s)", re.HTTPStatusCode(), api)
		}
		return fmt.Sprintf("HTTP %d", re.HTTPStatusCode())
	}
	var ne net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "no answer in time"
	case errors.Is(err, context.Canceled):
		return "cancelled"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return "connection broken off"
	}
	var dns *net.DNSError
	if errors.As(err, &dns) {
		return "endpoint name not found"
	}
	var oe *net.OpError
	switch {
	case errors.As(err, &oe) && oe.Op == "dial":
		return "could not connect"
	case errors.Is(err, net.ErrClosed), errors.As(err, &oe):
		return "connection broken off"
	case errors.As(err, &re) && re.HTTPStatusCode() != 0:
		return "its answer broke off"
	}
	return "no usable answer"
}

// refused reports a bucket that turns requests away because of how it is
// set up, not because of what was asked: a wrong or revoked key, a
// deleted bucket, a wrong region or endpoint. Another bucket takes the
// same request, and the service checks what it asks for before sending.
func refused(code int, err error) bool {
	if code == http.StatusUnauthorized || code == http.StatusForbidden || (code >= 300 && code < 400) {
		return true
	}
	switch apiCode(err) {
	case "NoSuchBucket", "InvalidBucketName", "AuthorizationHeaderMalformed", "PermanentRedirect":
		return true
	}
	return false
}

// apiCode is the S3 error code the bucket answered with ("NoSuchKey"), or
// "" when no answer with a code came.
func apiCode(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode()
	}
	return ""
}

// Refusal is a bucket's 4xx answer to a request it will not take as
// given, in the bucket's words.
type Refusal struct {
	Status  int    // HTTP status
	Code    string // S3 error code, such as KeyTooLongError
	Message string // the bucket's sentence, if it gave one
}

// RefusalOf returns the refusal err carries when it is a bucket's 4xx
// answer, with its S3 error code and message when the answer had them (a
// proxy in front of a bucket may answer with an HTML page instead). The
// SDK's error text around it (operation name, request and host ids, the
// bucket's name and the key) is for logs, not for a client.
func RefusalOf(err error) (Refusal, bool) {
	var re *awshttp.ResponseError
	if !errors.As(err, &re) {
		return Refusal{}, false
	}
	code := re.HTTPStatusCode()
	if code < 400 || code >= 500 {
		return Refusal{}, false
	}
	r := Refusal{Status: code}
	if ae := smithy.APIError(nil); errors.As(err, &ae) && spokenCode(err, code) != "" {
		r.Code, r.Message = ae.ErrorCode(), ae.ErrorMessage()
	}
	return r, true
}

// spokenCode is the S3 error code the bucket sent, or "" when the SDK
// made one up from the HTTP status: an answer without a body (any answer
// to a HEAD, or a proxy's empty page) gets "BadRequest" with the message
// "Bad Request", which a client must not read as the bucket's words.
func spokenCode(err error, status int) string {
	var ae smithy.APIError
	if !errors.As(err, &ae) {
		return ""
	}
	text := http.StatusText(status)
	if ae.ErrorCode() == strings.ReplaceAll(text, " ", "") && (ae.ErrorMessage() == "" || ae.ErrorMessage() == text) {
		return ""
	}
	return ae.ErrorCode()
}

// timeoutCode reads the SDK's own list of error codes that mean the
// request timed out, which S3 sends with status 400.
func timeoutCode(api string) bool {
	_, ok := retry.DefaultRetryableErrorCodes[api]
	return ok
}

// MayHaveLanded reports whether a failed write may still have been
// applied: no HTTP answer arrived (timeout, reset, lost response), or a
// 2xx did and its body then broke off or could not be read (the write was
// applied; S3 may also put an error in a 200's body). A 5xx or 429 answer
// means the server did not store it, and then a cleanup delete would be
// wrong: with a client-chosen key it would remove an older object.
func MayHaveLanded(err error) bool {
	if err == nil {
		return false
	}
	if neverSent(err) {
		return false
	}
	// The SDK wraps transport failures in a ResponseError too, with
	// status 0: only a real status code means the server answered.
	var re *awshttp.ResponseError
	if !errors.As(err, &re) {
		return true
	}
	code := re.HTTPStatusCode()
	return code < 100 || (code >= 200 && code < 300)
}

// neverSent reports a request that never reached the bucket: no
// connection could be made (refused, unreachable, no such host, a proxy
// that would not connect). Counted as possibly landed, every upload
// during a bucket's outage would log and count a leftover, and the
// leftovers alert would send operators after objects that cannot exist.
// A request the SDK tried more than once is not vouched for: an earlier
// try may have been sent.
func neverSent(err error) bool {
	var tries *retry.MaxAttemptsError
	if errors.As(err, &tries) && tries.Attempt > 1 {
		return false
	}
	var dns *net.DNSError
	var op *net.OpError
	return errors.As(err, &dns) || errors.As(err, &op) && (op.Op == "dial" || op.Op == "proxyconnect")
}

// noThrottleRetry tells the SDK's retryer never to retry a throttled
// request; other errors are left to its usual checks.
func noThrottleRetry(err error) aws.Ternary {
	var re *awshttp.ResponseError
	if errors.As(err, &re) {
		if c := re.HTTPStatusCode(); c == http.StatusTooManyRequests || c == http.StatusServiceUnavailable {
			return aws.FalseTernary
		}
	}
	return aws.UnknownTernary
}

// IsNotFound reports a missing key, bucket or upload.
func IsNotFound(err error) bool {
	var nk *types.NoSuchKey
	var nu *types.NoSuchUpload
	var nf *types.NotFound
	if errors.As(err, &nk) || errors.As(err, &nu) || errors.As(err, &nf) {
		return true
	}
	switch apiCode(err) {
	case "NoSuchKey", "NoSuchUpload", "NotFound", "NoSuchBucket":
		return true
	}
	var re *awshttp.ResponseError
	return errors.As(err, &re) && re.HTTPStatusCode() == http.StatusNotFound
}

// IsInvalidRange reports a read whose range starts at or past the end of
// the object (HTTP 416).
func IsInvalidRange(err error) bool {
	if apiCode(err) == "InvalidRange" {
		return true
	}
	var re *awshttp.ResponseError
	return errors.As(err, &re) && re.HTTPStatusCode() == http.StatusRequestedRangeNotSatisfiable
}

// IsNoSuchBucket reports that the bucket itself does not exist. Only an
// answer with a body says so: a HEAD's 404 looks like a missing key.
func IsNoSuchBucket(err error) bool {
	return errors.Is(err, ErrNoSuchBucket) || apiCode(err) == "NoSuchBucket"
}

// ErrNoSuchBucket is a bucket found missing by Exists, after an answer
// without a body (a HEAD's 404) could not tell.
var ErrNoSuchBucket = errors.New("objstore: the bucket does not exist")
