package main

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestRun(t *testing.T) {
	cases := []struct {
		name string
		args []string
		err  string
	}{
		{"bad timing", []string{"-timing", "slow"}, "unknown timing"},
		{"bad sku", []string{"-sku", "a100=2"}, "unknown sku"},
		{"bad key", []string{"-api-key", "abc"}, "consumer:token:secret"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := run(context.Background(), append([]string{"gpuaas-maas-sim", "-listen", "127.0.0.1:0"}, c.args...), func(string) string { return "" }, io.Discard, io.Discard)
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Fatalf("got %v, want %q", err, c.err)
			}
		})
	}
	t.Run("serves", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		pr, pw := io.Pipe()
		done := make(chan error, 1)
		go func() {
			done <- run(ctx, []string{"gpuaas-maas-sim", "-listen", "127.0.0.1:0", "-sku", "h100=1,l40s=1", "-timing", "instant", "-api-key", "ck:tk:ts"},
				func(string) string { return "" }, pw, io.Discard)
			_ = pw.Close()
		}()
		sc := bufio.NewScanner(pr)
		vars := map[string]string{}
		for len(vars) < 2 && sc.Scan() {
			k, v, _ := strings.Cut(sc.Text(), "=")
			vars[k] = v
		}
		go func() { _, _ = io.Copy(io.Discard, pr) }()
		if vars["MAAS_API_KEY"] != "ck:tk:ts" {
			t.Fatalf("printed %v", vars)
		}
		resp, err := http.Get(vars["MAAS_URL"] + "/api/2.0/version/")
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("version: %d", resp.StatusCode)
		}
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("run did not stop")
		}
	})
}
