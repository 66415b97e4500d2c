package cli_test

import (
	"testing"

	"github.com/bucketlb/bucketlb/pkg/testenv"
)

// Main fails the run if the tests leave goroutines behind.
func TestMain(m *testing.M) { testenv.Main(m) }
