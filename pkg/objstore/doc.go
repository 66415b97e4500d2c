// Package objstore is bucketlb's adapter over aws-sdk-go-v2 for
// S3-compatible buckets (Cloudflare R2 first, any S3 server in dev).
//
// One s3.Client per (endpoint, region, path style, credentials) is built
// once and reused; all clients share one HTTP transport so connections are
// pooled across buckets of the same account. The transport trusts the
// system roots plus AWS_CA_BUNDLE, as the SDK's default config would. Bodies are byte slices: parts
// are buffered anyway (R2 needs equal part sizes), a bytes.Reader is
// seekable so SigV4 signing and SDK retries work, and Content-MD5 per
// request is cheap at part sizes.
package objstore
