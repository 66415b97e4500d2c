package ledger

import "errors"

// Domain errors; the allocator maps them to gRPC codes in one place.
var (
	// ErrNoRoom: the bucket cannot hold the requested bytes this period.
	ErrNoRoom = errors.New("bucket has no room for the requested bytes")
	// ErrBucketNotFound: no bucket with that id.
	ErrBucketNotFound = errors.New("bucket not found")
	// ErrReservationLost: the reservation expired and could not be
	// re-established against current capacity.
	ErrReservationLost = errors.New("reservation expired and the bucket has no room to grant it again")
	// ErrOutcomeUnknown: a commit's try failed without an answer and a
	// later try was refused; the first may yet apply. Retry the commit.
	ErrOutcomeUnknown = errors.New("an earlier try of this commit got no answer from etcd, so whether it applied is unknown; retry")
	// ErrConflict: too many concurrent writers; retry later.
	ErrConflict = errors.New("too many concurrent updates; retry")
	// ErrInvalid: a request that can never succeed as given.
	ErrInvalid = errors.New("invalid request")
	// ErrResetDayMismatch: this replica's period reset day is not the
	// cluster's (AgreeResetDay).
	ErrResetDayMismatch = errors.New("period reset day differs from the cluster's")
)
