package stripe_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"go/build"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	stripeapi "github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/webhook"

	stripedriver "github.com/gpuaas/gpuaas/plugins/stripe"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/payments"
)

const (
	testKey           = "sk_test_gpuaasStripeDriverTestKey"
	testWebhookSecret = "whsec_gpuaasStripeDriverTestSecret"
)

func TestMain(m *testing.M) {
	code := m.Run()
	mock.stop()
	os.Exit(code)
}

// stripeMock is the stripe-mock every test in the package shares: the one
// a dev stack exports in STRIPE_API_BASE, or one this package starts on
// free loopback ports the first time a test needs it.
type stripeMock struct {
	once sync.Once
	url  string
	err  error
	cmd  *exec.Cmd
	done chan struct{}
}

var mock stripeMock

// mockURL returns the base URL of stripe-mock, failing the test (never
// skipping it) when there is none.
func mockURL(t testing.TB) string {
	t.Helper()
	mock.once.Do(mock.start)
	if mock.err != nil {
		t.Fatalf("stripe-mock: %v", mock.err)
	}
	return mock.url
}

func (m *stripeMock) start() {
	if base := os.Getenv("STRIPE_API_BASE"); base != "" {
		m.url = strings.TrimRight(base, "/")
		return
	}
	bin, err := exec.LookPath("stripe-mock")
	if err != nil {
		bin = filepath.Join(build.Default.GOPATH, "bin", "stripe-mock")
		if _, statErr := os.Stat(bin); statErr != nil {
			m.err = errors.New("not found on PATH nor in " + bin +
				"; install it (go install github.com/stripe/stripe-mock@v0.203.0) or point STRIPE_API_BASE at a running one")
			return
		}
	}
	cmd := exec.Command(bin, "-http-addr", "127.0.0.1:", "-https-addr", "127.0.0.1:")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		m.err = err
		return
	}
	if err := cmd.Start(); err != nil {
		m.err = fmt.Errorf("start %s: %w", bin, err)
		return
	}
	m.cmd, m.done = cmd, make(chan struct{})
	addr := make(chan string, 1)
	go func() {
		defer close(m.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "Listening for HTTP at address: "); ok {
				addr <- a
			}
		}
		_ = cmd.Wait()
	}()
	select {
	case a := <-addr:
		m.url = "http://" + strings.TrimSpace(a)
	case <-m.done:
		m.err = fmt.Errorf("%s exited before listening: %s", bin, stderr.String())
	case <-time.After(time.Minute):
		m.err = fmt.Errorf("%s did not listen within a minute", bin)
		m.stop()
	}
}

func (m *stripeMock) stop() {
	if m.cmd == nil || m.cmd.Process == nil {
		return
	}
	_ = m.cmd.Process.Kill()
	<-m.done
	m.cmd = nil
}

// apiCall is one request the driver made to the Stripe API.
type apiCall struct {
	Method, Path   string
	IdempotencyKey string
	Form           url.Values // the form body of a POST, the query of a GET
}

// recorder is a proxy in front of a Stripe API that records what the
// driver sends.
type recorder struct {
	URL string

	mu    sync.Mutex
	calls []apiCall
}

func newRecorder(t testing.TB, target string) *recorder {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(u)
	rec := &recorder{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		form := r.URL.Query()
		if r.Method == http.MethodPost {
			if form, err = url.ParseQuery(string(body)); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
		}
		rec.mu.Lock()
		rec.calls = append(rec.calls, apiCall{Method: r.Method, Path: r.URL.Path, IdempotencyKey: r.Header.Get("Idempotency-Key"), Form: form})
		rec.mu.Unlock()
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	rec.URL = srv.URL
	return rec
}

// to returns the calls made with method to path.
func (r *recorder) to(method, path string) []apiCall {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []apiCall
	for _, c := range r.calls {
		if c.Method == method && c.Path == path {
			out = append(out, c)
		}
	}
	return out
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.calls)
}

// fakeStripe serves handler as a Stripe API, for answers stripe-mock
// cannot give (errors, paid sessions).
func fakeStripe(t testing.TB, handler http.HandlerFunc) string {
	t.Helper()
	srv := httptest.NewServer(handler)
	t.Cleanup(srv.Close)
	return srv.URL
}

// writeStripeError answers the way Stripe answers a failed request.
func writeStripeError(w http.ResponseWriter, status int, typ, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Request-Id", "req_test123")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"error": map[string]any{"type": typ, "code": code, "message": msg}})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// hangingStripe is a Stripe API that never answers: calls to it block
// until their context ends.
func hangingStripe(t testing.TB) string {
	t.Helper()
	stop := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-stop:
		}
	}))
	t.Cleanup(func() {
		close(stop)
		srv.Close()
	})
	return srv.URL
}

// config is a valid configuration against the Stripe API at apiBase.
func config(apiBase string) map[string]any {
	return map[string]any{"secret_key": testKey, "webhook_secret": testWebhookSecret, "api_base": apiBase}
}

// configure applies raw to d the way the SDK does: validated against the
// schema first.
func configure(ctx context.Context, d *stripedriver.Driver, raw map[string]any) error {
	schema, err := d.ConfigSchema(ctx)
	if err != nil {
		return err
	}
	cfg, err := base.ValidateConfig(schema, raw)
	if err != nil {
		return err
	}
	cfg.APIVersion = payments.APIVersion1
	cfg.Instance = "test"
	return d.Configure(ctx, cfg)
}

// newDriver returns a driver configured against apiBase.
func newDriver(t testing.TB, apiBase string, opts ...stripedriver.Option) *stripedriver.Driver {
	t.Helper()
	d := stripedriver.New(hclog.NewNullLogger(), opts...)
	if err := configure(context.Background(), d, config(apiBase)); err != nil {
		t.Fatalf("Configure: %v", err)
	}
	return d
}

// eventJSON is a Stripe event carrying object, pretty-printed as Stripe
// sends it.
func eventJSON(t testing.TB, id, typ string, created time.Time, object map[string]any) []byte {
	t.Helper()
	b, err := json.MarshalIndent(map[string]any{
		"id":               id,
		"object":           "event",
		"api_version":      stripeapi.APIVersion,
		"created":          created.Unix(),
		"livemode":         false,
		"pending_webhooks": 1,
		"request":          map[string]any{"id": nil, "idempotency_key": nil},
		"type":             typ,
		"data":             map[string]any{"object": object},
	}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// signed is body as Stripe delivers it: signed at the given time with
// secret by stripe-go's test-signing helper.
func signed(body []byte, secret string, at time.Time) payments.Webhook {
	sp := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: body, Secret: secret, Timestamp: at})
	h := http.Header{}
	h.Set("Content-Type", "application/json")
	h.Set(stripedriver.SignatureHeader, sp.Header)
	return payments.Webhook{Body: body, Header: h}
}

// checkoutObject is a Checkout Session as a webhook carries it.
func checkoutObject(id, org, operation string, amount int64, currency, status string) map[string]any {
	return map[string]any{
		"id":                  id,
		"object":              "checkout.session",
		"mode":                "payment",
		"amount_total":        amount,
		"currency":            strings.ToLower(currency),
		"customer":            "cus_" + org,
		"client_reference_id": org,
		"metadata":            map[string]string{"org_id": org, "operation_id": operation},
		"payment_intent":      "pi_" + id,
		"payment_status":      status,
		"status":              "complete",
	}
}
