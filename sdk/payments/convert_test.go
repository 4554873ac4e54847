package payments

import (
	"reflect"
	"testing"
	"time"
)

func TestCheckoutRoundTrip(t *testing.T) {
	at := time.Date(2026, 3, 1, 12, 30, 0, 0, time.UTC)
	req := &CheckoutRequest{
		OperationID: "op", OrgID: "org", CustomerRef: "cus_1", AmountMinor: 2500, Currency: "EUR",
		SuccessURL: "https://ok", CancelURL: "https://cancel", Metadata: map[string]string{"k": "v"}, ExpiresAt: at,
	}
	if got := checkoutFromProto(checkoutToProto(req)); !reflect.DeepEqual(got, req) {
		t.Errorf("checkout request round trip:\n got %+v\nwant %+v", got, req)
	}
	sess := &CheckoutSession{SessionID: "cs_1", URL: "https://pay", ExpiresAt: at, CustomerRef: "cus_1"}
	if got := sessionFromProto(sessionToProto(sess)); !reflect.DeepEqual(got, sess) {
		t.Errorf("checkout session round trip:\n got %+v\nwant %+v", got, sess)
	}
	if got := checkoutFromProto(checkoutToProto(&CheckoutRequest{})); !got.ExpiresAt.IsZero() {
		t.Errorf("an unset expiry came back as %s", got.ExpiresAt)
	}
}
