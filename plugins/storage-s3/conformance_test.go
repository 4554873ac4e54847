package s3store_test

import (
	"testing"

	"github.com/hashicorp/go-hclog"

	s3store "github.com/gpuaas/gpuaas/plugins/storage-s3"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/sdktest"
)

// TestConformance runs the SDK's storage conformance suite against the
// driver in process (over real gRPC) and as the built plugin binary. Parts
// of 5 MiB make the suite's 8 MiB round trip a multipart upload.
func TestConformance(t *testing.T) {
	t.Parallel()
	suite := sdktest.StorageSuite{Config: func(t testing.TB) map[string]any {
		return server.config(t, map[string]any{"part_size_bytes": s3store.MinPartSize})
	}}
	t.Run("in-process", func(t *testing.T) {
		suite.Run(t, sdktest.InProcess(func(testing.TB) base.BasePlugin {
			return s3store.New(hclog.NewNullLogger())
		}))
	})
	t.Run("binary", func(t *testing.T) {
		suite.Run(t, sdktest.Binary(sdktest.BuildBinary(t, "./cmd/gpuaas-plugin-storage-s3")))
	})
}
