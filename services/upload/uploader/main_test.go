package uploader_test

import (
	"testing"

	"github.com/bucketlb/bucketlb/pkg/testenv"
)

// The package's tests share one S3 gateway; Main removes its files after them.
func TestMain(m *testing.M) { testenv.Main(m) }
