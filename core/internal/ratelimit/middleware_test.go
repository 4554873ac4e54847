package ratelimit_test

import (
	"encoding/json"
	"io"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/ratelimit"
)

// newApp mounts the middleware the way the core does: principals by header, the
// client IP otherwise, /healthz unlimited, and 429s through the error handler.
func newApp(l *ratelimit.Limiter) *fiber.App {
	app := fiber.New(fiber.Config{ErrorHandler: func(c *fiber.Ctx, err error) error {
		status := fiber.StatusInternalServerError
		if errcode.Of(err) == errcode.RateLimited {
			status = fiber.StatusTooManyRequests
		}
		return c.Status(status).JSON(fiber.Map{"error": fiber.Map{"code": errcode.Of(err)}})
	}})
	keyFn := func(c *fiber.Ctx) (string, ratelimit.Limit, bool) {
		if c.Path() == "/healthz" {
			return "", ratelimit.Limit{}, false
		}
		if p := c.Get("X-Test-Principal"); p != "" {
			return "user:" + p, ratelimit.Limit{Requests: 2, Window: time.Minute}, true
		}
		return "ip:" + c.IP(), ratelimit.Limit{Requests: 1, Window: time.Minute}, true
	}
	onLimited := func(c *fiber.Ctx, d ratelimit.Decision) error {
		return errcode.New(errcode.RateLimited, "too many requests; retry in %s", d.RetryAfter.Round(time.Second))
	}
	app.Use(ratelimit.Middleware(l, keyFn, onLimited))
	app.Get("/*", func(c *fiber.Ctx) error { return c.SendString("ok") })
	return app
}

func TestMiddlewareHeaders(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.clock.Add(500 * time.Millisecond) // 12:00:30.5
	app := newApp(b.limiter(t, b.pool, false))
	reset := strconv.FormatInt(time.Date(2030, 1, 2, 12, 1, 0, 0, time.UTC).Unix(), 10)
	nextReset := strconv.FormatInt(time.Date(2030, 1, 2, 12, 2, 0, 0, time.UTC).Unix(), 10)
	steps := []struct {
		name       string
		advance    time.Duration
		path       string
		principal  string
		wantStatus int
		// want maps header to value; "" means the header must be absent.
		want     map[string]string
		wantCode string
	}{
		{name: "first", path: "/v1/x", principal: "alice", wantStatus: 200,
			want: map[string]string{"X-RateLimit-Limit": "2", "X-RateLimit-Remaining": "1", "X-RateLimit-Reset": reset, "Retry-After": ""}},
		{name: "second", path: "/v1/x", principal: "alice", wantStatus: 200,
			want: map[string]string{"X-RateLimit-Limit": "2", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset, "Retry-After": ""}},
		{name: "third is limited", path: "/v1/x", principal: "alice", wantStatus: 429, wantCode: "rate_limited",
			want: map[string]string{"X-RateLimit-Limit": "2", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset, "Retry-After": "30"}},
		{name: "retry after rounds up", advance: 29 * time.Second, path: "/v1/x", principal: "alice", wantStatus: 429, wantCode: "rate_limited",
			want: map[string]string{"X-RateLimit-Remaining": "0", "Retry-After": "1"}},
		{name: "other principal", path: "/v1/x", principal: "bob", wantStatus: 200,
			want: map[string]string{"X-RateLimit-Limit": "2", "X-RateLimit-Remaining": "1"}},
		{name: "anonymous by ip", path: "/v1/x", wantStatus: 200,
			want: map[string]string{"X-RateLimit-Limit": "1", "X-RateLimit-Remaining": "0"}},
		{name: "anonymous limited", path: "/v1/x", wantStatus: 429, wantCode: "rate_limited",
			want: map[string]string{"X-RateLimit-Limit": "1", "Retry-After": "1"}},
		{name: "unlimited route", path: "/healthz", wantStatus: 200,
			want: map[string]string{"X-RateLimit-Limit": "", "X-RateLimit-Remaining": "", "X-RateLimit-Reset": "", "Retry-After": ""}},
		{name: "next window", advance: 500 * time.Millisecond, path: "/v1/x", principal: "alice", wantStatus: 200,
			want: map[string]string{"X-RateLimit-Limit": "2", "X-RateLimit-Remaining": "1", "X-RateLimit-Reset": nextReset, "Retry-After": ""}},
	}
	for _, s := range steps {
		b.clock.Add(s.advance)
		req := httptest.NewRequest("GET", s.path, nil)
		if s.principal != "" {
			req.Header.Set("X-Test-Principal", s.principal)
		}
		resp, err := app.Test(req, -1)
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		body, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode != s.wantStatus {
			t.Fatalf("%s: status %d, want %d (body %s)", s.name, resp.StatusCode, s.wantStatus, body)
		}
		for h, v := range s.want {
			if got := resp.Header.Get(h); got != v {
				t.Errorf("%s: %s = %q, want %q", s.name, h, got, v)
			}
		}
		if s.wantCode != "" {
			var env struct {
				Error struct{ Code string } `json:"error"`
			}
			if err := json.Unmarshal(body, &env); err != nil || env.Error.Code != s.wantCode {
				t.Errorf("%s: body %s, want error code %s", s.name, body, s.wantCode)
			}
		}
	}
}

func TestMiddlewarePassesWhenStoreFails(t *testing.T) {
	t.Parallel()
	b := setup(t)
	l := b.limiter(t, b.pool, true)
	b.pool.Close()
	app := newApp(l)
	for i := 0; i < 3; i++ {
		req := httptest.NewRequest("GET", "/v1/x", nil)
		req.Header.Set("X-Test-Principal", "alice")
		resp, err := app.Test(req, -1)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("request %d: status %d, want 200 while the store is down", i, resp.StatusCode)
		}
	}
	if got := metricValue(t, b.reg, "gpuaas_ratelimit_store_errors_total", map[string]string{"op": "allow"}); got != 3 {
		t.Fatalf("store errors = %v, want 3", got)
	}
}
