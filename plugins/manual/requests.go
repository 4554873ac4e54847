package manual

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/gpuaas/gpuaas/agent/tasks"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// Every value that reaches a node (in a task's parameters or the agent's
// Nomad job) is checked here first, with the rules of the agent's task
// handlers or stricter, so a request the agent would refuse fails at once
// with base.ErrInvalidArgument instead of as a failed task later.

var (
	// nodeIDRE is a host name or Nomad node name: it becomes part of a Nomad
	// job id and a placement constraint.
	nodeIDRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._-]{0,180}[A-Za-z0-9])?$`)
	// usernameRE is the agent's tenant account name rule.
	usernameRE = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,30}$`)
	// labelRE is what ids written onto the node may contain.
	labelRE = regexp.MustCompile(`^[A-Za-z0-9._:-]{0,128}$`)
	// tagRE is the core's node tag rule.
	tagRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:=/-]{0,62}$`)
	// modelRE is what a declared CPU or GPU model may contain.
	modelRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9 ()@._+,/-]{0,127}$`)
)

// maxOperationID leaves room for the "/wipe" suffix of a release's second
// task within the core's 200 characters.
const maxOperationID = 195

// wipeSuffix names the node.wipe task of a release: its operation id is the
// release's plus this suffix.
const wipeSuffix = "/wipe"

// Tenant uid range of the agent (tasks.System's default).
const (
	minTenantUID = 2000
	maxTenantUID = 59999
)

// reservedUsers are accounts no tenant may be: the agent's list and the
// usual system accounts.
func reservedUsers() []string {
	return []string{
		"root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy",
		"www-data", "backup", "list", "irc", "gnats", "nobody", "nogroup", "syslog", "messagebus",
		"sshd", "ubuntu", "admin", "lxd", "maas", "landscape", "pollinate", "tss", "uuidd", "tcpdump",
		"usbmux", "dnsmasq", "polkitd", "fwupd-refresh", "_apt", "gpuaas", "nomad", "consul", "vault",
		"nvidia-persistenced", "systemd-network", "systemd-resolve",
	}
}

func invalidf(what, format string, args ...any) error {
	return fmt.Errorf("manual: %s: %s: %w", what, fmt.Sprintf(format, args...), base.ErrInvalidArgument)
}

func checkOperationID(what, id string) error {
	switch {
	case id == "":
		return invalidf(what, "no operation id")
	case len(id) > maxOperationID:
		return invalidf(what, "operation id of %d characters; at most %d", len(id), maxOperationID)
	case strings.ContainsFunc(id, func(r rune) bool { return r < 0x21 || r == 0x7f }):
		return invalidf(what, "operation id %q has spaces or control characters", id)
	}
	return nil
}

func checkNodeID(what, id string) error {
	if !nodeIDRE.MatchString(id) || strings.Contains(id, "..") {
		return invalidf(what, "node id %q is not a host name (letters, digits, '.', '_', '-')", id)
	}
	return nil
}

func checkUsername(what, name string) error {
	if !usernameRE.MatchString(name) {
		return invalidf(what, "user name %q must match %s", name, usernameRE)
	}
	if slices.Contains(reservedUsers(), name) || strings.HasPrefix(name, "systemd-") {
		return invalidf(what, "user name %q is reserved", name)
	}
	return nil
}

// provisionParams validates a provision request and returns the task's
// parameters.
func provisionParams(req *provisioner.ProvisionRequest, sudo bool) (*tasks.ProvisionUserParams, error) {
	const what = "provision"
	if err := checkOperationID(what, req.OperationID); err != nil {
		return nil, err
	}
	if err := checkNodeID(what, req.NodeID); err != nil {
		return nil, err
	}
	if err := checkUsername(what, req.User.Username); err != nil {
		return nil, err
	}
	if uid := req.User.UID; uid != 0 && (uid < minTenantUID || uid > maxTenantUID) {
		return nil, invalidf(what, "uid %d outside the tenant range %d-%d", uid, minTenantUID, maxTenantUID)
	}
	if !labelRE.MatchString(req.AllocationID) {
		return nil, invalidf(what, "allocation id %q must match %s", req.AllocationID, labelRE)
	}
	if n := len(req.SSHPublicKeys); n == 0 || n > 32 {
		return nil, invalidf(what, "want 1 to 32 SSH public keys, have %d", n)
	}
	p := &tasks.ProvisionUserParams{AllocationID: req.AllocationID, Username: req.User.Username, UID: req.User.UID, Sudo: sudo}
	for i, k := range req.SSHPublicKeys {
		ck, err := provisioner.CanonicalSSHKey(k)
		if err != nil {
			return nil, invalidf(what, "SSH key %d: %v", i+1, err)
		}
		if !slices.Contains(p.SSHPublicKeys, ck) {
			p.SSHPublicKeys = append(p.SSHPublicKeys, ck)
		}
	}
	return p, nil
}

