package pluginhost_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"

	"github.com/gpuaas/gpuaas/sdk"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/examples/instantprov"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// BenchmarkUnaryCall measures a provisioner Status call through the plugin
// host (a child process over gRPC with AutoMTLS, with the host's restart
// and metrics wrapper) next to the same call on the driver value in process
// and through a bare SDK client to the same binary (started with the
// environment the host gives its plugins), and reports p50 and p99 in
// microseconds, after a warm-up as in sdktest's BenchmarkPluginUnary.
// Target (DESIGN.md §9): host p50 under 200 µs.
func BenchmarkUnaryCall(b *testing.B) {
	ctx := context.Background()
	run := func(b *testing.B, drv provisioner.Driver) {
		b.Helper()
		op, err := drv.Provision(ctx, &provisioner.ProvisionRequest{OperationID: "bench-op", NodeID: "bench-node",
			User: provisioner.TenantUser{Username: "bench", UID: 2001}})
		if err != nil {
			b.Fatal(err)
		}
		// Steady state: the first calls of a fresh process grow its heap
		// and goroutine stacks.
		for range 200 {
			if _, err := drv.Status(ctx, op.OperationID); err != nil {
				b.Fatal(err)
			}
		}
		lat := make([]time.Duration, 0, b.N)
		b.ReportAllocs()
		b.ResetTimer()
		for range b.N {
			start := time.Now()
			if _, err := drv.Status(ctx, op.OperationID); err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(start))
		}
		b.StopTimer()
		slices.Sort(lat)
		b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-µs")
		b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "p99-µs")
	}
	enroll := func(b *testing.B, drv provisioner.Driver) {
		b.Helper()
		if _, err := drv.Enroll(ctx, &provisioner.EnrollRequest{OperationID: "bench-enroll", NodeID: "bench-node"}); err != nil {
			b.Fatal(err)
		}
	}

	b.Run("in-process", func(b *testing.B) {
		d := instantprov.New(hclog.NewNullLogger())
		schema, _ := d.ConfigSchema(ctx)
		cfg, err := base.ValidateConfig(schema, provConfig(nil))
		if err != nil {
			b.Fatal(err)
		}
		cfg.APIVersion = provisioner.APIVersion1
		if err := d.Configure(ctx, cfg); err != nil {
			b.Fatal(err)
		}
		enroll(b, d)
		run(b, d)
	})

	b.Run("sdk-client", func(b *testing.B) {
		path := bin(b, binInstantprov)
		sum, err := sdk.FileSHA256(path)
		if err != nil {
			b.Fatal(err)
		}
		// The environment newClient gives plugins, so that the difference to
		// "host" is the host's own wrapper.
		lc, err := sdk.ClientConfig(sdk.Launch{Path: path, SHA256: sum, Logger: hclog.NewNullLogger(),
			Env: []string{"GPUAAS_PLUGIN_LOG_LEVEL=error", "GOMAXPROCS=1"}})
		if err != nil {
			b.Fatal(err)
		}
		client := plugin.NewClient(lc)
		b.Cleanup(client.Kill)
		raw, err := sdk.Dispense(client, base.KindProvisioner)
		if err != nil {
			b.Fatal(err)
		}
		d := raw.(*provisioner.Client)
		schema, _ := d.ConfigSchema(ctx)
		cfg, err := base.ValidateConfig(schema, provConfig(nil))
		if err != nil {
			b.Fatal(err)
		}
		cfg.APIVersion = provisioner.APIVersion1
		if err := d.Configure(ctx, cfg); err != nil {
			b.Fatal(err)
		}
		enroll(b, d)
		run(b, d)
	})

	b.Run("host", func(b *testing.B) {
		bu := setup(b)
		bu.install(b, binInstantprov)
		bu.configure(b, "bench", "instantprov", provConfig(nil))
		d, err := bu.host.Provisioner(bu.ctx(b), "bench")
		if err != nil {
			b.Fatal(err)
		}
		enroll(b, d)
		run(b, d)
	})
}
