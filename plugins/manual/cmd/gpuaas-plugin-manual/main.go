// Command gpuaas-plugin-manual serves the manual provisioner driver (hosts
// brought in by hand, run through their gpuaas-agent) as a gpuaas plugin.
// The gpuaas core starts it; run by hand it explains that and exits.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/plugins/manual"
	"github.com/gpuaas/gpuaas/sdk"
	"github.com/gpuaas/gpuaas/sdk/base"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "gpuaas-plugin-manual:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, _ []string, getenv func(string) string, _, stderr io.Writer) error {
	return sdk.Serve(ctx, func(logger hclog.Logger) (base.BasePlugin, error) {
		return manual.New(logger), nil
	}, sdk.WithGetenv(getenv), sdk.WithLogOutput(stderr))
}
