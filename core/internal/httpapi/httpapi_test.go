package httpapi_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/correlation"
	"github.com/gpuaas/gpuaas/core/internal/httpapi"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

type envelope struct {
	Error struct {
		Code          string         `json:"code"`
		Message       string         `json:"message"`
		Details       map[string]any `json:"details"`
		CorrelationID string         `json:"correlation_id"`
	} `json:"error"`
}

type echoBody struct {
	Name  string `json:"name"`
	Count int    `json:"count"`
	Tags  []struct {
		Key string `json:"key"`
	} `json:"tags"`
}

// newApp builds the real app with the real handlers, plus test-only routes that
// exercise the shared machinery (strict decoding, panics, coded errors).
func newApp(t *testing.T, checks ...httpapi.Check) *fiber.App {
	t.Helper()
	reg := prometheus.NewRegistry()
	api := &httpapi.API{Version: "test", Checks: checks, Gatherer: reg}
	app := httpapi.New(testenv.Logger(t), api, httpapi.Options{MaxBodyBytes: 4096, Registerer: reg,
		BeforeAuth: []fiber.Handler{asTestUser}})
	app.Post("/test/echo", func(c *fiber.Ctx) error {
		var b echoBody
		if err := httpapi.DecodeStrict(c.Body(), &b); err != nil {
			return err
		}
		return c.JSON(b)
	})
	app.Get("/test/panic", func(c *fiber.Ctx) error { panic("boom") })
	app.Get("/test/plain-error", func(c *fiber.Ctx) error { return errors.New("secret internal detail") })
	return app
}

// asTestUser authenticates every request as a test user, so the shared machinery
// can be exercised on test-only routes (authentication itself is tested against a
// real core in package daemon).
func asTestUser(c *fiber.Ctx) error {
	httpapi.SetPrincipal(c, &principal.Principal{Type: principal.User, ID: uuid.New(), Method: principal.MethodAPIKey})
	return c.Next()
}

func do(t *testing.T, app *fiber.App, req *http.Request) (*http.Response, []byte) {
	t.Helper()
	resp, err := app.Test(req, 10_000)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, body
}

func decodeEnvelope(t *testing.T, body []byte) envelope {
	t.Helper()
	var e envelope
	if err := json.Unmarshal(body, &e); err != nil || e.Error.Code == "" {
		t.Fatalf("not an error envelope: %s", body)
	}
	if e.Error.CorrelationID == "" || e.Error.Message == "" || e.Error.Details == nil {
		t.Fatalf("envelope misses correlation_id, message or details: %s", body)
	}
	return e
}

func TestErrorPaths(t *testing.T) {
	app := newApp(t)
	cases := []struct {
		name, method, path, ctype, body string
		status                          int
		code, field                     string
	}{
		{"wrong content type", "POST", "/test/echo", "text/plain", `{"name":"a"}`, 415, "unsupported_media_type", ""},
		{"missing content type", "POST", "/test/echo", "", `{"name":"a"}`, 415, "unsupported_media_type", ""},
		{"malformed json", "POST", "/test/echo", "application/json", `{"name":`, 400, "invalid_json", ""},
		{"not json at all", "POST", "/test/echo", "application/json", `hello`, 400, "invalid_json", ""},
		{"trailing data", "POST", "/test/echo", "application/json", `{"name":"a"} {}`, 400, "invalid_json", ""},
		{"empty body", "POST", "/test/echo", "application/json", ``, 400, "invalid_json", ""},
		{"unknown field", "POST", "/test/echo", "application/json", `{"name":"a","is_admin":true}`, 400, "unknown_field", "is_admin"},
		{"duplicate key", "POST", "/test/echo", "application/json", `{"name":"a","name":"b"}`, 400, "duplicate_key", "name"},
		{"nested duplicate key", "POST", "/test/echo", "application/json", `{"tags":[{"key":"a","key":"b"}]}`, 400, "duplicate_key", "tags[0].key"},
		{"wrong type", "POST", "/test/echo", "application/json", `{"count":"many"}`, 400, "validation_failed", "count"},
		{"too deep", "POST", "/test/echo", "application/json", strings.Repeat("[", 100) + strings.Repeat("]", 100), 400, "invalid_json", ""},
		{"unknown route", "GET", "/api/v1/nope", "", "", 404, "route_not_found", ""},
		{"wrong method", "DELETE", "/api/v1/healthz", "", "", 405, "method_not_allowed", ""},
		{"panic", "GET", "/test/panic", "", "", 500, "internal", ""},
		{"uncoded error", "GET", "/test/plain-error", "", "", 500, "internal", ""},
		{"limit too large", "GET", "/api/v1/policy-keys?limit=1000", "", "", 400, "validation_failed", "limit"},
		{"limit zero", "GET", "/api/v1/policy-keys?limit=0", "", "", 400, "validation_failed", "limit"},
		{"limit not a number", "GET", "/api/v1/policy-keys?limit=ten", "", "", 400, "bad_request", ""},
		{"garbage cursor", "GET", "/api/v1/policy-keys?cursor=%%%", "", "", 400, "bad_request", ""},
		{"undecodable cursor", "GET", "/api/v1/policy-keys?cursor=bm90LWpzb24", "", "", 400, "invalid_cursor", "cursor"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var body io.Reader
			if tc.body != "" {
				body = strings.NewReader(tc.body)
			}
			req := httptest.NewRequest(tc.method, tc.path, body)
			if tc.ctype != "" {
				req.Header.Set("Content-Type", tc.ctype)
			}
			resp, raw := do(t, app, req)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, raw)
			}
			e := decodeEnvelope(t, raw)
			if e.Error.Code != tc.code {
				t.Fatalf("code %q, want %q: %s", e.Error.Code, tc.code, raw)
			}
			if tc.field != "" && e.Error.Details["field"] != tc.field {
				t.Fatalf("details.field %v, want %q", e.Error.Details["field"], tc.field)
			}
			if strings.Contains(string(raw), "secret internal detail") || strings.Contains(string(raw), "boom") {
				t.Fatalf("internal error text leaked: %s", raw)
			}
			if resp.Header.Get(correlation.Header) != e.Error.CorrelationID {
				t.Fatalf("header correlation id %q differs from envelope %q", resp.Header.Get(correlation.Header), e.Error.CorrelationID)
			}
		})
	}
}

