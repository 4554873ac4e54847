// Command gpuaas-agent is the node agent: it enrolls the node with the core
// once (a single-use token and a CSR; the private key stays in its state
// folder), then heartbeats, renews its certificate and runs the signed tasks
// the core queues for the node. It pulls; the core never connects to it.
//
//	gpuaas-agent -core https://core.example:8443 -core-ca /etc/gpuaas/core-ca.pem \
//	    -state /var/lib/gpuaas-agent -token-file /etc/gpuaas/enroll.token \
//	    -scratch /scratch -scratch /tmp/gpuaas
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/agent/runtime"
	"github.com/gpuaas/gpuaas/agent/tasks"
)

var version = "dev"

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Getenv); err != nil {
		fmt.Fprintln(os.Stderr, "gpuaas-agent:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, getenv func(string) string) error {
	fs := flag.NewFlagSet("gpuaas-agent", flag.ContinueOnError)
	core := fs.String("core", getenv("GPUAAS_CORE_URL"), "the core's agent endpoint, https://host:port (env GPUAAS_CORE_URL)")
	coreCA := fs.String("core-ca", getenv("GPUAAS_CORE_CA"), "PEM file of the CA that signed the core's certificate (default: system roots)")
	state := fs.String("state", "/var/lib/gpuaas-agent", "folder for the key and certificate (0700)")
	tokenFile := fs.String("token-file", "", "file with the enrollment token (needed until enrolled)")
	pollWait := fs.Duration("poll-wait", 30*time.Second, "how long one task poll waits on the core")
	level := fs.String("log-level", "info", "trace, debug, info, warn, error")
	sshDir := fs.String("ssh-dir", "/etc/ssh", "sshd's configuration folder: the agent installs the SSH CA trust there (its sshd_config must Include sshd_config.d/*.conf, as Debian's does)")
	var scratch list
	fs.Var(&scratch, "scratch", "a scratch area node.wipe empties (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if !strings.HasPrefix(*core, "https://") {
		return errors.New("-core must be an https:// URL")
	}
	token := getenv("GPUAAS_ENROLL_TOKEN")
	if *tokenFile != "" {
		b, err := os.ReadFile(*tokenFile)
		if err != nil {
			return err
		}
		token = strings.TrimSpace(string(b))
	}
	var ca []byte
	if *coreCA != "" {
		b, err := os.ReadFile(*coreCA)
		if err != nil {
			return err
		}
		ca = b
	}
	tasks.AgentVersion = version
	log := hclog.New(&hclog.LoggerOptions{Name: "gpuaas-agent", Level: hclog.LevelFromString(*level)})
	a, err := runtime.New(runtime.Config{CoreURL: strings.TrimRight(*core, "/"), CoreCA: ca, StateDir: *state, Token: token,
		PollWait: *pollWait, System: &tasks.System{ScratchDirs: scratch, SSHDir: *sshDir}, Log: log})
	if err != nil {
		return err
	}
	log.Info("starting", "version", version, "core", *core)
	return a.Run(ctx)
}
