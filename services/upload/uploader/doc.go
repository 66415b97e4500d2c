// Package uploader is bucketlb's data plane: it validates an upload's
// header, asks the allocator for a bucket, writes the object (one PUT for
// small objects with transparent failover, equal-part multipart for large
// ones, each part uploading while it arrives and checked against its
// ETag), verifies sha256, commits usage and answers. It holds no state
// beyond a request and never talks to etcd.
//
// Every exit path either commits the reservation or releases it, and
// leaves no object or open multipart upload behind; only if the process
// itself dies is cleanup left to reservation expiry and the janitor.
package uploader
