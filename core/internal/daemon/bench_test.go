package daemon_test

import (
	"context"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/principal"
)

// BenchmarkAuthCost measures, in one run against one core, the throughput of
// authenticated GET /users/me (API key, then OIDC bearer) as a ratio of GET /healthz.
// Target: >= 0.5 for both.
func BenchmarkAuthCost(b *testing.B) {
	e := newEnv(b)
	ctx := principal.With(context.Background(), principal.SystemPrincipal("bench"))
	u := e.insertUser(ctx, "bench@example.test", false)
	apiKey, _ := e.userKey(ctx, u)
	if _, err := e.ids.CreateOrg(principal.With(ctx, &principal.Principal{Type: principal.User, ID: u}), "bench", "Bench"); err != nil {
		b.Fatal(err)
	}
	jwt := e.issuer.Mint()
	e.setPolicy("ratelimit.requests_per_minute", 1_000_000)
	const requests, workers = 6000, 16
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: workers}}
	rate := func(path, token string) float64 {
		var n atomic.Int64
		var failed atomic.Int64
		start := time.Now()
		var wg sync.WaitGroup
		for range workers {
			wg.Go(func() {
				for n.Add(1) <= requests {
					req, _ := http.NewRequest("GET", e.url+path, nil)
					if token != "" {
						req.Header.Set("Authorization", "Bearer "+token)
					}
					resp, err := client.Do(req)
					if err != nil {
						failed.Add(1)
						continue
					}
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						failed.Add(1)
					}
				}
			})
		}
		wg.Wait()
		if failed.Load() > 0 {
			b.Fatalf("%s: %d of %d requests failed", path, failed.Load(), requests)
		}
		return requests / time.Since(start).Seconds()
	}
	rate("/api/v1/healthz", "") // warm up connections and caches
	rate("/api/v1/users/me", apiKey)
	rate("/api/v1/users/me", jwt)
	health := rate("/api/v1/healthz", "")
	withKey := rate("/api/v1/users/me", apiKey)
	withJWT := rate("/api/v1/users/me", jwt)
	b.ReportMetric(health, "healthz_req/s")
	b.ReportMetric(withKey, "me_apikey_req/s")
	b.ReportMetric(withJWT, "me_oidc_req/s")
	b.ReportMetric(withKey/health, "apikey/healthz_ratio")
	b.ReportMetric(withJWT/health, "oidc/healthz_ratio")
	b.Logf("auth cost: healthz %.0f req/s; /users/me with API key %.0f req/s (ratio %.2f), with OIDC token %.0f req/s (ratio %.2f)",
		health, withKey, withKey/health, withJWT, withJWT/health)
}