// An oversized body is refused by the HTTP server before any handler runs; it must
// still answer 413 in the envelope. This needs a real socket (app.Test reports the
// server's refusal as a transport error).
func TestOversizedBody(t *testing.T) {
	app := newApp(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = app.Listener(ln) }()
	t.Cleanup(func() { _ = app.Shutdown() })
	big := `{"name":"` + strings.Repeat("x", 5000) + `"}`
	for _, chunked := range []bool{false, true} {
		var body io.Reader = strings.NewReader(big)
		if chunked {
			body = io.MultiReader(strings.NewReader(big)) // unknown length: sent chunked
		}
		req, _ := http.NewRequest("POST", "http://"+ln.Addr().String()+"/test/echo", body)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("chunked=%v: %v", chunked, err)
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 413 {
			t.Fatalf("chunked=%v: status %d, want 413: %s", chunked, resp.StatusCode, raw)
		}
		if e := decodeEnvelope(t, raw); e.Error.Code != "request_too_large" {
			t.Fatalf("chunked=%v: code %q", chunked, e.Error.Code)
		}
	}
}

func TestStrictDecodingAcceptsGoodJSON(t *testing.T) {
	app := newApp(t)
	req := httptest.NewRequest("POST", "/test/echo", strings.NewReader(`{"name":"a","count":2,"tags":[{"key":"x"},{"key":"y"}]}`))
	req.Header.Set("Content-Type", "application/json; charset=utf-8")
	resp, raw := do(t, app, req)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, raw)
	}
	var got echoBody
	if err := json.Unmarshal(raw, &got); err != nil || got.Name != "a" || got.Count != 2 || len(got.Tags) != 2 {
		t.Fatalf("echo = %s", raw)
	}
}

func TestCorrelationID(t *testing.T) {
	app := newApp(t)
	t.Run("echoes a valid id", func(t *testing.T) {
		req := httptest.NewRequest("GET", "/api/v1/healthz", nil)
		req.Header.Set(correlation.Header, "abc-123.X:y_z")
		resp, _ := do(t, app, req)
		if got := resp.Header.Get(correlation.Header); got != "abc-123.X:y_z" {
			t.Fatalf("echoed %q", got)
		}
	})
	t.Run("replaces an invalid id", func(t *testing.T) {
		req := httptest.NewRequest("GET", "/api/v1/nope", nil)
		req.Header.Set(correlation.Header, "evil\"\nid<script>")
		resp, raw := do(t, app, req)
		got := resp.Header.Get(correlation.Header)
		if got == "" || strings.Contains(got, "evil") || !correlation.Valid(got) {
			t.Fatalf("kept or dropped the invalid id: %q", got)
		}
		if decodeEnvelope(t, raw).Error.CorrelationID != got {
			t.Fatal("envelope and header ids differ")
		}
	})
	t.Run("makes one when absent", func(t *testing.T) {
		resp, _ := do(t, app, httptest.NewRequest("GET", "/api/v1/healthz", nil))
		if !correlation.Valid(resp.Header.Get(correlation.Header)) {
			t.Fatalf("no correlation id generated")
		}
	})
	t.Run("reaches the handler context", func(t *testing.T) {
		var seen string
		app.Get("/test/ctx", func(c *fiber.Ctx) error {
			seen = correlation.From(c.UserContext())
			return c.SendStatus(204)
		})
		req := httptest.NewRequest("GET", "/test/ctx", nil)
		req.Header.Set(correlation.Header, "from-client")
		do(t, app, req)
		if seen != "from-client" {
			t.Fatalf("handler saw %q", seen)
		}
	})
}

