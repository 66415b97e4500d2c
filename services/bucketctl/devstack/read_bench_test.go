package devstack_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"testing"
	"text/tabwriter"
	"time"

	uploadv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/upload/v1"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/testenv"
	"github.com/bucketlb/bucketlb/pkg/uploadclient"
	"github.com/bucketlb/bucketlb/services/bucketctl/devstack"
	"github.com/bucketlb/bucketlb/services/bucketctl/internal/e2e"
)

// BenchmarkReadPath compares GetObject through the service with direct
// aws-sdk-go-v2 GetObject calls to the same local S3 gateway, for the same
// objects, in the same run: a 256 MiB read, and 1 KiB reads/s and latency
// at 16 concurrent clients. Sides alternate in ABBA order.
func BenchmarkReadPath(b *testing.B) {
	env := e2e.StartWith(b, devstack.Options{S3Dir: testenv.MemoryDir(b)})
	ctx := context.Background()
	// stored uploads data through the service and returns where it went,
	// with a direct client for that bucket.
	stored := func(data []byte) (*uploadv1.GetObjectRequest, *objstore.Bucket) {
		resp, err := uploadclient.Upload(ctx, env.Upload, &uploadv1.UploadHeader{NameHint: "r.bin", ContentType: "application/octet-stream", Size: int64(len(data))},
			bytes.NewReader(data), uploadclient.Options{ChunkSize: 1 << 20})
		if err != nil {
			b.Fatal(err)
		}
		return &uploadv1.GetObjectRequest{BucketId: resp.GetBucketId(), Key: resp.GetKey()}, env.Direct(b, resp.GetBucketId())
	}
	readDirect := func(direct *objstore.Bucket, key string) (int64, error) {
		body, _, err := direct.Get(ctx, key, 0, 0)
		if err != nil {
			return 0, err
		}
		defer body.Close()
		return io.Copy(io.Discard, body)
	}
	readService := func(req *uploadv1.GetObjectRequest) (int64, error) {
		var n int64
		_, err := uploadclient.Get(ctx, env.Upload, req, io.Discard, func(got int64) { n = got })
		return n, err
	}
	check := func(n int64, err error, want int) {
		if err != nil {
			b.Fatal(err)
		}
		if n != int64(want) {
			b.Fatalf("read %d bytes, want %d", n, want)
		}
	}

	big := e2e.RandomBytes(b, 256<<20)
	bigReq, bigDirect := stored(big)
	const largeRounds = 4
	var directTime, serviceTime time.Duration
	for round := 0; round < largeRounds; round++ {
		testenv.ABBA(round, func() {
			t0 := time.Now()
			n, err := readDirect(bigDirect, bigReq.GetKey())
			directTime += time.Since(t0)
			check(n, err, len(big))
		}, func() {
			t0 := time.Now()
			n, err := readService(bigReq)
			serviceTime += time.Since(t0)
			check(n, err, len(big))
		})
	}
	directMBs := largeRounds * float64(len(big)) / (1 << 20) / directTime.Seconds()
	serviceMBs := largeRounds * float64(len(big)) / (1 << 20) / serviceTime.Seconds()

	// 1 KiB: 64 objects, each client reads them in turn.
	var smallReqs []*uploadv1.GetObjectRequest
	var smallDirect *objstore.Bucket
	for range 64 {
		req, d := stored(e2e.RandomBytes(b, 1024))
		smallReqs, smallDirect = append(smallReqs, req), d
	}
	var directRuns, serviceRuns []testenv.LoadResult
	for round := 0; round < 4; round++ {
		testenv.ABBA(round, func() {
			directRuns = append(directRuns, testenv.Load(16, time.Second, func(w, i int) error {
				n, err := readDirect(smallDirect, smallReqs[(w+i)%len(smallReqs)].GetKey())
				if err == nil && n != 1024 {
					err = fmt.Errorf("read %d bytes, want 1024", n)
				}
				return err
			}))
		}, func() {
			serviceRuns = append(serviceRuns, testenv.Load(16, time.Second, func(w, i int) error {
				n, err := readService(smallReqs[(w+i)%len(smallReqs)])
				if err == nil && n != 1024 {
					err = fmt.Errorf("read %d bytes, want 1024", n)
				}
				return err
			}))
		})
	}
	d1k, s1k := testenv.Merge(directRuns...), testenv.Merge(serviceRuns...)
	for _, r := range []testenv.LoadResult{d1k, s1k} {
		if r.FirstErr != nil {
			b.Fatal(r.FirstErr)
		}
	}

	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "\nread path (GetObject) vs direct SDK, same gateway, same run\tdirect\tservice\tratio\t")
	fmt.Fprintf(tw, "256 MiB read, MB/s\t%.0f\t%.0f\t%.2fx\t\n", directMBs, serviceMBs, serviceMBs/directMBs)
	fmt.Fprintf(tw, "1 KiB reads/s at c=16\t%.0f\t%.0f\t%.2fx\t\n", d1k.Rate, s1k.Rate, s1k.Rate/d1k.Rate)
	fmt.Fprintf(tw, "1 KiB CPU per read at c=16, all components\t%s\t%s\t%.2fx\t\n", d1k.CPUPerOp.Round(time.Microsecond), s1k.CPUPerOp.Round(time.Microsecond), float64(s1k.CPUPerOp)/float64(d1k.CPUPerOp))
	for _, p := range []float64{.5, .99} {
		d, s := d1k.Quantile(p), s1k.Quantile(p)
		fmt.Fprintf(tw, "1 KiB read p%.0f latency at c=16\t%s\t%s\t+%s\t\n", p*100, d.Round(10*time.Microsecond), s.Round(10*time.Microsecond), (s - d).Round(10*time.Microsecond))
	}
	tw.Flush()
	b.ReportMetric(serviceMBs/directMBs, "large-read-ratio")
	b.ReportMetric(s1k.Rate/d1k.Rate, "small-read-ratio")
}
