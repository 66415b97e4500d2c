package cli

import (
	"path/filepath"
	"testing"

	"github.com/bucketlb/bucketlb/services/bucketctl/devstack"
)

// The dev banner's bucketctl commands reach the stack it describes: with
// its addresses and token file as flags when they are not the defaults.
func TestBannerCommandsReachThisStack(t *testing.T) {
	def, err := filepath.Abs(filepath.Join(".data", "admin-token"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		st   *devstack.Stack
		want string
	}{
		{&devstack.Stack{UploadAddr: defaultUploadAddr, AllocatorAddr: defaultAllocatorAddr, TokenFile: def}, "bin/bucketctl"},
		{&devstack.Stack{UploadAddr: defaultUploadAddr, AllocatorAddr: defaultAllocatorAddr, TokenFile: filepath.Join(".data", "admin-token")}, "bin/bucketctl"},
		{&devstack.Stack{UploadAddr: "127.0.0.1:7102", AllocatorAddr: "127.0.0.1:7101", TokenFile: "/tmp/d2/admin-token"},
			"bin/bucketctl --upload-addr 127.0.0.1:7102 --allocator-addr 127.0.0.1:7101 --token-file /tmp/d2/admin-token"},
	} {
		if got := bucketctlCommand(c.st); got != c.want {
			t.Errorf("bucketctlCommand(%s, %s, %s) = %q, want %q", c.st.UploadAddr, c.st.AllocatorAddr, c.st.TokenFile, got, c.want)
		}
	}
}
