package main

import (
	"context"
	"errors"
	"io"
	"testing"

	"github.com/gpuaas/gpuaas/sdk"
)

func TestRunByHandRefuses(t *testing.T) {
	err := run(context.Background(), []string{"gpuaas-plugin-stripe"}, func(string) string { return "" }, io.Discard, io.Discard)
	if !errors.Is(err, sdk.ErrNotPlugin) {
		t.Fatalf("run without the core's handshake: got %v, want sdk.ErrNotPlugin", err)
	}
}