func TestHealthAndReadiness(t *testing.T) {
	ok := func(context.Context) error { return nil }
	down := func(context.Context) error { return errors.New("connection refused") }
	hang := func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }

	t.Run("healthz", func(t *testing.T) {
		resp, raw := do(t, newApp(t, httpapi.Check{Name: "postgres", Fn: down}), httptest.NewRequest("GET", "/api/v1/healthz", nil))
		if resp.StatusCode != 200 || !strings.Contains(string(raw), `"status":"ok"`) {
			t.Fatalf("healthz %d %s: must not depend on dependencies", resp.StatusCode, raw)
		}
	})
	t.Run("ready", func(t *testing.T) {
		app := newApp(t, httpapi.Check{Name: "postgres", Fn: ok}, httpapi.Check{Name: "nats", Fn: ok}, httpapi.Check{Name: "temporal", Fn: ok})
		resp, raw := do(t, app, httptest.NewRequest("GET", "/api/v1/readyz", nil))
		if resp.StatusCode != 200 || !strings.Contains(string(raw), `"status":"ready"`) {
			t.Fatalf("readyz %d %s", resp.StatusCode, raw)
		}
	})
	t.Run("names every failing dependency", func(t *testing.T) {
		app := newApp(t, httpapi.Check{Name: "postgres", Fn: down}, httpapi.Check{Name: "nats", Fn: ok}, httpapi.Check{Name: "temporal", Fn: hang})
		resp, raw := do(t, app, httptest.NewRequest("GET", "/api/v1/readyz", nil))
		if resp.StatusCode != 503 {
			t.Fatalf("readyz %d, want 503", resp.StatusCode)
		}
		e := decodeEnvelope(t, raw)
		failing, _ := e.Error.Details["failing"].([]any)
		if e.Error.Code != "not_ready" || len(failing) != 2 || failing[0] != "postgres" || failing[1] != "temporal" {
			t.Fatalf("envelope %s; want not_ready naming postgres and temporal", raw)
		}
	})
}

func TestMetrics(t *testing.T) {
	app := newApp(t)
	do(t, app, httptest.NewRequest("GET", "/api/v1/healthz", nil))
	// Labels must not alias request buffers that later requests overwrite (a bug
	// that made /metrics answer 500 with "collected before with the same labels").
	for i, m := range []string{"GET", "POST", "DELETE", "PUT", "GET", "PATCH", "GET", "POST"} {
		do(t, app, httptest.NewRequest(m, fmt.Sprintf("/no/such/route/%d", i), nil))
	}
	resp, raw := do(t, app, httptest.NewRequest("GET", "/metrics", nil))
	if resp.StatusCode != 200 {
		t.Fatalf("metrics %d", resp.StatusCode)
	}
	if !strings.Contains(string(raw), `gpuaas_http_requests_total{method="GET",route="/api/v1/healthz",status="200"} 1`) {
		t.Fatalf("request counter missing:\n%s", raw)
	}
}

func TestPolicyKeysPagination(t *testing.T) {
	app := newApp(t)
	var all []string
	cursor := ""
	for range 10 {
		url := "/api/v1/policy-keys?limit=1"
		if cursor != "" {
			url += "&cursor=" + cursor
		}
		resp, raw := do(t, app, httptest.NewRequest("GET", url, nil))
		if resp.StatusCode != 200 {
			t.Fatalf("%d %s", resp.StatusCode, raw)
		}
		var page struct {
			Items []struct {
				Key string `json:"key"`
			} `json:"items"`
			NextCursor string `json:"next_cursor"`
		}
		if err := json.Unmarshal(raw, &page); err != nil {
			t.Fatal(err)
		}
		for _, it := range page.Items {
			all = append(all, it.Key)
		}
		if page.NextCursor == "" {
			break
		}
		cursor = page.NextCursor
	}
	if len(all) < 2 {
		t.Fatalf("walked %v; want every key, one per page", all)
	}
	for i := 1; i < len(all); i++ {
		if all[i-1] >= all[i] {
			t.Fatalf("pages out of order or repeated: %v", all)
		}
	}
}
