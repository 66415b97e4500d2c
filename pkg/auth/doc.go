// Package auth guards gRPC methods with a static bearer token.
//
// A Bearer's interceptors check the "authorization: Bearer <token>"
// metadata on every method whose full name starts with its prefix (for the
// admin API "/bucketlb.admin.v1.AdminService/"); other methods pass
// through untouched, so one server can carry both the guarded admin API and
// open services such as grpc.health.v1.
//
// Without the header a call fails with UNAUTHENTICATED; with a wrong token,
// PERMISSION_DENIED; both with a sentence a person can act on, and marked
// as applying nothing (errinfo.NotApplied) on a call's first attempt. The token is
// compared in constant time (of SHA-256 digests, so the length does not
// leak either), is never logged and never appears in an error. A Bearer
// built with an empty token rejects every guarded call: a guarded API must
// not run open by accident.
//
// A server's Guards chain its Bearers: the allocator guards its admin API
// with the admin token and its data API (called by the upload service)
// with the service token. Credentials is the client side: it sends a
// token on every call of a connection.
//
// LoadToken reads the token from an environment variable or a file (a
// mounted Kubernetes secret).
package auth
