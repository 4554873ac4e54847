package httpapi_test

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"testing"

	"github.com/gofiber/fiber/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/httpapi"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

// streamingApp serves /test/stream as a streaming route (it hashes the
// body as it arrives, or refuses it unread with ?refuse) next to the JSON
// route /test/echo, on a real socket.
func streamingApp(t *testing.T) string {
	t.Helper()
	reg := prometheus.NewRegistry()
	app := httpapi.New(testenv.Logger(t), &httpapi.API{Version: "test", Gatherer: reg}, httpapi.Options{MaxBodyBytes: 4096, Registerer: reg,
		BeforeAuth: []fiber.Handler{asTestUser}, StreamBody: func(p string) bool { return p == "/test/stream" }})
	app.Put("/test/stream", func(c *fiber.Ctx) error {
		if c.Query("refuse") != "" {
			return errcode.New(errcode.Forbidden, "no")
		}
		h := sha256.New()
		n, err := io.Copy(h, httpapi.StreamedBody(c))
		if err != nil {
			return err
		}
		return c.JSON(map[string]any{"bytes": n, "sha256": hex.EncodeToString(h.Sum(nil))})
	})
	app.Post("/test/echo", func(c *fiber.Ctx) error { return c.JSON(map[string]int{"len": len(c.Body())}) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = app.Listener(ln) }()
	t.Cleanup(func() { _ = app.Shutdown() })
	return "http://" + ln.Addr().String()
}

// zeros is n zero bytes, read without holding them.
func zeros(n int64) io.Reader { return io.LimitReader(zeroReader{}, n) }

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// A streaming route takes bodies far over MaxBodyBytes, declared or
// chunked, while other routes keep the limit.
func TestStreamingBodies(t *testing.T) {
	base := streamingApp(t)
	const n = 64 << 20
	h := sha256.New()
	_, _ = io.Copy(h, zeros(n))
	want := fmt.Sprintf(`{"bytes":%d,"sha256":"%x"}`, n, h.Sum(nil))
	for _, chunked := range []bool{false, true} {
		req, _ := http.NewRequest("PUT", base+"/test/stream", zeros(n))
		req.ContentLength = n
		if chunked {
			req.ContentLength = -1
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode != 200 || string(raw) != want {
			t.Errorf("chunked=%v: %d %s; want %s", chunked, resp.StatusCode, raw, want)
		}
	}
	req, _ := http.NewRequest("POST", base+"/test/echo", strings.NewReader(`{"x":"`+strings.Repeat("y", 5000)+`"}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != 413 {
		t.Errorf("a JSON body over the limit: %d, want 413", resp.StatusCode)
	}
}

// A streaming request refused before its body is read still gets its
// answer (not a connection reset), however large the body; a short body is
// read and dropped so the connection serves the next request.
func TestStreamingRefusedUnread(t *testing.T) {
	base := streamingApp(t)
	for i := range 10 {
		req, _ := http.NewRequest("PUT", base+"/test/stream?refuse=1", zeros(32<<20))
		req.ContentLength = 32 << 20
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("attempt %d: %v", i, err)
		}
		raw, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode != 403 || !strings.Contains(string(raw), `"forbidden"`) || !resp.Close {
			t.Fatalf("attempt %d: %d %s, close %v; want 403 with Connection: close", i, resp.StatusCode, raw, resp.Close)
		}
	}
	client := &http.Client{}
	reused := 0
	for range 3 {
		req, _ := http.NewRequest("PUT", base+"/test/stream?refuse=1", strings.NewReader("short"))
		req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) {
			if i.Reused {
				reused++
			}
		}}))
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode != 403 || resp.Close {
			t.Fatalf("short refused body: %d, close %v", resp.StatusCode, resp.Close)
		}
	}
	if reused != 2 {
		t.Errorf("the connection served %d more requests after a short refused body, want 2", reused)
	}
}
