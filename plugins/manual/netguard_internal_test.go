package manual

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/netguard"
)

// TestDialRefusesForbiddenAddresses: whatever a URL's host name resolves
// to, the driver's dialer does not connect to link-local or metadata
// addresses (checked before any packet is sent).
func TestDialRefusesForbiddenAddresses(t *testing.T) {
	for _, c := range []struct {
		addr    string
		refused bool
	}{
		{"169.254.169.254:80", true},
		{"[fe80::a9fe:a9fe]:80", true},
		{"[::ffff:169.254.169.254]:80", true},
		{"[fd00:ec2::254]:80", true},
		{"100.100.100.200:80", true},
		{"168.63.129.16:80", true},
		{"224.0.0.1:80", true},
		{"0.0.0.0:80", true},
		{"127.0.0.1:8080", false},
		{"10.20.30.40:443", false},
		{"[2001:db8::1]:443", false},
	} {
		err := netguard.DialControl("tcp", c.addr, nil)
		var refused *netguard.RefusedError
		if got := errors.As(err, &refused); got != c.refused {
			t.Errorf("%s: refused %t, want %t (%v)", c.addr, got, c.refused, err)
		}
	}

	cl := newHTTPClient(nil, 5*time.Second)
	ctx := context.Background()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://169.254.169.254/latest/meta-data/iam/", nil)
	_, err := cl.Do(req)
	var refused *netguard.RefusedError
	if !errors.As(err, &refused) {
		t.Fatalf("request to the metadata address: %v", err)
	}
	if mapped := mapCoreError(ctx, "read", 0, nil, err); !errors.Is(mapped, base.ErrPermissionDenied) {
		t.Fatalf("mapped to %v", mapped)
	}
	if mapped := mapNomadError(ctx, "read", err); !errors.Is(mapped, base.ErrPermissionDenied) {
		t.Fatalf("Nomad: mapped to %v", mapped)
	}
}

// TestMapCoreError: the core's statuses and codes become sentinels.
func TestMapCoreError(t *testing.T) {
	ctx := context.Background()
	env := func(code string) []byte { return []byte(`{"error":{"code":"` + code + `","message":"m"}}`) }
	for _, c := range []struct {
		status int
		body   []byte
		want   error
	}{
		{400, env("validation_failed"), base.ErrInvalidArgument},
		{401, env("unauthenticated"), base.ErrUnauthenticated},
		{403, env("forbidden"), base.ErrPermissionDenied},
		{404, env("node_not_found"), base.ErrNotFound},
		{404, env("node_task_not_found"), base.ErrNotFound},
		{409, env("node_task_conflict"), base.ErrConflict},
		{409, env("conflict"), base.ErrFailedPrecondition},
		{429, env("rate_limited"), base.ErrUnavailable},
		{500, env("internal"), base.ErrUnavailable},
		{503, []byte("<html>bad gateway</html>"), base.ErrUnavailable},
		{418, nil, base.ErrInternal},
	} {
		err := mapCoreError(ctx, "call", c.status, c.body, nil)
		if !errors.Is(err, c.want) {
			t.Errorf("%d %s: %v, want %v", c.status, c.body, err, c.want)
		}
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if err := mapCoreError(cancelled, "call", 0, nil, errors.New("x")); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v", err)
	}
}
