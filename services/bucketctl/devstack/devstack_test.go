package devstack_test

import (
	"testing"

	"github.com/bucketlb/bucketlb/services/bucketctl/internal/e2e"
)

// The whole path over plain HTTP to the gateway: upload 20 MiB, read it
// back through the service and straight from the bucket, usage == bytes;
// bad input answers INVALID_ARGUMENT and leaves nothing behind.
func TestEndToEnd(t *testing.T) {
	env := e2e.Start(t, false)
	t.Run("RoundTrip", func(t *testing.T) { e2e.RoundTrip(t, env) })
	t.Run("BadInput", func(t *testing.T) { e2e.BadInput(t, env) })
}
