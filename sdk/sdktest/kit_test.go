package sdktest_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/examples/diskstore"
	"github.com/gpuaas/gpuaas/sdk/examples/instantpay"
	"github.com/gpuaas/gpuaas/sdk/examples/instantprov"
	"github.com/gpuaas/gpuaas/sdk/payments"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
	"github.com/gpuaas/gpuaas/sdk/sdktest"
)

// The kit's own tests: every suite against the example driver of its kind,
// in process and as the built binary.

const webhookSecret = "sdktest-webhook-secret-0123456789"

func TestDiskstoreConformance(t *testing.T) {
	t.Parallel()
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

func instantprovSuite() sdktest.ProvisionerSuite {
	return sdktest.ProvisionerSuite{
		Config: func(testing.TB) map[string]any {
			return map[string]any{"webhook_secret": webhookSecret, "delay": "150ms"}
		},
		SlowConfig: func(testing.TB) map[string]any {
			return map[string]any{"webhook_secret": webhookSecret, "call_delay": "10s"}
		},
		Node: func(_ testing.TB, i int) provisioner.EnrollRequest {
			return provisioner.EnrollRequest{NodeID: fmt.Sprintf("node-%d", i), Address: fmt.Sprintf("10.0.0.%d", i+10), Pool: "h100", Tags: []string{"rack-a"}}
		},
		Provision: provisioner.ProvisionRequest{
			User:          provisioner.TenantUser{Username: "tenant1", UID: 2001, OrgID: "org-1", ProjectID: "proj-1"},
			SSHPublicKeys: []string{"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl tenant1"},
			Image:         "ubuntu-22.04-cuda-12",
		},
		Webhook: func(t testing.TB, nodeID string) provisioner.Webhook {
			hook, err := instantprov.SignedWebhook([]byte(webhookSecret), time.Now(), instantprov.WebhookEvent{
				ID: "evt-health-1", Type: "health", NodeID: nodeID, OccurredAt: time.Now().UTC(), Healthy: true, Message: "ok",
			})
			if err != nil {
				t.Fatal(err)
			}
			return *hook
		},
	}
}

func TestInstantprovConformance(t *testing.T) {
	t.Parallel()
	suite := instantprovSuite()
	t.Run("in-process", func(t *testing.T) {
		suite.Run(t, sdktest.InProcess(func(testing.TB) base.BasePlugin {
			return instantprov.New(hclog.NewNullLogger())
		}))
	})
	t.Run("binary", func(t *testing.T) {
		suite.Run(t, sdktest.Binary(sdktest.BuildBinary(t, "../examples/instantprov/cmd/gpuaas-plugin-instantprov")))
	})
}

// bareProvisioner hides the optional capabilities of the driver it wraps.
type bareProvisioner struct{ provisioner.Driver }

var _ provisioner.Driver = bareProvisioner{}

// TestProvisionerWithoutOptionalCapabilities checks that a driver without
// the webhook, discover and unenroll capabilities passes, its calls answering
// base.ErrUnimplemented.
func TestProvisionerWithoutOptionalCapabilities(t *testing.T) {
	t.Parallel()
	instantprovSuite().Run(t, sdktest.InProcess(func(testing.TB) base.BasePlugin {
		return bareProvisioner{instantprov.New(hclog.NewNullLogger())}
	}))
}

func instantpaySuite() sdktest.PaymentsSuite {
	return sdktest.PaymentsSuite{
		Config: func(testing.TB) map[string]any {
			return map[string]any{"webhook_secret": webhookSecret, "base_url": "https://pay.example.test"}
		},
		SlowConfig: func(testing.TB) map[string]any {
			return map[string]any{"webhook_secret": webhookSecret, "call_delay": "10s"}
		},
		Checkout: payments.CheckoutRequest{
			OrgID: "org-1", CustomerRef: "cus_123", AmountMinor: 5000, Currency: "USD",
			SuccessURL: "https://console.example.test/billing/ok", CancelURL: "https://console.example.test/billing",
		},
		CompletedWebhook: func(t testing.TB, req payments.CheckoutRequest, s *payments.CheckoutSession) payments.Webhook {
			hook, err := instantpay.SignedWebhook([]byte(webhookSecret), time.Now(), instantpay.WebhookEvent{
				ID: "evt_" + s.SessionID, Type: string(payments.EventCheckoutCompleted), SessionID: s.SessionID,
				OrgID: req.OrgID, CustomerRef: req.CustomerRef, AmountMinor: req.AmountMinor, Currency: req.Currency,
				PaymentStatus: string(payments.StatusPaid), Created: time.Now().Unix(),
			})
			if err != nil {
				t.Fatal(err)
			}
			return *hook
		},
	}
}

func TestInstantpayConformance(t *testing.T) {
	t.Parallel()
	suite := instantpaySuite()
	t.Run("in-process", func(t *testing.T) {
		suite.Run(t, sdktest.InProcess(func(testing.TB) base.BasePlugin {
			return instantpay.New(hclog.NewNullLogger())
		}))
	})
	t.Run("binary", func(t *testing.T) {
		suite.Run(t, sdktest.Binary(sdktest.BuildBinary(t, "../examples/instantpay/cmd/gpuaas-plugin-instantpay")))
	})
}
