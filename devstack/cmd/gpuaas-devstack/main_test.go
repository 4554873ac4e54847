package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// bin is the gpuaas-devstack binary, built once for the tests that run it as a process.
var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "gpuaas-devstack-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = filepath.Join(dir, "gpuaas-devstack")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build gpuaas-devstack: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

func TestUsageErrors(t *testing.T) {
	t.Parallel()
	for name, args := range map[string][]string{
		"no command":      nil,
		"unknown command": {"down"},
		"bad flag":        {"up", "--no-such-flag"},
	} {
		t.Run(name, func(t *testing.T) {
			var out bytes.Buffer
			err := run(context.Background(), args, os.Getenv, &out, &out)
			var code exitCode
			if !errors.As(err, &code) || code != 2 {
				t.Fatalf("err = %v, want exit code 2", err)
			}
			if !strings.Contains(out.String(), "usage") && !strings.Contains(out.String(), "flag provided but not defined") {
				t.Fatalf("no usage printed: %s", out.String())
			}
		})
	}
}

func TestExecReturnsCommandExitCode(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	// The command sees the stack's variables and can reach NATS and Postgres.
	script := `test -n "$GPUAAS_DEVSTACK_CONTROL" || exit 1
exec 3<>/dev/tcp/127.0.0.1/${NATS_URL##*:} || exit 2
pg=${DATABASE_URL#*@127.0.0.1:}; exec 4<>/dev/tcp/127.0.0.1/${pg%%/*} || exit 3
exit 7`
	cmd := exec.Command(bin, "exec", "--dir", filepath.Join(dir, "stack"), "--components", "nats,postgres", "--quiet", "--", "bash", "-c", script)
	out, err := cmd.CombinedOutput()
	if cmd.ProcessState == nil || cmd.ProcessState.ExitCode() != 7 {
		t.Fatalf("exit = %v, want 7\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "stack.env")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("env file left behind after exec: %v", err)
	}

	cmd = exec.Command(bin, "exec", "--dir", filepath.Join(dir, "stack"), "--components", "nats", "--quiet", "--", "true")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("exec true: %v\n%s", err, out)
	}
}

func TestUpStopsCleanlyOnSIGTERM(t *testing.T) {
	t.Parallel()
	up := startUp(t, "postgres,nats,s3,stripe")
	kids := up.children(t)
	if err := up.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := up.wait(time.Minute); err != nil {
		t.Fatalf("up after SIGTERM: %v\n%s", err, up.out.String())
	}
	if _, err := os.Stat(up.envFile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("env file left behind: %v", err)
	}
	if alive := stillAlive(kids); len(alive) > 0 {
		t.Fatalf("still running after a clean stop: %v", alive)
	}
}

