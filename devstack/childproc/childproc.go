// Package childproc starts helper processes that cannot outlive the dev stack and stops them
// together with everything they started.
package childproc

import (
	"errors"
	"fmt"
	"os/exec"
	"runtime"
	"sync"
	"syscall"
	"time"
)

// ErrClosed is returned by Start after Close.
var ErrClosed = errors.New("childproc: launcher closed")

// Launcher starts child processes so that the kernel kills them when the stack dies.
//
// Every child gets Pdeathsig=SIGKILL. The kernel sends it when the *thread* that forked the
// child exits, not when the process does, and the Go runtime may end a thread that a
// goroutine happened to run on (a goroutine that exits while locked to its thread takes
// the thread with it), which would kill a healthy child. So every fork happens on one
// goroutine that stays locked to its OS thread for the Launcher's whole life: that thread
// lives as long as the Launcher, or the process, and when the devstack is SIGKILLed the
// children die with it. Close kills whatever is still running itself, since the runtime
// never ends the main thread and the launcher may have been scheduled there.
type Launcher struct {
	reqs      chan launchReq
	done      chan struct{}
	closeOnce sync.Once

	mu   sync.Mutex
	live map[*Process]struct{}
}

type launchReq struct {
	cmd  *exec.Cmd
	errc chan error
}

// NewLauncher starts the launcher's thread.
func NewLauncher() *Launcher {
	l := &Launcher{reqs: make(chan launchReq), done: make(chan struct{}), live: map[*Process]struct{}{}}
	go l.loop()
	return l
}

func (l *Launcher) loop() {
	runtime.LockOSThread()
	// Deliberately never unlocked: see Launcher. Returning while locked ends the thread
	// (unless it is the main thread, which the runtime keeps).
	for {
		select {
		case r := <-l.reqs:
			r.errc <- r.cmd.Start()
		case <-l.done:
			return
		}
	}
}

// Close ends the launcher's thread and SIGKILLs the process group of every child that is
// still running; it returns once they have exited.
func (l *Launcher) Close() {
	l.closeOnce.Do(func() { close(l.done) })
	l.mu.Lock()
	live := make([]*Process, 0, len(l.live))
	for p := range l.live {
		live = append(live, p)
	}
	l.mu.Unlock()
	for _, p := range live {
		p.Stop(syscall.SIGKILL, 0)
	}
}

// Option changes how Start sets up a child.
type Option func(*syscall.SysProcAttr)

// ForegroundGroup keeps the child in the stack's process group, so that a terminal's Ctrl-C
// reaches it and it may read the terminal. Meant for the user's command in `exec`.
func ForegroundGroup() Option {
	return func(a *syscall.SysProcAttr) { a.Setpgid = false }
}

// Start starts cmd in a process group of its own (unless ForegroundGroup) with
// Pdeathsig=SIGKILL. cmd's output should go to files (not pipes), so that grandchildren
// holding them cannot block Wait.
func (l *Launcher) Start(cmd *exec.Cmd, opts ...Option) (*Process, error) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	for _, o := range opts {
		o(cmd.SysProcAttr)
	}
	r := launchReq{cmd: cmd, errc: make(chan error, 1)}
	select {
	case l.reqs <- r:
	case <-l.done:
		return nil, ErrClosed
	}
	if err := <-r.errc; err != nil {
		return nil, err
	}
	p := &Process{cmd: cmd, ownGroup: cmd.SysProcAttr.Setpgid, done: make(chan struct{})}
	l.mu.Lock()
	l.live[p] = struct{}{}
	l.mu.Unlock()
	go func() {
		p.err = cmd.Wait()
		l.mu.Lock()
		delete(l.live, p)
		l.mu.Unlock()
		close(p.done)
	}()
	return p, nil
}

// Process is a started child.
type Process struct {
	cmd      *exec.Cmd
	ownGroup bool
	done     chan struct{}
	err      error // set before done is closed
}

// Pid is the child's process id (and process group id unless ForegroundGroup).
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Done is closed when the child has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err is the result of Wait; valid once Done is closed.
func (p *Process) Err() error {
	<-p.done
	return p.err
}

// ExitCode is the child's exit code, -1 if it was killed by a signal; valid once Done is closed.
func (p *Process) ExitCode() int {
	<-p.done
	return p.cmd.ProcessState.ExitCode()
}

// Signal sends sig to the child (not its group) if it is still running.
func (p *Process) Signal(sig syscall.Signal) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, syscall.ESRCH) && err.Error() != "os: process already finished" {
		return fmt.Errorf("signal %d: %w", p.Pid(), err)
	}
	return nil
}

// Stop sends sig to the child, waits up to grace for it to exit, then SIGKILLs its process
// group. Once the child has exited, anything left in its group is killed too. Stop returns
// after the child has exited.
func (p *Process) Stop(sig syscall.Signal, grace time.Duration) {
	_ = p.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.killGroup()
		if !p.ownGroup {
			_ = p.cmd.Process.Kill()
		}
		<-p.done
	}
	p.killGroup()
}

func (p *Process) killGroup() {
	if p.ownGroup {
		_ = syscall.Kill(-p.Pid(), syscall.SIGKILL)
	}
}