// releaseParams validates a release request and returns the revoke task's
// parameters and whether the node's scratch areas are wiped too.
func releaseParams(req *provisioner.ReleaseRequest, wipeAllowed bool) (*tasks.RevokeUserParams, bool, error) {
	const what = "release"
	if err := checkOperationID(what, req.OperationID); err != nil {
		return nil, false, err
	}
	if err := checkNodeID(what, req.NodeID); err != nil {
		return nil, false, err
	}
	if err := checkUsername(what, req.Username); err != nil {
		return nil, false, err
	}
	if !labelRE.MatchString(req.AllocationID) {
		return nil, false, invalidf(what, "allocation id %q must match %s", req.AllocationID, labelRE)
	}
	wipe := false
	switch req.Mode {
	case provisioner.ReleaseRevoke:
	case provisioner.ReleaseWipe:
		if !wipeAllowed {
			return nil, false, invalidf(what, "wipe asked for, but release_wipe is off")
		}
		wipe = true
	case provisioner.ReleaseReimage:
		return nil, false, invalidf(what, "the manual driver cannot reimage a node; use revoke or wipe")
	default:
		return nil, false, invalidf(what, "unknown release mode %q", req.Mode)
	}
	return &tasks.RevokeUserParams{AllocationID: req.AllocationID, Username: req.Username}, wipe, nil
}

// fingerprint identifies a request, to recognize a retry.
func fingerprint(parts ...any) string {
	b, _ := json.Marshal(parts)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:16])
}

// Enroll parameters an operator may declare for a node's hardware until its
// agent reports the real facts.
const (
	paramGPUModel       = "gpu_model"
	paramGPUCount       = "gpu_count"
	paramGPUMemoryBytes = "gpu_memory_bytes"
	paramCPUModel       = "cpu_model"
	paramCPUCores       = "cpu_cores"
	paramMemoryBytes    = "memory_bytes"
	paramDiskBytes      = "disk_bytes"
)

func enrollParams() []string {
	return []string{paramGPUModel, paramGPUCount, paramGPUMemoryBytes, paramCPUModel, paramCPUCores, paramMemoryBytes, paramDiskBytes}
}

// enrollFacts validates an enroll request and returns the node's facts: its
// id, host name (Address, else the node id), pool and tags, and the hardware
// the operator declared in Params, if any.
func enrollFacts(req *provisioner.EnrollRequest) (*provisioner.NodeFacts, error) {
	const what = "enroll"
	if err := checkOperationID(what, req.OperationID); err != nil {
		return nil, err
	}
	if err := checkNodeID(what, req.NodeID); err != nil {
		return nil, err
	}
	f := &provisioner.NodeFacts{NodeID: req.NodeID, Hostname: req.NodeID, Pool: req.Pool}
	if a := req.Address; a != "" {
		if _, err := netip.ParseAddr(a); err != nil && (!nodeIDRE.MatchString(a) || strings.Contains(a, "..")) {
			return nil, invalidf(what, "address %q is neither an IP address nor a host name", a)
		}
		f.Hostname = a
	}
	if len(req.Pool) > 100 || strings.ContainsFunc(req.Pool, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return nil, invalidf(what, "pool %q: at most 100 printable characters", req.Pool)
	}
	if len(req.Tags) > 32 {
		return nil, invalidf(what, "at most 32 tags")
	}
	for _, t := range req.Tags {
		if !tagRE.MatchString(t) {
			return nil, invalidf(what, "tag %q must match %s", t, tagRE)
		}
		if !slices.Contains(f.Tags, t) {
			f.Tags = append(f.Tags, t)
		}
	}
	sort.Strings(f.Tags)
	num := func(key string, limit uint64) (uint64, error) {
		v, ok := req.Params[key]
		if !ok {
			return 0, nil
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil || n > limit {
			return 0, invalidf(what, "param %s=%q: want a whole number up to %d", key, v, limit)
		}
		return n, nil
	}
	for k := range req.Params {
		if !slices.Contains(enrollParams(), k) {
			return nil, invalidf(what, "unknown param %q (known: %s)", k, strings.Join(enrollParams(), ", "))
		}
	}
	gpus, err := num(paramGPUCount, 64)
	if err != nil {
		return nil, err
	}
	gpuMem, err := num(paramGPUMemoryBytes, 1<<50)
	if err != nil {
		return nil, err
	}
	cores, err := num(paramCPUCores, 1<<16)
	if err != nil {
		return nil, err
	}
	if f.MemoryBytes, err = num(paramMemoryBytes, 1<<60); err != nil {
		return nil, err
	}
	if f.DiskBytes, err = num(paramDiskBytes, 1<<62); err != nil {
		return nil, err
	}
	f.CPU.Cores = int(cores)
	if m := req.Params[paramCPUModel]; m != "" {
		if !modelRE.MatchString(m) {
			return nil, invalidf(what, "param %s=%q must match %s", paramCPUModel, m, modelRE)
		}
		f.CPU.Model = m
	}
	switch m := req.Params[paramGPUModel]; {
	case m == "" && gpus > 0:
		return nil, invalidf(what, "param %s needs %s", paramGPUCount, paramGPUModel)
	case m != "" && !modelRE.MatchString(m):
		return nil, invalidf(what, "param %s=%q must match %s", paramGPUModel, m, modelRE)
	case m != "":
		if gpus == 0 {
			gpus = 1
		}
		f.GPUs = []provisioner.GPU{{Model: m, Count: int(gpus), MemoryBytes: gpuMem}}
	}
	return f, nil
}
