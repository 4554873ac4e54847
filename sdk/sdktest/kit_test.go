package sdktest_test

import (
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/examples/diskstore"
	"github.com/gpuaas/gpuaas/sdk/sdktest"
)

func TestDiskstoreConformance(t *testing.T) {
	suite := sdktest.StorageSuite{Config: func(t testing.TB) map[string]any {
		return map[string]any{"root": t.TempDir()}
	}}
	t.Run("in-process", func(t *testing.T) {
		suite.Run(t, sdktest.InProcess(func(t testing.TB) base.BasePlugin {
			return diskstore.New(hclog.NewNullLogger())
		}))
	})
	t.Run("binary", func(t *testing.T) {
		suite.Run(t, sdktest.Binary(sdktest.BuildBinary(t, "../examples/diskstore/cmd/gpuaas-plugin-diskstore")))
	})
}
