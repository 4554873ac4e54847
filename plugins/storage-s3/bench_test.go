package s3store_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/hashicorp/go-hclog"

	s3store "github.com/gpuaas/gpuaas/plugins/storage-s3"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/sdktest"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// BenchmarkPutGet measures upload and download throughput of a 64 MiB
// object (16 MiB parts) through the driver, called in process ("driver")
// and over the plugin's gRPC stream in process ("plugin"), with one and
// two parts uploading at once, and reports each as a ratio of a direct
// PutObject/GetObject of the same bytes to the same server, interleaved in
// the same iterations.
func BenchmarkPutGet(b *testing.B) {
	const size = 64 << 20
	data := randomBytes(b, size)
	targets := []struct {
		name    string
		connect func(b *testing.B, cfg map[string]any) storage.Driver
	}{
		{"driver", func(b *testing.B, cfg map[string]any) storage.Driver {
			d := s3store.New(hclog.NewNullLogger())
			if err := configure(context.Background(), d, cfg); err != nil {
				b.Fatal(err)
			}
			return d
		}},
		{"plugin", func(b *testing.B, cfg map[string]any) storage.Driver {
			c := sdktest.ConnectStorage(b, sdktest.InProcess(func(testing.TB) base.BasePlugin {
				return s3store.New(hclog.NewNullLogger())
			}))
			sdktest.Configure(b, c, storage.SupportedAPIVersions(), cfg)
			return c
		}},
	}
	for _, tc := range []struct {
		name        string
		connect     func(b *testing.B, cfg map[string]any) storage.Driver
		concurrency int
	}{
		{targets[0].name, targets[0].connect, 1},
		{targets[1].name, targets[1].connect, 1},
		{targets[0].name + "/upload_concurrency=2", targets[0].connect, 2},
		{targets[1].name + "/upload_concurrency=2", targets[1].connect, 2},
	} {
		b.Run(tc.name, func(b *testing.B) {
			ctx := context.Background()
			cfg := server.config(b, map[string]any{"upload_concurrency": tc.concurrency})
			d := tc.connect(b, cfg)
			raw := server.client()
			directKey := cfg["key_prefix"].(string) + "direct"
			var direct, driver [2]time.Duration // put, get
			n := 0
			for ; b.Loop(); n++ {
				start := time.Now()
				if _, err := raw.PutObject(ctx, &s3.PutObjectInput{Bucket: &server.Bucket, Key: &directKey,
					Body: bytes.NewReader(data), ContentLength: aws.Int64(size)}); err != nil {
					b.Fatal(err)
				}
				direct[0] += time.Since(start)
				start = time.Now()
				out, err := raw.GetObject(ctx, &s3.GetObjectInput{Bucket: &server.Bucket, Key: &directKey})
				if err != nil {
					b.Fatal(err)
				}
				drain(b, out.Body, size)
				direct[1] += time.Since(start)

				start = time.Now()
				key := "driver"
				if _, err := d.Put(ctx, &storage.PutRequest{OperationID: fmt.Sprintf("bench-%d-%d", time.Now().UnixNano(), n), Key: key, Size: size},
					bytes.NewReader(data)); err != nil {
					b.Fatal(err)
				}
				driver[0] += time.Since(start)
				start = time.Now()
				obj, err := d.Get(ctx, key)
				if err != nil {
					b.Fatal(err)
				}
				drain(b, obj.Body, size)
				driver[1] += time.Since(start)
			}
			mbps := func(d time.Duration) float64 { return float64(size) * float64(n) / d.Seconds() / 1e6 }
			b.ReportMetric(mbps(direct[0]), "direct-put-MB/s")
			b.ReportMetric(mbps(driver[0]), "put-MB/s")
			b.ReportMetric(direct[0].Seconds()/driver[0].Seconds(), "put-ratio")
			b.ReportMetric(mbps(direct[1]), "direct-get-MB/s")
			b.ReportMetric(mbps(driver[1]), "get-MB/s")
			b.ReportMetric(direct[1].Seconds()/driver[1].Seconds(), "get-ratio")
		})
	}
}

func drain(b *testing.B, body io.ReadCloser, want int64) {
	b.Helper()
	defer func() { _ = body.Close() }()
	n, err := io.Copy(io.Discard, body)
	if err != nil || n != want {
		b.Fatalf("read %d bytes (%v), want %d", n, err, want)
	}
}
