package cli

import (
	"testing"

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
