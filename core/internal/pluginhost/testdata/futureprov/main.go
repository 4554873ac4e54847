// Command futureprov is the instantprov example driver claiming only a
// provisioner API version this core does not speak.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/sdk"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/examples/instantprov"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

type future struct{ *instantprov.Driver }

var _ provisioner.Driver = future{}

func (f future) Info(ctx context.Context) (*base.Info, error) {
	info, err := f.Driver.Info(ctx)
	if err != nil {
		return nil, err
	}
	info.Name, info.APIVersions = "futureprov", []string{"9.0"}
	return info, nil
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	err := sdk.Serve(ctx, func(l hclog.Logger) (base.BasePlugin, error) {
		return future{instantprov.New(l)}, nil
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "futureprov:", err)
		os.Exit(1)
	}
}
