package idempotency_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/idempotency"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

const ttl = time.Hour

// clock is a settable clock shared by the store and the test.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// env is one test's app, database and knobs.
type env struct {
	pool    *pgxpool.Pool
	store   *idempotency.Store
	clock   *clock
	reg     *prometheus.Registry
	base    string
	client  *http.Client
	runs    map[string]*atomic.Int64
	gate    chan struct{} // /slow waits for it to close (openGate)
	opened  sync.Once
	started chan struct{} // /slow signals that a run began
}

// statusFor mirrors the HTTP layer's mapping for the codes the test app returns.
func statusFor(code errcode.Code) int {
	switch code {
	case idempotency.InvalidKey, errcode.ValidationFailed:
		return http.StatusBadRequest
	case idempotency.KeyReused:
		return http.StatusUnprocessableEntity
	case idempotency.InFlight, errcode.Conflict:
		return http.StatusConflict
	}
	return http.StatusInternalServerError
}

// writeEnvelope renders err like the HTTP layer's writeError.
func writeEnvelope(c *fiber.Ctx, err error) {
	msg := "internal error"
	if e := errcode.As(err); e != nil {
		msg = e.Message
	}
	c.Status(statusFor(errcode.Of(err)))
	_ = c.JSON(map[string]any{"error": map[string]any{
		"code": errcode.Of(err), "message": msg, "correlation_id": c.Locals("corr"),
	}})
}

