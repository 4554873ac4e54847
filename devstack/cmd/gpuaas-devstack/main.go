// Command gpuaas-devstack starts the development stack (PostgreSQL, NATS JetStream,
// Temporal, S3, stripe-mock) on free loopback ports, and stops it again.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// Stop cleanly (SIGTERM reaches the signal context) when our parent, e.g. make, dies.
	// Nothing happens if the parent is already gone by now, as with `(gpuaas-devstack up &)`.
	_, _, _ = syscall.RawSyscall(syscall.SYS_PRCTL, syscall.PR_SET_PDEATHSIG, uintptr(syscall.SIGTERM), 0)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	var code exitCode
	switch {
	case errors.As(err, &code):
		os.Exit(int(code))
	case err != nil:
		fmt.Fprintln(os.Stderr, "gpuaas-devstack:", err)
		os.Exit(1)
	}
}
