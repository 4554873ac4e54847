package maas

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"testing"
	"time"

	gomaasapi "github.com/juju/gomaasapi/v2"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/netguard"
)

func TestMapError(t *testing.T) {
	t.Parallel()
	server := func(code int, body string) error {
		return gomaasapi.ServerError{StatusCode: code, BodyMessage: body, Header: http.Header{}}
	}
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	cases := []struct {
		name string
		ctx  context.Context
		err  error
		want error
	}{
		{"400", context.Background(), server(400, `{"distro_series": ["bad"]}`), base.ErrInvalidArgument},
		{"401", context.Background(), server(401, "Authorization Error: 'Invalid signature.'"), base.ErrUnauthenticated},
		{"403", context.Background(), server(403, "no"), base.ErrPermissionDenied},
		{"404", context.Background(), server(404, "No Machine matches the given query."), base.ErrNotFound},
		{"409", context.Background(), server(409, "No machine with system ID x available."), base.ErrFailedPrecondition},
		{"429", context.Background(), server(429, ""), base.ErrUnavailable},
		{"500", context.Background(), server(500, "boom"), base.ErrUnavailable},
		{"503", context.Background(), server(503, ""), base.ErrUnavailable},
		{"418", context.Background(), server(418, ""), base.ErrInternal},
		{"refused", context.Background(), &url.Error{Op: "Get", URL: "http://maas", Err: &net.OpError{Op: "dial", Err: errors.New("connection refused")}}, base.ErrUnavailable},
		{"request timeout", context.Background(), &url.Error{Op: "Get", URL: "http://maas", Err: context.DeadlineExceeded}, base.ErrUnavailable},
		{"caller cancelled", cancelled, &url.Error{Op: "Get", URL: "http://maas", Err: context.Canceled}, context.Canceled},
		{"blocked address", context.Background(), &url.Error{Op: "Get", URL: "http://x", Err: &netguard.RefusedError{Addr: "169.254.169.254:80"}}, base.ErrPermissionDenied},
		{"other", context.Background(), errors.New("odd"), base.ErrInternal},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := mapError(c.ctx, "read machine x", fmt.Errorf("wrapped: %w", c.err))
			if !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
			for _, s := range base.Sentinels() {
				if s != c.want && errors.Is(err, s) && c.want != context.Canceled {
					t.Errorf("%v also matches %v", err, s)
				}
			}
		})
	}
}

// TestDialRefusesMetadata shows the dial-time guard: whatever a host name
// resolves to, the driver's transport does not connect to link-local or
// metadata addresses.
func TestDialRefusesMetadata(t *testing.T) {
	t.Parallel()
	c, err := newConn("http://maas.example:5240/MAAS", "a:b:c", "", time.Second, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, target := range []string{"http://169.254.169.254/latest/meta-data/", "http://[fe80::1]:5240/", "http://100.100.100.200/"} {
		req, _ := http.NewRequest(http.MethodGet, target, nil)
		_, err := (&http.Client{Transport: c.transport}).Do(req)
		if err = mapError(context.Background(), "probe", err); !errors.Is(err, base.ErrPermissionDenied) {
			t.Errorf("%s: got %v, want ErrPermissionDenied", target, err)
		}
	}
}
