package testenv

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Stack is a private dev stack (a gpuaas-devstack child process) owned by one test,
// for tests that stop and start a component without disturbing other packages.
type Stack struct {
	t       testing.TB
	Env     map[string]string
	control string
}

// StartStack starts a private dev stack with the given components (for example
// "postgres") and stops it when the test ends. The binary comes from
// GPUAAS_DEVSTACK_BIN, which `make test` sets.
func StartStack(t testing.TB, components ...string) *Stack {
	t.Helper()
	bin := Env(t, "GPUAAS_DEVSTACK_BIN")
	dir, err := os.MkdirTemp("", "gpuaas-stack-")
	if err != nil {
		t.Fatal(err)
	}
	envFile := filepath.Join(dir, "stack.env")
	cmd := exec.Command(bin, "up", "--dir", filepath.Join(dir, "s"), "--env-file", envFile,
		"--components", strings.Join(components, ","), "--quiet")
	logFile, err := os.Create(filepath.Join(dir, "devstack.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start devstack: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		_ = logFile.Close()
		_ = os.RemoveAll(dir)
	})
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if env, err := readEnvFile(envFile); err == nil {
			s := &Stack{t: t, Env: env, control: env["GPUAAS_DEVSTACK_CONTROL"]}
			if s.control == "" {
				t.Fatalf("devstack env file has no GPUAAS_DEVSTACK_CONTROL")
			}
			return s
		}
		select {
		case err := <-exited:
			log, _ := os.ReadFile(filepath.Join(dir, "devstack.log"))
			t.Fatalf("devstack exited before it was ready: %v\n%s", err, log)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("devstack not ready after 2 minutes")
		}
	}
}

func readEnvFile(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	env := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("%s: bad line %q", path, line)
		}
		env[k] = v
	}
	return env, sc.Err()
}

// Stop stops a component and returns once it is down.
func (s *Stack) Stop(component string) { s.control1(component, "stop") }

// Start starts a stopped component on its old port and returns once it is healthy.
func (s *Stack) Start(component string) { s.control1(component, "start") }

func (s *Stack) control1(component, verb string) {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, s.control+"/v1/components/"+component+"/"+verb, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatalf("devstack %s %s: %v", verb, component, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		s.t.Fatalf("devstack %s %s: status %d", verb, component, resp.StatusCode)
	}
}