func setup(t *testing.T, opts ...idempotency.Option) *env {
	t.Helper()
	pool, _ := testenv.MigratedPool(t)
	if _, err := pool.Exec(context.Background(),
		`CREATE TABLE test_things (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), name text NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	e := &env{
		pool:    pool,
		clock:   &clock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)},
		reg:     prometheus.NewRegistry(),
		client:  &http.Client{Timeout: 30 * time.Second},
		runs:    map[string]*atomic.Int64{},
		gate:    make(chan struct{}),
		started: make(chan struct{}, 100),
	}
	for _, r := range []string{"/things", "/conflict", "/boom", "/unavailable", "/panic", "/cancelled", "/slow"} {
		e.runs[r] = &atomic.Int64{}
	}
	e.store = idempotency.New(pool, append([]idempotency.Option{
		idempotency.WithTTL(func(context.Context) time.Duration { return ttl }),
		idempotency.WithClock(e.clock.Now),
		idempotency.WithLogger(testenv.Logger(t)),
		idempotency.WithRegisterer(e.reg),
		idempotency.WithErrorWriter(writeEnvelope),
	}, opts...)...)

	app := fiber.New(fiber.Config{DisableStartupMessage: true})
	// The outer middleware plays requestContext and observe: a correlation id, a
	// cancellable request context, per-request rate-limit headers, the envelope.
	app.Use(func(c *fiber.Ctx) error {
		id := uuid.NewString()
		c.Locals("corr", id)
		c.Set("X-Correlation-ID", id)
		c.Set("X-RateLimit-Remaining", id)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		c.Locals("cancel", cancel)
		c.SetUserContext(ctx)
		err := func() (err error) {
			defer func() {
				if r := recover(); r != nil {
					err = fmt.Errorf("panic: %v", r)
				}
			}()
			return c.Next()
		}()
		if err != nil {
			writeEnvelope(c, err)
		}
		return nil
	})
	app.Use(e.store.Middleware(func(c *fiber.Ctx) string { return c.Get("X-Test-Principal") }))

	create := func(c *fiber.Ctx) error {
		var in struct {
			Name string `json:"name"`
		}
		if err := json.Unmarshal(c.Body(), &in); err != nil || in.Name == "" {
			return errcode.New(errcode.ValidationFailed, "name is required (%s)", uuid.NewString())
		}
		var id string
		if err := pool.QueryRow(c.UserContext(), `INSERT INTO test_things (name) VALUES ($1) RETURNING id::text`, in.Name).Scan(&id); err != nil {
			return fmt.Errorf("insert thing: %w", err)
		}
		c.Location("/things/" + id)
		c.Set("X-Thing-Id", id)
		return c.Status(http.StatusCreated).JSON(map[string]string{"id": id, "name": in.Name})
	}
	count := func(path string, h fiber.Handler) {
		app.Post(path, func(c *fiber.Ctx) error {
			e.runs[path].Add(1)
			return h(c)
		})
	}
	count("/things", create)
	count("/conflict", func(c *fiber.Ctx) error {
		return errcode.New(errcode.Conflict, "thing %s already exists", uuid.NewString())
	})
	count("/boom", func(c *fiber.Ctx) error { return errors.New("database exploded") })
	count("/unavailable", func(c *fiber.Ctx) error {
		return c.Status(http.StatusServiceUnavailable).SendString("try later " + uuid.NewString())
	})
	count("/panic", func(c *fiber.Ctx) error { panic("handler bug") })
	count("/cancelled", func(c *fiber.Ctx) error {
		if err := create(c); err != nil {
			return err
		}
		c.Locals("cancel").(context.CancelFunc)() // the client went away
		return nil
	})
	count("/slow", func(c *fiber.Ctx) error {
		e.started <- struct{}{}
		<-e.gate
		return create(c)
	})
	app.Get("/things", func(c *fiber.Ctx) error { return c.SendString("list") })

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = app.Listener(ln) }()
	t.Cleanup(func() { _ = app.Shutdown() })
	t.Cleanup(e.openGate) // runs first: a failed test must not leave handlers blocked
	e.base = "http://" + ln.Addr().String()
	return e
}

// openGate lets every /slow run finish.
func (e *env) openGate() { e.opened.Do(func() { close(e.gate) }) }

// call is one request of a test.
type call struct {
	principal string   // X-Test-Principal; "" is anonymous
	keys      []string // Idempotency-Key header values; nil sends none
	method    string   // default POST
	path      string
	body      string
}

type response struct {
	status int
	header http.Header
	body   []byte
	err    error // of a request sent from another goroutine
}

// sendAsync sends c from a new goroutine and delivers the response on out.
func (e *env) sendAsync(c call, out chan<- response) {
	go func() {
		r, err := e.send(c)
		r.err = err
		out <- r
	}()
}

// wait receives a response of sendAsync.
func wait(t *testing.T, in <-chan response) response {
	t.Helper()
	select {
	case r := <-in:
		if r.err != nil {
			t.Fatal(r.err)
		}
		return r
	case <-time.After(30 * time.Second):
		t.Fatal("no response after 30s")
	}
	return response{}
}

func (e *env) do(t *testing.T, c call) response {
	t.Helper()
	r, err := e.send(c)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// send is do for goroutines other than the test's.
func (e *env) send(c call) (response, error) {
	if c.method == "" {
		c.method = http.MethodPost
	}
	req, err := http.NewRequest(c.method, e.base+c.path, strings.NewReader(c.body))
	if err != nil {
		return response{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	if c.principal != "" {
		req.Header.Set("X-Test-Principal", c.principal)
	}
	if c.keys != nil {
		req.Header[idempotency.HeaderKey] = c.keys
	}
	resp, err := e.client.Do(req)
	if err != nil {
		return response{}, fmt.Errorf("%s %s: %w", c.method, c.path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return response{}, fmt.Errorf("%s %s: read body: %w", c.method, c.path, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: body}, nil
}

func (r response) code(t *testing.T) errcode.Code {
	t.Helper()
	var env struct {
		Error struct {
			Code errcode.Code `json:"code"`
		} `json:"error"`
	}
	if err := json.Unmarshal(r.body, &env); err != nil {
		t.Fatalf("not an error envelope: %s", r.body)
	}
	return env.Error.Code
}

// sameResponse fails unless replay is first replayed byte for byte.
func sameResponse(t *testing.T, first, replay response) {
	t.Helper()
	if replay.status != first.status {
		t.Errorf("replay status %d, first %d", replay.status, first.status)
	}
	if !bytes.Equal(replay.body, first.body) {
		t.Errorf("replay body differs:\nfirst:  %q\nreplay: %q", first.body, replay.body)
	}
	for _, h := range []string{"Content-Type", "Location", "X-Thing-Id"} {
		if replay.header.Get(h) != first.header.Get(h) {
			t.Errorf("replay %s = %q, first %q", h, replay.header.Get(h), first.header.Get(h))
		}
	}
	if got := replay.header.Get(idempotency.HeaderReplayed); got != "true" {
		t.Errorf("replay %s = %q, want true", idempotency.HeaderReplayed, got)
	}
	// Per-request headers belong to the replaying request, not the stored one.
	if replay.header.Get("X-Correlation-ID") == first.header.Get("X-Correlation-ID") {
		t.Errorf("replay carries the first request's correlation id")
	}
	if replay.header.Get("X-RateLimit-Remaining") != replay.header.Get("X-Correlation-ID") {
		t.Errorf("replay carries a stored rate-limit header %q", replay.header.Get("X-RateLimit-Remaining"))
	}
}

func (e *env) count(t *testing.T, query string) int {
	t.Helper()
	var n int
	if err := e.pool.QueryRow(context.Background(), query).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// counter is the value of a counter family (summed over labels).
func (e *env) counter(t *testing.T, name string) float64 {
	t.Helper()
	families, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, f := range families {
		if f.GetName() == name {
			for _, m := range f.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

func keys(k ...string) []string { return k }

func TestMiddleware(t *testing.T) {
	t.Parallel()
	type step struct {
		call
		advance    time.Duration // move the clock before the call
		wantStatus int
		wantCode   errcode.Code // for error responses
		replayOf   int          // 1-based step whose response this must replay; 0: a fresh response
	}
	thing := `{"name":"gpu-box"}`
	alice := "user:alice"
	tests := []struct {
		name        string
		steps       []step
		wantRuns    map[string]int64
		wantThings  int // rows the handlers wrote
		wantKeys    int // idempotency rows left
		wantMetrics map[string]float64
	}{
		{
			name: "replay returns the first response byte for byte",
			steps: []step{
				{call: call{principal: alice, keys: keys("k1"), path: "/things", body: thing}, wantStatus: 201},
				{call: call{principal: alice, keys: keys("k1"), path: "/things", body: thing}, wantStatus: 201, replayOf: 1},
				{call: call{principal: alice, keys: keys("k1"), path: "/things", body: thing}, wantStatus: 201, replayOf: 1},
			},
			wantRuns: map[string]int64{"/things": 1}, wantThings: 1, wantKeys: 1,
			wantMetrics: map[string]float64{"gpuaas_idempotency_replays_total": 2},
		},
		{
			name: "same key with a different request is rejected and writes nothing",
			steps: []step{
				{call: call{principal: alice, keys: keys("k1"), path: "/things", body: thing}, wantStatus: 201},
				{call: call{principal: alice, keys: keys("k1"), path: "/things", body: `{"name":"other"}`}, wantStatus: 422, wantCode: idempotency.KeyReused},
				{call: call{principal: alice, keys: keys("k1"), path: "/things?dry_run=true", body: thing}, wantStatus: 422, wantCode: idempotency.KeyReused},
				{call: call{principal: alice, keys: keys("k1"), path: "/cancelled", body: thing}, wantStatus: 422, wantCode: idempotency.KeyReused},
				{call: call{principal: alice, keys: keys("k1"), path: "/things", body: thing}, wantStatus: 201, replayOf: 1},
			},
			wantRuns: map[string]int64{"/things": 1}, wantThings: 1, wantKeys: 1,
			wantMetrics: map[string]float64{"gpuaas_idempotency_key_reuse_total": 3, "gpuaas_idempotency_replays_total": 1},
		},
		{
			name: "keys are scoped by principal",
			steps: []step{
				{call: call{principal: alice, keys: keys("shared"), path: "/things", body: thing}, wantStatus: 201},
				{call: call{principal: "user:bob", keys: keys("shared"), path: "/things", body: thing}, wantStatus: 201},
				{call: call{principal: alice, keys: keys("shared"), path: "/things", body: thing}, wantStatus: 201, replayOf: 1},
				{call: call{principal: "user:bob", keys: keys("shared"), path: "/things", body: thing}, wantStatus: 201, replayOf: 2},
			},
			wantRuns: map[string]int64{"/things": 2}, wantThings: 2, wantKeys: 2,
		},
		{
			name: "an expired key runs again",
			steps: []step{
				{call: call{principal: alice, keys: keys("k1"), path: "/things", body: thing}, wantStatus: 201},
				{call: call{principal: alice, keys: keys("k1"), path: "/things", body: thing}, advance: ttl - time.Second, wantStatus: 201, replayOf: 1},
				{call: call{principal: alice, keys: keys("k1"), path: "/things", body: thing}, advance: time.Second, wantStatus: 201},
				{call: call{principal: alice, keys: keys("k1"), path: "/things", body: `{"name":"reused within the new expiry"}`}, wantStatus: 422, wantCode: idempotency.KeyReused},
				{call: call{principal: alice, keys: keys("k1"), path: "/things", body: thing}, wantStatus: 201, replayOf: 3},
			},
			wantRuns: map[string]int64{"/things": 2}, wantThings: 2, wantKeys: 1,
		},
		{
			name: "client errors are stored and replayed",
			steps: []step{
				{call: call{principal: alice, keys: keys("k1"), path: "/conflict"}, wantStatus: 409, wantCode: errcode.Conflict},
				{call: call{principal: alice, keys: keys("k1"), path: "/conflict"}, wantStatus: 409, wantCode: errcode.Conflict, replayOf: 1},
				{call: call{principal: alice, keys: keys("k2"), path: "/things", body: `{}`}, wantStatus: 400, wantCode: errcode.ValidationFailed},
				{call: call{principal: alice, keys: keys("k2"), path: "/things", body: `{}`}, wantStatus: 400, wantCode: errcode.ValidationFailed, replayOf: 3},
			},
			wantRuns: map[string]int64{"/conflict": 1, "/things": 1}, wantThings: 0, wantKeys: 2,
		},
		{
			name: "server errors, panics and cancelled requests are not stored",
			steps: []step{
				{call: call{principal: alice, keys: keys("k1"), path: "/boom"}, wantStatus: 500, wantCode: errcode.Internal},
				{call: call{principal: alice, keys: keys("k1"), path: "/boom"}, wantStatus: 500, wantCode: errcode.Internal},
				{call: call{principal: alice, keys: keys("k2"), path: "/unavailable"}, wantStatus: 503},
				{call: call{principal: alice, keys: keys("k2"), path: "/unavailable"}, wantStatus: 503},
				{call: call{principal: alice, keys: keys("k3"), path: "/panic"}, wantStatus: 500, wantCode: errcode.Internal},
				{call: call{principal: alice, keys: keys("k3"), path: "/panic"}, wantStatus: 500, wantCode: errcode.Internal},
				{call: call{principal: alice, keys: keys("k4"), path: "/cancelled", body: thing}, wantStatus: 201},
				{call: call{principal: alice, keys: keys("k4"), path: "/cancelled", body: thing}, wantStatus: 201},
			},
			wantRuns:   map[string]int64{"/boom": 2, "/unavailable": 2, "/panic": 2, "/cancelled": 2},
			wantThings: 2, wantKeys: 0,
			wantMetrics: map[string]float64{"gpuaas_idempotency_released_total": 8, "gpuaas_idempotency_replays_total": 0},
		},
		{
			name: "requests without a key, anonymous requests and other methods pass through",
			steps: []step{
				{call: call{principal: alice, path: "/things", body: thing}, wantStatus: 201},
				{call: call{principal: alice, path: "/things", body: thing}, wantStatus: 201},
				{call: call{keys: keys("k1"), path: "/things", body: thing}, wantStatus: 201},
				{call: call{keys: keys("k1"), path: "/things", body: thing}, wantStatus: 201},
				{call: call{principal: alice, keys: keys(strings.Repeat("k", 300)), method: http.MethodGet, path: "/things"}, wantStatus: 200},
			},
			wantRuns: map[string]int64{"/things": 4}, wantThings: 4, wantKeys: 0,
		},
		{
			name: "invalid keys are rejected before the handler",
			steps: []step{
				{call: call{principal: alice, keys: keys(""), path: "/things", body: thing}, wantStatus: 400, wantCode: idempotency.InvalidKey},
				{call: call{principal: alice, keys: keys(strings.Repeat("k", 256)), path: "/things", body: thing}, wantStatus: 400, wantCode: idempotency.InvalidKey},
				{call: call{principal: alice, keys: keys("clé"), path: "/things", body: thing}, wantStatus: 400, wantCode: idempotency.InvalidKey},
				{call: call{principal: alice, keys: keys("tab\tinside"), path: "/things", body: thing}, wantStatus: 400, wantCode: idempotency.InvalidKey},
				{call: call{principal: alice, keys: keys("a", "b"), path: "/things", body: thing}, wantStatus: 400, wantCode: idempotency.InvalidKey},
				{call: call{principal: alice, keys: keys(strings.Repeat("k", 255)), path: "/things", body: thing}, wantStatus: 201},
				{call: call{principal: alice, keys: keys("~ printable: \"ascii\" {ok} !"), path: "/things", body: thing}, wantStatus: 201},
			},
			wantRuns: map[string]int64{"/things": 2}, wantThings: 2, wantKeys: 2,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := setup(t)
			var got []response
			for i, s := range tt.steps {
				e.clock.Advance(s.advance)
				r := e.do(t, s.call)
				got = append(got, r)
				if r.status != s.wantStatus {
					t.Fatalf("step %d: status %d, want %d: %s", i+1, r.status, s.wantStatus, r.body)
				}
				if s.wantCode != "" {
					if c := r.code(t); c != s.wantCode {
						t.Errorf("step %d: code %q, want %q", i+1, c, s.wantCode)
					}
				}
				if s.replayOf > 0 {
					sameResponse(t, got[s.replayOf-1], r)
				} else if h := r.header.Get(idempotency.HeaderReplayed); h != "" {
					t.Errorf("step %d: fresh response has %s: %s", i+1, idempotency.HeaderReplayed, h)
				}
			}
			for path, runs := range e.runs {
				if n := runs.Load(); n != tt.wantRuns[path] {
					t.Errorf("%s ran %d times, want %d", path, n, tt.wantRuns[path])
				}
			}
			if n := e.count(t, `SELECT count(*) FROM test_things`); n != tt.wantThings {
				t.Errorf("%d things written, want %d", n, tt.wantThings)
			}
			if n := e.count(t, `SELECT count(*) FROM idempotency_keys`); n != tt.wantKeys {
				t.Errorf("%d idempotency keys stored, want %d", n, tt.wantKeys)
			}
			if n := e.count(t, `SELECT count(*) FROM idempotency_keys WHERE state <> 'completed'`); n != 0 {
				t.Errorf("%d keys left in flight", n)
			}
			for name, want := range tt.wantMetrics {
				if got := e.counter(t, name); got != want {
					t.Errorf("%s = %v, want %v", name, got, want)
				}
			}
		})
	}
}

// TestConcurrentDuplicates sends one key from many clients at once while the
// handler is slow: it runs once, the others are told the first is in flight, and
// once it completes the key replays its response.
func TestConcurrentDuplicates(t *testing.T) {
	t.Parallel()
	e := setup(t)
	const clients = 20
	c := call{principal: "user:alice", keys: keys("dup"), path: "/slow", body: `{"name":"slow"}`}
	results := make(chan response, clients)
	for range clients {
		e.sendAsync(c, results)
	}
	// The handler holds until the gate opens, so every other client must be
	// answered while the first is in flight.
	var conflicts []response
	for range clients - 1 {
		conflicts = append(conflicts, wait(t, results))
	}
	e.openGate()
	first := wait(t, results)

	if first.status != http.StatusCreated {
		t.Fatalf("first: status %d: %s", first.status, first.body)
	}
	for i, r := range conflicts {
		if r.status != http.StatusConflict || r.code(t) != idempotency.InFlight {
			t.Errorf("duplicate %d: status %d: %s", i, r.status, r.body)
		}
		if ra := r.header.Get("Retry-After"); ra != "1" {
			t.Errorf("duplicate %d: Retry-After %q, want 1", i, ra)
		}
	}
	sameResponse(t, first, e.do(t, c))
	if n := e.runs["/slow"].Load(); n != 1 {
		t.Errorf("handler ran %d times, want 1", n)
	}
	if n := e.count(t, `SELECT count(*) FROM test_things`); n != 1 {
		t.Errorf("%d things written, want 1", n)
	}
	if got := e.counter(t, "gpuaas_idempotency_in_flight_conflicts_total"); got != clients-1 {
		t.Errorf("conflicts metric %v, want %d", got, clients-1)
	}
	if got := e.counter(t, "gpuaas_idempotency_replays_total"); got != 1 {
		t.Errorf("replays metric %v, want 1", got)
	}
}

// TestAbandonedClaim: an in-flight claim older than the lease no longer blocks its
// key; the first request's late response is not the one kept.
func TestAbandonedClaim(t *testing.T) {
	t.Parallel()
	const lease = time.Minute
	e := setup(t, idempotency.WithLease(lease))
	c := call{principal: "user:alice", keys: keys("k"), path: "/slow", body: `{"name":"slow"}`}
	stuck := make(chan response, 1)
	e.sendAsync(c, stuck)
	<-e.started

	if r := e.do(t, c); r.status != http.StatusConflict || r.header.Get("Retry-After") != "1" {
		t.Fatalf("within the lease: status %d: %s", r.status, r.body)
	}
	e.clock.Advance(lease)
	second := make(chan response, 1)
	e.sendAsync(c, second)
	<-e.started
	e.openGate()

	late, kept := wait(t, stuck), wait(t, second)
	if late.status != http.StatusCreated || kept.status != http.StatusCreated {
		t.Fatalf("statuses %d and %d", late.status, kept.status)
	}
	sameResponse(t, kept, e.do(t, c))
	if n := e.runs["/slow"].Load(); n != 2 {
		t.Errorf("handler ran %d times, want 2", n)
	}
	if got := e.counter(t, "gpuaas_idempotency_store_errors_total"); got != 1 {
		t.Errorf("store errors (claim lost) %v, want 1", got)
	}
}

// TestJanitor deletes expired keys and only those.
func TestJanitor(t *testing.T) {
	t.Parallel()
	e := setup(t, idempotency.WithJanitorInterval(10*time.Millisecond))
	ctx := context.Background()
	thing := func(key string) call {
		return call{principal: "user:alice", keys: keys(key), path: "/things", body: `{"name":"x"}`}
	}
	for _, k := range []string{"old-1", "old-2"} {
		if r := e.do(t, thing(k)); r.status != http.StatusCreated {
			t.Fatalf("status %d", r.status)
		}
	}
	e.clock.Advance(ttl / 2)
	if r := e.do(t, thing("young")); r.status != http.StatusCreated {
		t.Fatalf("status %d", r.status)
	}
	e.clock.Advance(ttl / 2)

	tests := []struct {
		name     string
		advance  time.Duration
		sweep    func(t *testing.T)
		wantLeft []string
	}{
		{
			name: "DeleteExpired removes keys past their expiry",
			sweep: func(t *testing.T) {
				n, err := e.store.DeleteExpired(ctx)
				if err != nil || n != 2 {
					t.Fatalf("DeleteExpired = %d, %v; want 2", n, err)
				}
			},
			wantLeft: []string{"young"},
		},
		{
			name:    "Run sweeps until cancelled",
			advance: ttl / 2,
			sweep: func(t *testing.T) {
				ctx, cancel := context.WithCancel(ctx)
				done := make(chan error, 1)
				go func() { done <- e.store.Run(ctx) }()
				deadline := time.Now().Add(10 * time.Second)
				for e.count(t, `SELECT count(*) FROM idempotency_keys`) > 0 && time.Now().Before(deadline) {
					time.Sleep(10 * time.Millisecond)
				}
				cancel()
				if err := <-done; err != nil {
					t.Fatalf("Run: %v", err)
				}
			},
			wantLeft: nil,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e.clock.Advance(tt.advance)
			tt.sweep(t)
			rows, err := e.pool.Query(ctx, `SELECT key FROM idempotency_keys ORDER BY key`)
			if err != nil {
				t.Fatal(err)
			}
			var left []string
			for rows.Next() {
				var k string
				if err := rows.Scan(&k); err != nil {
					t.Fatal(err)
				}
				left = append(left, k)
			}
			if err := rows.Err(); err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(left) != fmt.Sprint(tt.wantLeft) {
				t.Errorf("keys left %v, want %v", left, tt.wantLeft)
			}
		})
	}
}

// TestStoreDown: when the key store cannot be reached the request fails and the
// handler does not run (a duplicate is worse than a retry).
func TestStoreDown(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.pool.Close()
	r := e.do(t, call{principal: "user:alice", keys: keys("k"), path: "/conflict"})
	if r.status != http.StatusInternalServerError {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	if n := e.runs["/conflict"].Load(); n != 0 {
		t.Errorf("handler ran %d times with the key store down", n)
	}
}
