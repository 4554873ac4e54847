package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/gpuaas/gpuaas/core/internal/terminal"
)

// fakeTerminal speaks the server side of gpuaas.terminal.v1: it wants the
// token in Authorization, a resize first, then echoes one line and closes
// as the shell's exit would.
func fakeTerminal(t *testing.T, closeCode websocket.StatusCode, reason string) (*httptest.Server, *[]string) {
	t.Helper()
	var got []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer gtt_good" {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"error":{"code":"terminal_token_invalid","message":"the terminal token is unknown or was used already"}}`)
			return
		}
		c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{terminal.Subprotocol}})
		if err != nil {
			t.Error(err)
			return
		}
		ctx := r.Context()
		for len(got) < 2 {
			typ, data, err := c.Read(ctx)
			if err != nil {
				t.Error(err)
				return
			}
			if typ == websocket.MessageText {
				var m map[string]any
				_ = json.Unmarshal(data, &m)
				got = append(got, fmt.Sprintf("resize %vx%v", m["cols"], m["rows"]))
				continue
			}
			got = append(got, "data "+string(data))
		}
		_ = c.Write(ctx, websocket.MessageBinary, []byte("hello\r\n"))
		_ = c.Close(closeCode, reason)
	}))
	t.Cleanup(srv.Close)
	return srv, &got
}

func TestTerminalSession(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	srv, got := fakeTerminal(t, websocket.StatusNormalClosure, "exit status 3")
	ws := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws/terminal/x"
	resize := make(chan [2]int, 1)
	resize <- [2]int{120, 40}
	in, inW := io.Pipe()
	defer inW.Close()
	go func() {
		time.Sleep(100 * time.Millisecond) // after the resize, as a terminal would
		_, _ = inW.Write([]byte("echo hello\r"))
	}()
	var out bytes.Buffer
	code, err := terminalSession(ctx, ws, "gtt_good", in, &out, resize)
	if err != nil || code != 3 {
		t.Fatalf("session: status %d, %v; want 3", code, err)
	}
	if out.String() != "hello\r\n" || strings.Join(*got, "|") != "resize 120x40|data echo hello\r" {
		t.Fatalf("output %q, the server got %q", out.String(), *got)
	}

	// A refused token is the API's error envelope.
	if _, err := terminalSession(ctx, ws, "gtt_bad", strings.NewReader(""), io.Discard, nil); err == nil ||
		!strings.Contains(err.Error(), "terminal_token_invalid") {
		t.Fatalf("refused token: %v", err)
	}

	// A session the server ends otherwise is an error, not a status.
	idle, _ := fakeTerminal(t, 4000, "idle timeout")
	resize <- [2]int{80, 24}
	in2, inW2 := io.Pipe()
	defer inW2.Close()
	go func() { time.Sleep(100 * time.Millisecond); _, _ = inW2.Write([]byte("x")) }()
	if _, err := terminalSession(ctx, "ws"+strings.TrimPrefix(idle.URL, "http")+"/ws/terminal/x", "gtt_good", in2, io.Discard, resize); err == nil ||
		!strings.Contains(err.Error(), "idle timeout") {
		t.Fatalf("idle close: %v", err)
	}
}
