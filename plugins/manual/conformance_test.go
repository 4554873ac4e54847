package manual_test

import (
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/plugins/manual"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
	"github.com/gpuaas/gpuaas/sdk/sdktest"
)

// sdktestInstance is the instance name the conformance kit configures.
const sdktestInstance = "sdktest"

// conformance is the SDK conformance suite against h: the kit's instance
// has h's nodes in the fake core, live, and the operator declares their
// hardware at enrollment.
func conformance(t *testing.T, h *harness) sdktest.ProvisionerSuite {
	for _, n := range h.nodes {
		h.core.addNode(sdktestInstance, n)
	}
	return sdktest.ProvisionerSuite{
		Config: func(testing.TB) map[string]any { return h.config(nil) },
		Node: func(_ testing.TB, i int) provisioner.EnrollRequest {
			return provisioner.EnrollRequest{
				NodeID:  h.nodes[i],
				Address: h.nodes[i] + ".lab.example",
				Pool:    "h100",
				Tags:    []string{"rack-a"},
				Params: map[string]string{
					"gpu_model": "NVIDIA H100 80GB HBM3", "gpu_count": "8", "gpu_memory_bytes": "85899345920",
					"cpu_model": "AMD EPYC 9654 96-Core Processor", "cpu_cores": "192", "memory_bytes": "1649267441664",
				},
			}
		},
		Provision: provisioner.ProvisionRequest{
			AllocationID:  "alloc-conformance",
			User:          provisioner.TenantUser{Username: "tenant1", UID: 2001, OrgID: "org-1", ProjectID: "proj-1"},
			SSHPublicKeys: []string{sshKey},
		},
		OperationTimeout: 20 * time.Second,
		// A second core that answers Configure's two checks, then takes ten
		// seconds for every request: Probe("") and Status block.
		SlowConfig: func(t testing.TB) map[string]any {
			slow := newFakeCore(t)
			slow.slow(2, 10*time.Second)
			return h.config(map[string]any{"core_url": slow.URL()})
		},
	}
}

func TestConformance(t *testing.T) {
	t.Run("in-process", func(t *testing.T) {
		h := setup(t)
		conformance(t, h).Run(t, sdktest.InProcess(func(testing.TB) base.BasePlugin {
			return manual.New(hclog.NewNullLogger())
		}))
	})
	t.Run("binary", func(t *testing.T) {
		h := setup(t)
		conformance(t, h).Run(t, sdktest.Binary(sdktest.BuildBinary(t, "./cmd/gpuaas-plugin-manual")))
	})
	t.Run("in-process without Nomad", func(t *testing.T) {
		h := setup(t, withoutNomad)
		conformance(t, h).Run(t, sdktest.InProcess(func(testing.TB) base.BasePlugin {
			return manual.New(hclog.NewNullLogger())
		}))
	})
}
