package sdktest_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/examples/diskstore"
	"github.com/gpuaas/gpuaas/sdk/examples/instantprov"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
	"github.com/gpuaas/gpuaas/sdk/sdktest"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// Benchmarks for make bench: go test -run '^$' -bench . ./sdk/...
//
// BenchmarkPluginUnary times provisioner Status, a trivial call, made on
// the driver directly, over gRPC on a local socket in this process, and
// through a plugin child process with AutoMTLS (the production path). It
// reports p50/p99 in µs and, for the remote cases, the p50 overhead over
// the direct call and the p50 of a bare round trip between two processes
// (the machine's floor for any plugin call), both measured in the same run.
//
// BenchmarkPluginStream streams a 64 MiB object through the diskstore
// driver, directly and through a plugin child process, and reports MB/s
// and the ratio to a local file copy of the same size in the same run.

func BenchmarkPluginUnary(b *testing.B) {
	bin := sdktest.BuildBinary(b, "../examples/instantprov/cmd/gpuaas-plugin-instantprov")
	direct := unaryDriver(b, nil)
	directP50, _ := percentiles(timeCalls(b, direct, 20000))
	// The floor any plugin call stands on: a bare 64-byte round trip to
	// another process over a Unix socket, on this machine, now.
	floorP50, _ := percentiles(pingPong(b, 20000))

	for _, c := range []struct {
		name   string
		target *sdktest.Target
	}{
		{"direct", nil},
		{"grpc-socket", ptr(sdktest.InProcess(func(testing.TB) base.BasePlugin { return instantprov.New(hclog.NewNullLogger()) }))},
		// One P, as the core starts its plugins (pluginhost newClient).
		{"plugin-process", ptr(sdktest.Binary(bin, "GOMAXPROCS=1"))},
	} {
		b.Run(c.name, func(b *testing.B) {
			d := direct
			if c.target != nil {
				d = unaryDriver(b, c.target)
			}
			timeCalls(b, d, 200) // warm up
			b.ResetTimer()
			samples := timeCalls(b, d, b.N)
			b.StopTimer()
			p50, p99 := percentiles(samples)
			b.ReportMetric(micros(p50), "p50-µs")
			b.ReportMetric(micros(p99), "p99-µs")
			if c.target != nil {
				b.ReportMetric(micros(p50-directP50), "overhead-p50-µs")
				b.ReportMetric(micros(floorP50), "ipc-floor-p50-µs")
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

func micros(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

// unaryDriver returns a configured instantprov driver, directly or through
// target, with one finished operation "bench-op" for Status to report.
func unaryDriver(b *testing.B, target *sdktest.Target) provisioner.Driver {
	b.Helper()
	raw := map[string]any{"webhook_secret": webhookSecret}
	var d provisioner.Driver
	if target == nil {
		d = instantprov.New(hclog.NewNullLogger())
	} else {
		d = sdktest.ConnectProvisioner(b, *target)
	}
	sdktest.Configure(b, d, provisioner.SupportedAPIVersions(), raw)
	ctx := context.Background()
	if _, err := d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: "bench-enroll", NodeID: "bench-node"}); err != nil {
		b.Fatal(err)
	}
	if _, err := d.Provision(ctx, &provisioner.ProvisionRequest{OperationID: "bench-op", NodeID: "bench-node",
		User: provisioner.TenantUser{Username: "bench"}}); err != nil {
		b.Fatal(err)
	}
	return d
}

func timeCalls(b *testing.B, d provisioner.Driver, n int) []time.Duration {
	b.Helper()
	ctx := context.Background()
	samples := make([]time.Duration, n)
	for i := range samples {
		start := time.Now()
		if _, err := d.Status(ctx, "bench-op"); err != nil {
			b.Fatal(err)
		}
		samples[i] = time.Since(start)
	}
	return samples
}

func percentiles(samples []time.Duration) (p50, p99 time.Duration) {
	s := slices.Clone(samples)
	slices.Sort(s)
	return s[len(s)*50/100], s[min(len(s)*99/100, len(s)-1)]
}

const streamSize = 64 << 20

func BenchmarkPluginStream(b *testing.B) {
	dir := b.TempDir()
	src := filepath.Join(dir, "source")
	writeRandomFile(b, src, streamSize)
	bin := sdktest.BuildBinary(b, "../examples/diskstore/cmd/gpuaas-plugin-diskstore")

	// The baseline: a local file copy of the same size, in this run.
	var copyRate float64 // bytes per second
	b.Run("file-copy", func(b *testing.B) {
		b.SetBytes(streamSize)
		start := time.Now()
		for i := range b.N {
			fileCopy(b, src, filepath.Join(dir, fmt.Sprintf("bench-copy-%d", i%2)))
		}
		copyRate = float64(streamSize) * float64(b.N) / time.Since(start).Seconds()
	})
	if copyRate == 0 { // file-copy filtered out by -bench: measure it anyway
		start := time.Now()
		for i := range 3 {
			fileCopy(b, src, filepath.Join(dir, fmt.Sprintf("bench-copy-%d", i%2)))
		}
		copyRate = 3 * streamSize / time.Since(start).Seconds()
	}

	for _, c := range []struct {
		name   string
		target *sdktest.Target
	}{
		{"direct", nil},
		{"plugin-process", ptr(sdktest.Binary(bin))},
	} {
		raw := map[string]any{"root": filepath.Join(dir, "store-"+c.name)}
		var d storage.Driver
		if c.target == nil {
			d = diskstore.New(hclog.NewNullLogger())
		} else {
			d = sdktest.ConnectStorage(b, *c.target) // lives as long as this benchmark
		}
		sdktest.Configure(b, d, storage.SupportedAPIVersions(), raw)
		put(b, d, src, "object")
		b.Run("put/"+c.name, func(b *testing.B) {
			b.SetBytes(streamSize)
			b.ResetTimer()
			start := time.Now()
			for range b.N {
				put(b, d, src, "object")
			}
			b.ReportMetric(float64(streamSize)*float64(b.N)/time.Since(start).Seconds()/copyRate, "x-filecopy")
		})
		b.Run("get/"+c.name, func(b *testing.B) {
			b.SetBytes(streamSize)
			b.ResetTimer()
			start := time.Now()
			for range b.N {
				get(b, d, "object")
			}
			b.ReportMetric(float64(streamSize)*float64(b.N)/time.Since(start).Seconds()/copyRate, "x-filecopy")
		})
	}
}

func writeRandomFile(b *testing.B, path string, size int) {
	b.Helper()
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := io.CopyN(f, rand.Reader, int64(size)); err != nil {
		b.Fatal(err)
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
}

func fileCopy(b *testing.B, from, to string) {
	b.Helper()
	in, err := os.Open(from)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = in.Close() }()
	out, err := os.Create(to)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		b.Fatal(err)
	}
	if err := out.Close(); err != nil {
		b.Fatal(err)
	}
}

func put(b *testing.B, d storage.Driver, src, key string) {
	b.Helper()
	f, err := os.Open(src)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	if _, err := d.Put(context.Background(), &storage.PutRequest{OperationID: "bench-put-" + rand.Text(),
		Key: key, Size: streamSize}, f); err != nil {
		b.Fatal(err)
	}
}

func get(b *testing.B, d storage.Driver, key string) {
	b.Helper()
	obj, err := d.Get(context.Background(), key)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = obj.Body.Close() }()
	n, err := io.Copy(io.Discard, obj.Body)
	if err != nil || n != streamSize {
		b.Fatalf("Get: %d bytes, %v", n, err)
	}
}

const echoEnv = "SDKTEST_ECHO_SOCKET"

// TestEchoHelper echoes what it reads on the Unix socket named by
// SDKTEST_ECHO_SOCKET when pingPong starts it as a child process; run
// directly it has nothing to do.
func TestEchoHelper(t *testing.T) {
	path := os.Getenv(echoEnv)
	if path == "" {
		return
	}
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	buf := make([]byte, 64)
	for {
		n, err := conn.Read(buf)
		if err != nil {
			return
		}
		if _, err := conn.Write(buf[:n]); err != nil {
			return
		}
	}
}

// pingPong times n 64-byte round trips to a child process.
func pingPong(b *testing.B, n int) []time.Duration {
	b.Helper()
	path := filepath.Join(b.TempDir(), "echo.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	cmd := exec.Command(os.Args[0], "-test.run=^TestEchoHelper$")
	cmd.Env = append(os.Environ(), echoEnv+"="+path)
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = cmd.Wait() }()
	conn, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	buf := make([]byte, 64)
	samples := make([]time.Duration, n)
	for i := range samples {
		start := time.Now()
		if _, err := conn.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(conn, buf); err != nil {
			b.Fatal(err)
		}
		samples[i] = time.Since(start)
	}
	return samples
}
