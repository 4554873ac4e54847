//go:build !linux

package pluginhost

import "os/exec"

// setParentDeathSignal is Linux only; elsewhere the SDK's Serve, which
// exits when its parent is gone, keeps plugins from outliving the core.
func setParentDeathSignal(*exec.Cmd) {}
