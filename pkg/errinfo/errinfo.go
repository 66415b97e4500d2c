// Package errinfo names the reasons bucketlb's services give in the
// ErrorInfo detail of a gRPC status. A caller tests a reason, not the
// wording of a message, to tell refusals that share a code apart.
package errinfo

import (
	"context"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Domain is the ErrorInfo domain of bucketlb's reasons.
const Domain = "bucketlb"

const (
	// RateLimited is a refusal by a service's per-client rate limit
	// (RESOURCE_EXHAUSTED, as a full bucket is): wait and call again.
	RateLimited = "RATE_LIMITED"
	// NotApplied marks an UNAVAILABLE that is no lost answer: the call
	// was refused before it changed anything (etcd out of space, a lease
	// that had ended, a conflicting write, the caller's token refused).
	// An upload whose Commit was refused so knows its bytes are not
	// counted, and must not keep its object for a retry.
	NotApplied = "NOT_APPLIED"
	// BucketChanged is a Renew or Commit refused (FAILED_PRECONDITION)
	// because an operator disabled the upload's bucket, or pointed it at
	// another S3 bucket or endpoint, while the upload ran: the upload
	// must stop, and a retry goes where the bucket points now.
	BucketChanged = "BUCKET_CHANGED"
)

// With returns st with an ErrorInfo of reason added, or st unchanged if
// it cannot carry one.
func With(st *status.Status, reason string) *status.Status {
	if d, err := st.WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: Domain}); err == nil {
		return d
	}
	return st
}

// MarkNotApplied returns st marked NotApplied, unless ctx's call is an
// attempt gRPC's retry policy made after an earlier one failed: that one
// may have applied with its answer lost, and a refusal of this attempt
// says nothing of it. Call it on the server, with the call's context.
func MarkNotApplied(ctx context.Context, st *status.Status) *status.Status {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("grpc-previous-rpc-attempts"); len(v) > 0 && v[0] != "0" {
		return st
	}
	return With(st, NotApplied)
}

// Has reports whether err is a status whose ErrorInfo gives reason.
func Has(err error, reason string) bool {
	st, ok := status.FromError(err)
	if !ok {
		return false
	}
	for _, d := range st.Details() {
		if ei, ok := d.(*errdetails.ErrorInfo); ok && ei.GetReason() == reason && ei.GetDomain() == Domain {
			return true
		}
	}
	return false
}
