package tasks

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"github.com/gpuaas/gpuaas/agent/protocol"
)

// AgentVersion is reported with the facts; the build sets it.
var AgentVersion = "dev"

// CollectFacts reads the node's facts: GPUs from nvidia-smi when it is
// present (nvidiaSMI "" looks it up on PATH), else none; CPU, memory, disk
// and load from the kernel.
func CollectFacts(ctx context.Context, nvidiaSMI string) (protocol.Facts, error) {
	f := protocol.Facts{AgentVersion: AgentVersion, GPUs: []protocol.GPU{}, CPUCores: runtime.NumCPU()}
	f.Hostname, _ = os.Hostname()
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		f.Kernel = strings.TrimSpace(string(b))
	}
	if file, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(file)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				f.CPUModel = strings.TrimSpace(v)
				break
			}
		}
		file.Close()
	}
	if file, err := os.Open("/proc/meminfo"); err == nil {
		sc := bufio.NewScanner(file)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) >= 2 && fields[0] == "MemTotal:" {
				kb, _ := strconv.ParseUint(fields[1], 10, 64)
				f.MemoryBytes = kb * 1024
			}
		}
		file.Close()
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs("/", &st); err == nil {
		f.DiskBytes = st.Blocks * uint64(st.Bsize)
		f.DiskFree = st.Bavail * uint64(st.Bsize)
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if fields := strings.Fields(string(b)); len(fields) > 0 {
			f.Load1, _ = strconv.ParseFloat(fields[0], 64)
		}
	}
	gpus, err := nvidiaGPUs(ctx, nvidiaSMI)
	if err != nil {
		return f, err
	}
	f.GPUs = gpus
	return f, nil
}

// nvidiaGPUs groups the GPUs nvidia-smi lists by model; no nvidia-smi means a
// CPU-only node.
func nvidiaGPUs(ctx context.Context, bin string) ([]protocol.GPU, error) {
	if bin == "" {
		p, err := exec.LookPath("nvidia-smi")
		if err != nil {
			return []protocol.GPU{}, nil
		}
		bin = p
	}
	out, err := exec.CommandContext(ctx, bin, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits").Output()
	if err != nil {
		return nil, err
	}
	return parseNvidiaSMI(out), nil
}

func parseNvidiaSMI(out []byte) []protocol.GPU {
	gpus := []protocol.GPU{}
	index := map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		parts := strings.Split(sc.Text(), ",")
		if len(parts) < 3 {
			continue
		}
		name := strings.TrimSpace(parts[0])
		mem, _ := strconv.Atoi(strings.TrimSpace(parts[1]))
		driver := strings.TrimSpace(parts[2])
		key := name + "/" + driver
		if i, ok := index[key]; ok {
			gpus[i].Count++
			continue
		}
		index[key] = len(gpus)
		gpus = append(gpus, protocol.GPU{Model: name, Count: 1, MemoryMiB: mem, DriverVersion: driver})
	}
	return gpus
}
