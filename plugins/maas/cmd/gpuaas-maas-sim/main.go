// Command gpuaas-maas-sim runs the MAAS API simulator: a MAAS 2.0 region API
// on http://ADDR/MAAS/ with simulated machines, for `make run` and for
// trying the MAAS driver without a MAAS.
//
//	gpuaas-maas-sim -listen 127.0.0.1:5240 -sku h100=3,l40s=2 -timing fast
//	gpuaas-maas-sim -machines machines.yaml -timing realistic -api-key-file /tmp/maas.key
//
// It prints the MAAS URL and the API key ("consumer:token:secret") on
// stdout. Controls (inject failures, advance a machine, list calls and
// deploys) are under http://ADDR/_sim/; see package maassim.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/plugins/maas/maassim"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "gpuaas-maas-sim:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("gpuaas-maas-sim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:5240", "address to serve the MAAS API on")
	machinesFile := fs.String("machines", "", "machine list (JSON or YAML, {\"machines\": [...]}); default: -sku")
	skus := fs.String("sku", "h100=3,l40s=2", "built-in machines per SKU (h100, l40s) when -machines is not given")
	uncommissioned := fs.Bool("new", false, "start -sku machines as New (not commissioned)")
	timingName := fs.String("timing", "fast", "phase timing: instant, fast or realistic")
	scale := fs.Float64("timing-scale", 1, "multiply every phase duration by this factor")
	apiKey := fs.String("api-key", getenv("MAAS_SIM_API_KEY"), "API key consumer:token:secret (default: generated; env MAAS_SIM_API_KEY)")
	username := fs.String("username", "admin", "user name of the API key")
	keyFile := fs.String("api-key-file", "", "write the API key to this file (mode 0600)")
	logLevel := fs.String("log-level", "info", "log level: trace, debug, info, warn, error")
	if err := fs.Parse(args[1:]); err != nil {
		return fmt.Errorf("flags: %w", err)
	}
	logger := hclog.New(&hclog.LoggerOptions{Name: "maassim", Output: stderr, Level: hclog.LevelFromString(*logLevel)})

	timing, err := maassim.TimingByName(*timingName)
	if err != nil {
		return err
	}
	if *scale <= 0 {
		return fmt.Errorf("-timing-scale must be positive")
	}
	var specs []maassim.MachineSpec
	if *machinesFile != "" {
		if specs, err = maassim.LoadSpecs(*machinesFile); err != nil {
			return err
		}
	} else if specs, err = skuMachines(*skus, *uncommissioned); err != nil {
		return err
	}
	opts := []maassim.Option{
		maassim.WithTiming(timing.Scaled(*scale)),
		maassim.WithMachines(specs...),
		maassim.WithLogger(logger),
	}
	if *apiKey != "" {
		parts := strings.Split(*apiKey, ":")
		if len(parts) != 3 {
			return errors.New("-api-key must be consumer:token:secret")
		}
		opts = append(opts, maassim.WithCredential(maassim.Credential{Username: *username, ConsumerKey: parts[0], TokenKey: parts[1], TokenSecret: parts[2]}))
	}
	sim, err := maassim.New(opts...)
	if err != nil {
		return err
	}
	defer sim.Close()
	if *keyFile != "" {
		if err := os.WriteFile(*keyFile, []byte(sim.APIKey()+"\n"), 0o600); err != nil {
			return fmt.Errorf("api key file: %w", err)
		}
	}

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	srv := &http.Server{Handler: sim, ReadHeaderTimeout: 10 * time.Second}
	fmt.Fprintf(stdout, "MAAS_URL=http://%s/MAAS\nMAAS_API_KEY=%s\n", ln.Addr(), sim.APIKey())
	for _, m := range sim.Machines() {
		logger.Info("machine", "system_id", m.SystemID, "hostname", m.Hostname, "pool", m.Pool, "status", m.StatusName)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	return nil
}

// skuMachines builds machines from "sku=count,..." of the built-in SKUs.
func skuMachines(list string, uncommissioned bool) ([]maassim.MachineSpec, error) {
	status := "ready"
	if uncommissioned {
		status = "new"
	}
	var out []maassim.MachineSpec
	for _, item := range strings.Split(list, ",") {
		if item = strings.TrimSpace(item); item == "" {
			continue
		}
		name, count, ok := strings.Cut(item, "=")
		n, err := strconv.Atoi(count)
		if !ok || err != nil || n < 0 || n > 500 {
			return nil, fmt.Errorf("-sku %q: want sku=count", item)
		}
		for i := 0; i < n; i++ {
			m, err := maassim.NewMachine(maassim.SKU(name), i, status)
			if err != nil {
				return nil, err
			}
			out = append(out, m)
		}
	}
	return out, nil
}
