// Command corehost is a stand-in for the core in the plugin host's SIGKILL
// test: it starts a plugin Host on DATABASE_URL, boots the enabled
// instances, prints "ready" once the named instances run, and blocks.
//
//	corehost KEY_DIR INSTANCE...
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/core/internal/kms"
	"github.com/gpuaas/gpuaas/core/internal/pluginhost"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if err := run(ctx, os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "corehost:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) < 3 {
		return errors.New("usage: corehost KEY_DIR INSTANCE [INSTANCE]")
	}
	pool, err := store.Open(ctx, getenv("DATABASE_URL"), store.Options{MaxConns: 4})
	if err != nil {
		return err
	}
	defer pool.Close()
	keys, err := kms.NewLocal(args[1])
	if err != nil {
		return err
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "corehost", Output: stderr, Level: hclog.Info})
	host, err := pluginhost.New(pool, keys, pluginhost.WithLogger(log))
	if err != nil {
		return err
	}
	defer func() { _ = host.Close() }()
	if err := host.Start(ctx); err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		running := 0
		for _, name := range args[2:] {
			inst, err := host.Instance(ctx, name)
			if err != nil {
				return err
			}
			if inst.State == pluginhost.StateRunning && inst.PID > 0 {
				running++
			}
		}
		if running == len(args)-2 {
			break
		}
		if time.Now().After(deadline) {
			return errors.New("instances did not start within 30s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	fmt.Fprintln(stdout, "ready")
	<-ctx.Done()
	return nil
}
