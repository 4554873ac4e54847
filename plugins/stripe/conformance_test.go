package stripe_test

import (
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	stripedriver "github.com/gpuaas/gpuaas/plugins/stripe"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/payments"
	"github.com/gpuaas/gpuaas/sdk/sdktest"
)

// conformanceSuite runs the SDK's payments conformance kit against
// stripe-mock. stripe-mock answers every create with a new id and keeps
// nothing, so the kit's "a retry has one effect" checks exercise the
// driver's memory of recent operations; the Idempotency-Keys that make the
// same hold across restarts at Stripe are checked in TestCreateCheckout.
func conformanceSuite() sdktest.PaymentsSuite {
	return sdktest.PaymentsSuite{
		Config: func(t testing.TB) map[string]any { return config(mockURL(t)) },
		SlowConfig: func(t testing.TB) map[string]any {
			return config(hangingStripe(t))
		},
		Checkout: payments.CheckoutRequest{
			OrgID: "org-conformance", CustomerRef: "cus_conformance", AmountMinor: 5000, Currency: "USD",
			SuccessURL: "https://console.example.test/billing/ok", CancelURL: "https://console.example.test/billing",
			ExpiresAt: time.Now().Add(2 * time.Hour).Truncate(time.Second),
		},
		CompletedWebhook: func(t testing.TB, req payments.CheckoutRequest, s *payments.CheckoutSession) payments.Webhook {
			body := eventJSON(t, "evt_"+s.SessionID, "checkout.session.completed", time.Now(),
				checkoutObject(s.SessionID, req.OrgID, req.OperationID, req.AmountMinor, req.Currency, "paid"))
			return signed(body, testWebhookSecret, time.Now())
		},
	}
}

func TestConformance(t *testing.T) {
	suite := conformanceSuite()
	t.Run("in-process", func(t *testing.T) {
		suite.Run(t, sdktest.InProcess(func(testing.TB) base.BasePlugin {
			return stripedriver.New(hclog.NewNullLogger())
		}))
	})
	t.Run("binary", func(t *testing.T) {
		suite.Run(t, sdktest.Binary(sdktest.BuildBinary(t, "./cmd/gpuaas-plugin-stripe")))
	})
}

// TestCheckoutOverTheWire checks that what the core sends and gets back
// crosses the plugin boundary whole: the requested expiry, and the customer
// the driver created for an org without one.
func TestCheckoutOverTheWire(t *testing.T) {
	t.Parallel()
	d := sdktest.ConnectPayments(t, sdktest.InProcess(func(testing.TB) base.BasePlugin {
		return stripedriver.New(hclog.NewNullLogger())
	}))
	sdktest.Configure(t, d, payments.SupportedAPIVersions(), config(mockURL(t)))
	req := checkoutRequest("op-wire", "org-wire")
	sess, err := d.CreateCheckout(t.Context(), &req)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(sess.CustomerRef, "cus_") {
		t.Errorf("CustomerRef %q did not reach the host", sess.CustomerRef)
	}
	if !sess.ExpiresAt.Equal(req.ExpiresAt) {
		t.Errorf("ExpiresAt %s, want the requested %s", sess.ExpiresAt, req.ExpiresAt)
	}
}
