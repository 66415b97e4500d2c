package allocator_test

import (
	"context"
	"testing"
	"time"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/services/allocator/allocator"
)

// The elected replica probes buckets through the real S3 gateway: a
// bucket that does not answer cools down without any upload failing on
// it, and a healthy one stays healthy.
func TestLeaderProbesBuckets(t *testing.T) {
	gw := testenv.S3(t)
	name := testenv.NewBucket(t, gw)
	_, cli := testenv.Etcd(t)
	store, err := objstore.New(objstore.Options{Credentials: objstore.StaticCredentials{"R": {gw.AccessKey, gw.SecretKey}}, CallTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	alive := spec("alive", 1, 1000)
	alive.Name, alive.Endpoint, alive.PathStyle, alive.Region = name, gw.Endpoint, true, gw.Region
	dead := spec("dead", 1, 1000)
	dead.Endpoint = "http://127.0.0.1:1" // nothing listens there
	cfg := allocator.Config{Buckets: []*adminv1.BucketSpec{alive, dead}, ProbeStore: store, ProbeEvery: 20 * time.Millisecond}
	r1 := startReplica(t, cli, cfg)
	startReplica(t, testenv.EtcdClient(t, cli.Endpoints()[0]), cfg) // a second replica: only one leader probes

	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err := r1.admin.GetStatus(adminCtx(ctx, token), &adminv1.GetStatusRequest{})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		var a, d *adminv1.BucketStatus
		for _, b := range st.GetBuckets() {
			switch b.GetBucket().GetId() {
			case "alive":
				a = b
			case "dead":
				d = b
			}
		}
		if d.GetCoolingDown() {
			if a.GetConsecutiveFailures() != 0 || a.GetHealthScore() != 100 {
				t.Fatalf("healthy bucket marked unhealthy by probes: %v", a)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("dead bucket never cooled down from probes: %v", d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
