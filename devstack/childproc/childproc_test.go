package childproc_test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/devstack/childproc"
)

// gone reports whether pid has exited (a zombie counts as exited).
func gone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return fields[0] == "Z" || fields[0] == "X"
}

func waitGone(t *testing.T, pid int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !gone(pid) {
		if time.Now().After(deadline) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("process %d still running after %s", pid, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestCloseKillsRemainingChildren(t *testing.T) {
	t.Parallel()
	l := childproc.NewLauncher()
	p, err := l.Start(exec.Command("sleep", "60"))
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	select {
	case <-p.Done():
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(p.Pid(), syscall.SIGKILL)
		t.Fatal("child survived Close")
	}
	if _, err := l.Start(exec.Command("true")); !errors.Is(err, childproc.ErrClosed) {
		t.Fatalf("Start after Close: %v", err)
	}
}

func TestStopKillsTheWholeGroup(t *testing.T) {
	t.Parallel()
	l := childproc.NewLauncher()
	defer l.Close()
	pidFile := filepath.Join(t.TempDir(), "pid")
	// The shell leaves a grandchild behind when it gets SIGTERM.
	p, err := l.Start(exec.Command("sh", "-c", `sleep 60 & echo $! > "$0"; wait`, pidFile))
	if err != nil {
		t.Fatal(err)
	}
	var grandchild int
	for deadline := time.Now().Add(5 * time.Second); grandchild == 0; time.Sleep(10 * time.Millisecond) {
		b, _ := os.ReadFile(pidFile)
		grandchild, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		if time.Now().After(deadline) {
			t.Fatal("no grandchild pid")
		}
	}
	p.Stop(syscall.SIGTERM, 2*time.Second)
	waitGone(t, grandchild, 2*time.Second)
}

func TestStopEscalatesToSIGKILL(t *testing.T) {
	t.Parallel()
	l := childproc.NewLauncher()
	defer l.Close()
	p, err := l.Start(exec.Command("sh", "-c", `trap "" TERM INT; while :; do sleep 0.05; done`))
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // let the trap be installed
	began := time.Now()
	p.Stop(syscall.SIGTERM, 300*time.Millisecond)
	if took := time.Since(began); took < 300*time.Millisecond {
		t.Fatalf("stopped after %s, before the grace period: the trap did not hold", took)
	}
	if code := p.ExitCode(); code != -1 {
		t.Fatalf("exit code %d, want -1 (killed)", code)
	}
}
