package cli

import (
	"testing"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	"github.com/bucketlb/bucketlb/services/bucketctl/devstack"
)

// The dev banner's bucketctl commands reach the stack it describes: with
// its addresses and token file as flags when they are not the defaults.
func TestBannerCommandsReachThisStack(t *testing.T) {
	for _, c := range []struct {
		st        *devstack.Stack
		tokenFile string
		want      string
	}{
		{&devstack.Stack{UploadAddr: defaultUploadAddr, AllocatorAddr: defaultAllocatorAddr}, "", "bin/bucketctl"},
		{&devstack.Stack{UploadAddr: "127.0.0.1:7102", AllocatorAddr: "127.0.0.1:7101"}, "/tmp/d2/admin-token",
			"bin/bucketctl --upload-addr 127.0.0.1:7102 --allocator-addr 127.0.0.1:7101 --token-file /tmp/d2/admin-token"},
	} {
		if got := bucketctlCommand(c.st, c.tokenFile); got != c.want {
			t.Errorf("bucketctlCommand(%s, %s, %q) = %q, want %q", c.st.UploadAddr, c.st.AllocatorAddr, c.tokenFile, got, c.want)
		}
	}
}

// The banner lists the buckets in effect, each with its priority and
// limit, and its state unless ACTIVE; with none, it says how to add one.
func TestBannerBucketList(t *testing.T) {
	spec := func(id string, prio int32, limit int64, state adminv1.BucketState) *adminv1.BucketSpec {
		return &adminv1.BucketSpec{Id: id, Name: "s3-" + id, Priority: prio, MonthlyLimitBytes: limit, State: state}
	}
	for _, c := range []struct {
		buckets []*adminv1.BucketSpec
		want    string
	}{
		{nil, "none: add one with bucketctl buckets put"},
		{[]*adminv1.BucketSpec{spec("dev-hot", 1, 20<<30, adminv1.BucketState_BUCKET_STATE_ACTIVE), spec("dev-cold", 3, 1<<30, adminv1.BucketState_BUCKET_STATE_DRAINING)},
			"dev-hot (priority 1, limit 20.0 GiB), dev-cold (priority 3, limit 1.0 GiB, draining)"},
	} {
		if got := bucketList(c.buckets); got != c.want {
			t.Errorf("bucketList = %q, want %q", got, c.want)
		}
	}
}
