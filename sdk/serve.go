// Package sdk is what a gpuaas driver author builds on: Serve turns a
// driver into a plugin binary in a few lines, and ClientConfig/Dispense are
// the matching host side. The contracts live in base and the kind packages
// (provisioner, payments, storage); sdktest is the conformance kit.
package sdk

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"time"

	"github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/internal/unary"
	"github.com/gpuaas/gpuaas/sdk/payments"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// Factory builds the driver a plugin binary serves. logger writes JSON to
// stderr, which the core re-emits under the instance's name.
type Factory func(logger hclog.Logger) (base.BasePlugin, error)

// ErrNotPlugin is returned by Serve when the binary was not started by the
// core (the handshake cookie is missing).
var ErrNotPlugin = errors.New("this binary is a gpuaas driver plugin; the gpuaas core starts it")

type serveOptions struct {
	logOutput   io.Writer
	logLevel    hclog.Level
	getenv      func(string) string
	parentWatch time.Duration
	stopGrace   time.Duration
}

// ServeOption configures Serve.
type ServeOption func(*serveOptions)

// WithLogOutput sets where the JSON log goes (default os.Stderr).
func WithLogOutput(w io.Writer) ServeOption { return func(o *serveOptions) { o.logOutput = w } }

// WithLogLevel sets the log level (default: GPUAAS_PLUGIN_LOG_LEVEL, else info).
func WithLogLevel(l hclog.Level) ServeOption { return func(o *serveOptions) { o.logLevel = l } }

// WithGetenv sets how Serve reads its environment (default os.Getenv).
func WithGetenv(getenv func(string) string) ServeOption {
	return func(o *serveOptions) { o.getenv = getenv }
}

// WithParentWatch sets how often Serve checks that the process that
// started it is still alive; when it is gone the plugin stops, so no driver
// outlives a core killed with SIGKILL. Zero disables the check (default
// one second).
func WithParentWatch(every time.Duration) ServeOption {
	return func(o *serveOptions) { o.parentWatch = every }
}

// WithStopGrace sets how long in-flight calls may run once serving stops
// (default five seconds).
func WithStopGrace(d time.Duration) ServeOption { return func(o *serveOptions) { o.stopGrace = d } }

// Serve serves the driver factory builds as a go-plugin gRPC plugin of the
// driver's kind, with the gpuaas handshake; AutoMTLS is negotiated when the
// host asks for it. It returns when the host stops the plugin, when ctx is
// done (graceful stop), or when the parent process is gone. A driver main:
//
//	func run(ctx context.Context, _ []string, getenv func(string) string, _, stderr io.Writer) error {
//		return sdk.Serve(ctx, func(l hclog.Logger) (base.BasePlugin, error) {
//			return mydriver.New(l), nil
//		}, sdk.WithGetenv(getenv), sdk.WithLogOutput(stderr))
//	}
func Serve(ctx context.Context, factory Factory, opts ...ServeOption) error {
	o := serveOptions{
		logOutput:   os.Stderr,
		logLevel:    hclog.NoLevel,
		getenv:      os.Getenv,
		parentWatch: time.Second,
		stopGrace:   5 * time.Second,
	}
	for _, opt := range opts {
		opt(&o)
	}
	if o.getenv(base.MagicCookieKey) != base.MagicCookieValue {
		return ErrNotPlugin
	}
	if o.logLevel == hclog.NoLevel {
		o.logLevel = hclog.LevelFromString(o.getenv("GPUAAS_PLUGIN_LOG_LEVEL"))
		if o.logLevel == hclog.NoLevel {
			o.logLevel = hclog.Info
		}
	}
	logger := hclog.New(&hclog.LoggerOptions{
		Output:     o.logOutput,
		Level:      o.logLevel,
		JSONFormat: true,
	})

	driver, err := factory(logger)
	if err != nil {
		return fmt.Errorf("serve: building the driver: %w", err)
	}
	plugins, kind, err := PluginSet(driver)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	logger.Debug("serving driver", "kind", kind)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	servers := make(chan *grpc.Server, 1)
	serveDone := make(chan struct{})
	stopped := make(chan struct{})
	parent := os.Getppid() // before the handshake: the host is alive now
	go func() {
		defer close(stopped)
		watchParent(ctx, parent, o.parentWatch, logger, cancel)
		select {
		case srv := <-servers:
			gracefulStop(srv, o.stopGrace)
		case <-serveDone:
		}
	}()

	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: base.Handshake(),
		Plugins:         plugins,
		GRPCServer: func(opts []grpc.ServerOption) *grpc.Server {
			srv := grpc.NewServer(append(opts, serverTuning()...)...)
			servers <- srv
			return srv
		},
		Logger: logger,
	})
	close(serveDone)
	cancel()
	<-stopped
	return nil
}

