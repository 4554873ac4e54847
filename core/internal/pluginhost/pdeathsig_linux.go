package pluginhost

import (
	"os/exec"
	"syscall"
)

// setParentDeathSignal has the kernel SIGKILL the plugin when the core dies,
// even by SIGKILL, so no plugin outlives it. Linux sends the signal when the
// OS thread that forked the child ends, not only the process: the Go
// runtime keeps its threads for the life of the process unless a goroutine
// exits while locked to its thread (runtime.LockOSThread), which the core
// does not do. Should that ever happen the plugin dies early; the host sees
// the exit and restarts it like any crash. The SDK's Serve also stops a
// plugin whose parent is gone, as a second line.
func setParentDeathSignal(cmd *exec.Cmd) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
}
