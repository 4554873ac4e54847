package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/devstack/childproc"
	"github.com/gpuaas/gpuaas/devstack/stack"
)

const usage = `usage:
  gpuaas-devstack up   [flags]            start the stack and wait for SIGINT/SIGTERM
  gpuaas-devstack exec [flags] -- CMD...  start the stack, run CMD with its env, stop it,
                                          exit with CMD's exit code
flags:
`

// exitCode makes main exit with that code without printing anything.
type exitCode int

func (c exitCode) Error() string { return fmt.Sprintf("exit status %d", int(c)) }

type options struct {
	dir, envFile, components string
	quiet, keep              bool
	timeout                  time.Duration
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		flags(&options{}, stderr).PrintDefaults()
		return exitCode(2)
	}
	var opts options
	fs := flags(&opts, stderr)
	cmd := args[0]
	if err := fs.Parse(args[1:]); err != nil {
		return exitCode(2)
	}
	switch cmd {
	case "up":
		if fs.NArg() > 0 {
			return fmt.Errorf("up takes no arguments, got %q", fs.Args())
		}
		return up(ctx, opts, getenv, stdout, stderr)
	case "exec":
		if fs.NArg() == 0 {
			return errors.New("exec needs a command (gpuaas-devstack exec [flags] -- CMD ARGS)")
		}
		return execute(ctx, opts, fs.Args(), getenv, stdout, stderr)
	default:
		fmt.Fprintf(stderr, "unknown command %q\n%s", cmd, usage)
		fs.PrintDefaults()
		return exitCode(2)
	}
}

func flags(o *options, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("gpuaas-devstack", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&o.dir, "dir", filepath.Join(".gpuaas", "stack"), "stack folder (data and logs)")
	fs.StringVar(&o.envFile, "env-file", "", "env file to write once the stack is ready (default DIR.env)")
	fs.StringVar(&o.components, "components", strings.Join(stack.Names(), ","), "components to start")
	fs.BoolVar(&o.quiet, "quiet", false, "print only warnings and errors")
	fs.BoolVar(&o.keep, "keep", false, "keep the data of the previous stack in DIR instead of wiping it")
	fs.DurationVar(&o.timeout, "timeout", 2*time.Minute, "how long each component may take to become healthy")
	return fs
}

// startStack starts the stack and writes the env file.
func startStack(ctx context.Context, o options, launcher *childproc.Launcher, getenv func(string) string, stderr io.Writer) (*stack.Stack, string, error) {
	level := hclog.Info
	if o.quiet {
		level = hclog.Warn
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "devstack", Output: stderr, Level: level, TimeFormat: "15:04:05.000"})
	var comps []string
	for c := range strings.SplitSeq(o.components, ",") {
		if c = strings.TrimSpace(c); c != "" {
			comps = append(comps, c)
		}
	}
	envFile := o.envFile
	if envFile == "" {
		envFile = filepath.Clean(o.dir) + ".env"
	}
	// A stale env file would point at a dead stack: it only exists while a stack is ready.
	_ = os.Remove(envFile)
	st, err := stack.Start(ctx, stack.Config{
		Dir: o.dir, Components: comps, Keep: o.keep, StartTimeout: o.timeout,
		Getenv: getenv, Logger: log, Launcher: launcher,
	})
	if err != nil {
		return nil, "", err
	}
	if err := st.WriteEnvFile(envFile); err != nil {
		_ = st.Stop(context.WithoutCancel(ctx))
		return nil, "", err
	}
	return st, envFile, nil
}

func stopStack(st *stack.Stack, envFile string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_ = os.Remove(envFile)
	return st.Stop(ctx)
}

func up(ctx context.Context, o options, getenv func(string) string, stdout, stderr io.Writer) error {
	launcher := childproc.NewLauncher()
	defer launcher.Close()
	began := time.Now()
	st, envFile, err := startStack(ctx, o, launcher, getenv, stderr)
	if err != nil {
		return err
	}
	if !o.quiet {
		fmt.Fprintf(stdout, "gpuaas dev stack ready in %s (folder %s)\n", time.Since(began).Round(10*time.Millisecond), st.Dir())
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		for _, c := range st.Components() {
			fmt.Fprintf(tw, "  %s\t%s\n", c.Name, c.Address)
		}
		fmt.Fprintf(tw, "  control\t%s\n", st.ControlURL())
		_ = tw.Flush()
		fmt.Fprintf(stdout, "env file: %s   (set -a; . %s; set +a)\nstop with Ctrl-C\n", envFile, envFile)
	}
	<-ctx.Done()
	return stopStack(st, envFile)
}

// execute runs argv against a fresh stack. The command stays in our process group (see
// childproc.ForegroundGroup) so a terminal's Ctrl-C reaches it directly and it may read the
// terminal; it still dies with SIGKILL if the devstack dies.
func execute(ctx context.Context, o options, argv []string, getenv func(string) string, stdout, stderr io.Writer) error {
	launcher := childproc.NewLauncher()
	defer launcher.Close()
	st, envFile, err := startStack(ctx, o, launcher, getenv, stderr)
	if err != nil {
		return err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), st.Environ()...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, stdout, stderr
	// Output through pipes (a non-file writer): do not wait for grandchildren holding them.
	cmd.WaitDelay = 2 * time.Second
	code, runErr := runCommand(ctx, launcher, cmd)
	if err := stopStack(st, envFile); err != nil {
		fmt.Fprintln(stderr, "gpuaas-devstack: stopping the stack:", err)
		if code == 0 {
			code = 1
		}
	}
	if runErr != nil {
		fmt.Fprintln(stderr, "gpuaas-devstack:", runErr)
	}
	if code != 0 {
		return exitCode(code)
	}
	return nil
}

func runCommand(ctx context.Context, launcher *childproc.Launcher, cmd *exec.Cmd) (int, error) {
	if cmd.Err != nil { // not found in PATH
		return 127, cmd.Err
	}
	proc, err := launcher.Start(cmd, childproc.ForegroundGroup())
	if err != nil {
		return 126, err
	}
	select {
	case <-proc.Done():
	case <-ctx.Done():
		// We were told to stop: pass the signal on, then insist.
		proc.Stop(receivedSignal(ctx), 10*time.Second)
	}
	<-proc.Done()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal()), nil
	}
	return proc.ExitCode(), nil
}

// receivedSignal is the signal that cancelled ctx (signal.NotifyContext names it in the
// cause): SIGTERM when it was one, SIGINT otherwise.
func receivedSignal(ctx context.Context) syscall.Signal {
	if cause := context.Cause(ctx); cause != nil && strings.HasPrefix(cause.Error(), syscall.SIGTERM.String()) {
		return syscall.SIGTERM
	}
	return syscall.SIGINT
}
