package probe

import (
	"context"
	"fmt"

	"github.com/bucketlb/bucketlb/pkg/objstore"
)

// DefaultKey is the key ReadProber asks for; it need not exist.
const DefaultKey = ".bucketlb-probe"

// ReadProber probes a bucket by reading the first byte of Key (DefaultKey
// when empty) through an objstore.Store. Target resolves a bucket ID to
// where it lives. An unknown ID, or a bucket whose keys this replica
// lacks, is not probed (ErrNotProbed): that is this replica's state, not
// the bucket's, and upload replicas may well hold the keys.
//
// A missing key passes: the bucket answered. It reads rather than HEADs
// because a HEAD's 404 carries no body, so a deleted bucket would pass as
// a missing key; a GET's error says which (both are Class B on R2).
type ReadProber struct {
	Store  *objstore.Store
	Target func(bucketID string) (objstore.Target, bool)
	Key    string
}

var _ Prober = ReadProber{}

// Probe implements Prober.
func (p ReadProber) Probe(ctx context.Context, bucketID string) error {
	t, ok := p.Target(bucketID)
	if !ok {
		return fmt.Errorf("%w: unknown bucket %s", ErrNotProbed, bucketID)
	}
	b, err := p.Store.Bucket(t)
	if err != nil {
		return fmt.Errorf("%w: bucket %s: %w", ErrNotProbed, bucketID, err)
	}
	key := p.Key
	if key == "" {
		key = DefaultKey
	}
	body, _, err := b.Get(ctx, key, 0, 1)
	err = b.Missing(ctx, err) // a bare 404 (a host that is not S3) is no missing key
	switch {
	case err == nil:
		return body.Close()
	case objstore.IsNoSuchBucket(err): // the bucket is gone: a failure
	case objstore.IsNotFound(err), objstore.IsInvalidRange(err): // no key, or an empty one
		return nil
	}
	return fmt.Errorf("probe %s: %w", bucketID, err)
}