// watchParent returns when ctx is done, or calls stop and returns when the
// parent process has gone (the process was re-parented away from parent).
func watchParent(ctx context.Context, parent int, every time.Duration, logger hclog.Logger, stop func()) {
	if every <= 0 {
		<-ctx.Done()
		return
	}
	ticker := time.NewTicker(every)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
			if os.Getppid() != parent {
				logger.Warn("the process that started this plugin is gone; stopping", "parent_pid", parent)
				stop()
				return
			}
		}
	}
}

func gracefulStop(srv *grpc.Server, grace time.Duration) {
	done := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(done)
	}()
	timer := time.NewTimer(grace)
	defer timer.Stop()
	select {
	case <-done:
	case <-timer.C:
		srv.Stop()
		<-done
	}
}

// PluginSet returns the go-plugin plugin set that serves driver, and its
// kind. The driver must implement exactly one kind's Driver interface.
func PluginSet(driver base.BasePlugin) (plugin.PluginSet, base.Kind, error) {
	set := plugin.PluginSet{}
	var kinds []base.Kind
	if d, ok := driver.(provisioner.Driver); ok {
		set[string(base.KindProvisioner)] = &provisioner.Plugin{Impl: d}
		kinds = append(kinds, base.KindProvisioner)
	}
	if d, ok := driver.(payments.Driver); ok {
		set[string(base.KindPayments)] = &payments.Plugin{Impl: d}
		kinds = append(kinds, base.KindPayments)
	}
	if d, ok := driver.(storage.Driver); ok {
		set[string(base.KindStorage)] = &storage.Plugin{Impl: d}
		kinds = append(kinds, base.KindStorage)
	}
	switch len(kinds) {
	case 0:
		return nil, "", fmt.Errorf("%T implements no driver kind (provisioner.Driver, payments.Driver or storage.Driver)", driver)
	case 1:
		return set, kinds[0], nil
	}
	return nil, "", fmt.Errorf("%T implements several driver kinds %v; a plugin binary serves one", driver, kinds)
}

// bufferSize is the socket buffering of a local plugin connection: large
// enough that a storage stream does not make a syscall per 32 KiB.
// ClientConfig sets the same on the host side; the flow-control windows
// are unary.StreamWindow and unary.ConnWindow.
const bufferSize = 512 << 10

// goPluginStreams is how many streams go-plugin itself keeps open on every
// plugin connection for its whole life (the broker's StartStream and the
// stdio StreamStdio), each holding a stream worker.
const goPluginStreams = 2

func serverTuning() []grpc.ServerOption {
	return []grpc.ServerOption{
		// Calls run on parked workers, whose stacks have already grown,
		// instead of a new goroutine each that grows its stack again (a busy
		// pool falls back to a goroutine, so long streams cannot starve it).
		// go-plugin's own streams take workers first: without room for them
		// every call fell back to a new goroutine.
		grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0)) + goPluginStreams),
		grpc.InitialWindowSize(unary.StreamWindow),
		grpc.InitialConnWindowSize(unary.ConnWindow),
		grpc.ReadBufferSize(bufferSize),
		grpc.WriteBufferSize(bufferSize),
	}
}

func dialTuning() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithInitialWindowSize(unary.StreamWindow),
		grpc.WithInitialConnWindowSize(unary.ConnWindow),
		grpc.WithReadBufferSize(bufferSize),
		grpc.WithWriteBufferSize(bufferSize),
	}
}
