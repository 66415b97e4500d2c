package errinfo_test

import (
	"errors"
	"fmt"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/bucketlb/bucketlb/pkg/errinfo"
)

func TestReasons(t *testing.T) {
	st, err := status.New(codes.Unavailable, "etcd is out of space").WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(1)})
	if err != nil {
		t.Fatal(err)
	}
	marked := errinfo.With(st, errinfo.NotApplied).Err()
	if !errinfo.Has(marked, errinfo.NotApplied) || errinfo.Has(marked, errinfo.RateLimited) {
		t.Fatalf("%v: want NotApplied only", status.Convert(marked).Details())
	}
	if len(status.Convert(marked).Details()) != 2 {
		t.Fatalf("details %v: the RetryInfo was lost", status.Convert(marked).Details())
	}
	other, _ := status.New(codes.Unavailable, "x").WithDetails(&errdetails.ErrorInfo{Reason: errinfo.NotApplied, Domain: "elsewhere"})
	for _, e := range []error{nil, errors.New("plain"), st.Err(), other.Err(), fmt.Errorf("wrapped: %w", errors.New("x"))} {
		if errinfo.Has(e, errinfo.NotApplied) {
			t.Fatalf("%v: has NotApplied", e)
		}
	}
}
