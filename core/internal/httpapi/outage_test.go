package httpapi_test

import (
	"net/http/httptest"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

// Postgres stopped while serving: a request that needs it answers 503
// database_unavailable quickly (no hang), and succeeds again once Postgres is back,
// with no restart of the process.
func TestDatabaseOutageFailsFastAndRecovers(t *testing.T) {
	stack := testenv.StartStack(t, "postgres")
	pool := testenv.Pool(t, testenv.DatabaseOn(t, stack.Env["GPUAAS_PG_ADMIN_URL"], stack.Env["DATABASE_URL"]))
	app := newApp(t)
	app.Get("/test/db", func(c *fiber.Ctx) error {
		var one int
		if err := pool.QueryRow(c.UserContext(), `SELECT 1`).Scan(&one); err != nil {
			return err
		}
		return c.JSON(one)
	})
	call := func() (int, string, time.Duration) {
		start := time.Now()
		resp, raw := do(t, app, httptest.NewRequest("GET", "/test/db", nil))
		code := ""
		if resp.StatusCode != 200 {
			code = decodeEnvelope(t, raw).Error.Code
		}
		return resp.StatusCode, code, time.Since(start)
	}
	if status, _, _ := call(); status != 200 {
		t.Fatalf("before the outage: %d", status)
	}
	stack.Stop("postgres")
	for i := range 5 {
		status, code, took := call()
		if status != 503 || code != "database_unavailable" {
			t.Fatalf("request %d during the outage: %d %s; want 503 database_unavailable", i, status, code)
		}
		if took > 5*time.Second {
			t.Fatalf("request %d during the outage took %s; want under 5 s", i, took)
		}
	}
	stack.Start("postgres")
	deadline := time.Now().Add(15 * time.Second)
	for {
		status, _, _ := call()
		if status == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("still %d 15 s after Postgres returned", status)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
