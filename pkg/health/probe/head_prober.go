package probe

import (
	"context"
	"fmt"

	"github.com/bucketlb/bucketlb/pkg/objstore"
)

// DefaultKey is the key HeadProber asks for; it need not exist.
const DefaultKey = ".bucketlb-probe"

// HeadProber probes a bucket with a HEAD of Key (DefaultKey when empty)
// through an objstore.Store. Target resolves a bucket ID to where it
// lives; an unknown ID is a probe failure.
type HeadProber struct {
	Store  *objstore.Store
	Target func(bucketID string) (objstore.Target, bool)
	Key    string
}

var _ Prober = HeadProber{}

// Probe implements Prober.
func (p HeadProber) Probe(ctx context.Context, bucketID string) error {
	t, ok := p.Target(bucketID)
	if !ok {
		return fmt.Errorf("probe: unknown bucket %s", bucketID)
	}
	b, err := p.Store.Bucket(t)
	if err != nil {
		return fmt.Errorf("probe %s: %w", bucketID, err)
	}
	key := p.Key
	if key == "" {
		key = DefaultKey
	}
	if _, err := b.Head(ctx, key); err != nil && !objstore.IsNotFound(err) {
		return fmt.Errorf("probe %s: %w", bucketID, err)
	}
	return nil
}
