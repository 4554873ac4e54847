// Command gpuaasd is the gpuaas control plane.
//
//	gpuaasd [serve] [flags]   serve the API (default)
//	gpuaasd terminal-gateway [flags]
//	                          serve the browser terminal alone (/ws/terminal/*,
//	                          probes, metrics) with Postgres and the PKI backend
//	gpuaasd migrate [flags]   apply database migrations and exit
//	gpuaasd bootstrap-admin --email ADDR [flags]
//	                          create (or reuse) a local platform admin and print its
//	                          credentials as KEY=VALUE lines: a new password (only when
//	                          the account is created) and a new API key
//	gpuaasd version           print the version
//
// Every flag has an environment variable; `gpuaasd -h` lists them.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/core/internal/config"
	"github.com/gpuaas/gpuaas/core/internal/daemon"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "gpuaasd:", err)
		os.Exit(1)
	}
}

// takeFlag removes --name VALUE or --name=VALUE from args and returns the value.
func takeFlag(args []string, name string) (string, []string) {
	var rest []string
	value := ""
	for i := 0; i < len(args); i++ {
		a := strings.TrimLeft(args[i], "-")
		switch {
		case a == name && i+1 < len(args) && strings.HasPrefix(args[i], "-"):
			value = args[i+1]
			i++
		case strings.HasPrefix(a, name+"=") && strings.HasPrefix(args[i], "-"):
			value = strings.TrimPrefix(a, name+"=")
		default:
			rest = append(rest, args[i])
		}
	}
	return value, rest
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cmd := "serve"
	if len(args) > 0 && (args[0] == "serve" || args[0] == "migrate" || args[0] == "version" || args[0] == "bootstrap-admin" ||
		args[0] == "terminal-gateway") {
		cmd, args = args[0], args[1:]
	}
	var email string
	if cmd == "bootstrap-admin" {
		email, args = takeFlag(args, "email")
		if email == "" {
			return errors.New("bootstrap-admin: --email is required")
		}
	}
	if cmd == "version" {
		_, err := fmt.Fprintln(stdout, version)
		return err
	}
	load := config.Load
	if cmd == "terminal-gateway" {
		load = config.LoadTerminalGateway
	}
	cfg, err := load(args, getenv, stderr)
	if err != nil {
		return err
	}
	log := hclog.New(&hclog.LoggerOptions{
		Name:       "gpuaasd",
		Level:      hclog.LevelFromString(cfg.LogLevel),
		JSONFormat: cfg.LogFormat == "json",
		Output:     stderr,
	})
	switch cmd {
	case "bootstrap-admin":
		return bootstrapAdmin(ctx, cfg, log, email, stdout)
	case "terminal-gateway":
		return daemon.RunTerminalGateway(ctx, cfg, log, daemon.Options{Version: version})
	case "migrate":
		pool, err := store.Open(ctx, cfg.DatabaseURL, store.Options{})
		if err != nil {
			return err
		}
		defer pool.Close()
		applied, err := store.Migrate(ctx, pool)
		if err != nil {
			return err
		}
		log.Info("migrations applied", "versions", applied)
		return nil
	default:
		return daemon.Run(ctx, cfg, log, daemon.Options{Version: version})
	}
}
