// Package tlse2e runs the end-to-end scenarios with the S3 gateway served
// over TLS and the SDK's default checksum settings, the path real R2
// clients take. It is its own test binary because versitygw runs once per
// process.
package tlse2e

import (
	"testing"

	"github.com/bucketlb/bucketlb/services/bucketctl/internal/e2e"
)

func TestEndToEndTLS(t *testing.T) {
	env := e2e.Start(t, true)
	t.Run("RoundTrip", func(t *testing.T) { e2e.RoundTrip(t, env) })
	t.Run("BadInput", func(t *testing.T) { e2e.BadInput(t, env) })
}