func TestSIGKILLLeavesNoChildren(t *testing.T) {
	t.Parallel()
	up := startUp(t, "postgres,nats,temporal,s3,stripe")
	kids := up.children(t)
	if err := up.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = up.wait(10 * time.Second)
	deadline := time.Now().Add(5 * time.Second)
	for {
		alive := stillAlive(kids)
		if len(alive) == 0 {
			return
		}
		if time.Now().After(deadline) {
			for _, p := range alive {
				_ = syscall.Kill(p.pid, syscall.SIGKILL)
			}
			t.Fatalf("orphans 5s after SIGKILL of the devstack: %v", alive)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

type upProcess struct {
	cmd     *exec.Cmd
	out     *syncBuffer
	envFile string
	done    chan error
}

// startUp runs `gpuaas-devstack up` and returns once its env file exists.
func startUp(t *testing.T, components string) *upProcess {
	t.Helper()
	dir := t.TempDir()
	u := &upProcess{out: &syncBuffer{}, envFile: filepath.Join(dir, "stack.env"), done: make(chan error, 1)}
	u.cmd = exec.Command(bin, "up", "--dir", filepath.Join(dir, "stack"), "--components", components)
	u.cmd.Stdout, u.cmd.Stderr = u.out, u.out
	if err := u.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { u.done <- u.cmd.Wait() }()
	t.Cleanup(func() {
		_ = u.cmd.Process.Kill()
		_ = u.wait(10 * time.Second)
	})
	deadline := time.Now().Add(3 * time.Minute)
	for {
		if _, err := os.Stat(u.envFile); err == nil {
			return u
		}
		select {
		case err := <-u.done:
			u.done <- err
			t.Fatalf("up exited before the stack was ready: %v\n%s", err, u.out.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("stack not ready after 3 minutes\n%s", u.out.String())
		}
	}
}

func (u *upProcess) wait(timeout time.Duration) error {
	select {
	case err := <-u.done:
		u.done <- err
		return err
	case <-time.After(timeout):
		return fmt.Errorf("still running after %s", timeout)
	}
}

// children lists the processes below up and checks that the external servers are there.
func (u *upProcess) children(t *testing.T) []proc {
	t.Helper()
	kids := descendants(u.cmd.Process.Pid)
	for _, name := range []string{"postgres", "versitygw", "stripe-mock"} {
		if !slices.ContainsFunc(kids, func(p proc) bool { return p.comm == name }) {
			t.Fatalf("no %s among the children of up: %v", name, kids)
		}
	}
	return kids
}

type proc struct {
	pid   int
	comm  string
	start string // start time, to tell a reused pid apart
}

func (p proc) String() string { return fmt.Sprintf("%d(%s)", p.pid, p.comm) }

// readStat returns a process's name, state, parent and start time from /proc.
func readStat(pid int) (comm string, state byte, ppid int, start string, ok bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", 0, 0, "", false
	}
	s := string(b)
	open, closing := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || closing < open {
		return "", 0, 0, "", false
	}
	fields := strings.Fields(s[closing+1:]) // state ppid pgrp ... starttime is field 22 overall
	if len(fields) < 20 {
		return "", 0, 0, "", false
	}
	ppid, _ = strconv.Atoi(fields[1])
	return s[open+1 : closing], fields[0][0], ppid, fields[19], true
}

func descendants(root int) []proc {
	entries, _ := os.ReadDir("/proc")
	children := map[int][]proc{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, _, ppid, start, ok := readStat(pid)
		if ok {
			children[ppid] = append(children[ppid], proc{pid: pid, comm: comm, start: start})
		}
	}
	var out []proc
	queue := []int{root}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range children[p] {
			out = append(out, c)
			queue = append(queue, c.pid)
		}
	}
	return out
}

// stillAlive returns the processes that still run (zombies count as gone).
func stillAlive(ps []proc) []proc {
	var out []proc
	for _, p := range ps {
		_, state, _, start, ok := readStat(p.pid)
		if ok && start == p.start && state != 'Z' && state != 'X' {
			out = append(out, p)
		}
	}
	return out
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

var _ io.Writer = (*syncBuffer)(nil)

func TestStopsWhenParentDies(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	envFile := filepath.Join(dir, "stack.env")
	// A shell stands in for make: it starts the dev stack and is then killed.
	parent := exec.Command("sh", "-c", `"$0" up --quiet --dir "$1" --components postgres,nats & echo $!; wait`, bin, filepath.Join(dir, "stack"))
	out := &syncBuffer{}
	parent.Stdout, parent.Stderr = out, out
	if err := parent.Start(); err != nil {
		t.Fatal(err)
	}
	parentDone := make(chan struct{})
	go func() { _ = parent.Wait(); close(parentDone) }()
	t.Cleanup(func() { _ = parent.Process.Kill(); <-parentDone })
	deadline := time.Now().Add(3 * time.Minute)
	for {
		if _, err := os.Stat(envFile); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stack not ready\n%s", out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	pid, err := strconv.Atoi(strings.Fields(out.String())[0])
	if err != nil {
		t.Fatalf("pid of up: %v\n%s", err, out.String())
	}
	comm, _, _, start, _ := readStat(pid)
	up := []proc{{pid: pid, comm: comm, start: start}}
	kids := descendants(pid)
	if err := parent.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	// up gets SIGTERM from the kernel and stops cleanly: the env file goes away, so do its children.
	deadline = time.Now().Add(time.Minute)
	for {
		_, err := os.Stat(envFile)
		upAlive := len(stillAlive(up)) > 0
		if errors.Is(err, os.ErrNotExist) && !upAlive && len(stillAlive(kids)) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after its parent died: env file err %v, up alive %v, children alive %v", err, upAlive, stillAlive(kids))
		}
		time.Sleep(50 * time.Millisecond)
	}
}
