// Package tlstest holds only tests: the objstore adapter over HTTPS with
// aws-sdk-go-v2's default request checksums (aws-chunked bodies with CRC32
// trailers), the path R2 clients take. It is its own test binary because
// the in-process gateway runs once per process, plain or TLS.
package tlstest
