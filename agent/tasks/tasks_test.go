package tasks

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/agent/protocol"
)

// prefixSystem is a System whose account files are a copy of this machine's
// /etc in a temporary folder: the real useradd and userdel edit the copy.
// They need root, as on a node.
func prefixSystem(t *testing.T) *System {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("these tests run useradd/userdel and chown: run them as root (the agent runs as root on a node)")
	}
	p := t.TempDir()
	for _, d := range []string{"etc", "home", "scratch/a", "scratch/b"} {
		if err := os.MkdirAll(filepath.Join(p, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"passwd", "group", "shadow", "gshadow", "login.defs"} {
		b, err := os.ReadFile("/etc/" + f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(p, "etc", f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return &System{Prefix: p, ScratchDirs: []string{"/scratch/a", "/scratch/b"}}
}

func authorizedKey(t *testing.T, comment string) string {
	t.Helper()
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sp, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sp))) + " " + comment
}

func runTask(t *testing.T, sys *System, typ string, params any) (map[string]any, error) {
	t.Helper()
	raw, _ := json.Marshal(params)
	out, err := Handlers(sys)[typ].Run(context.Background(), raw)
	if err != nil {
		return nil, err
	}
	var m map[string]any
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatal(err)
	}
	return m, nil
}

func TestProvisionAndRevokeUser(t *testing.T) {
	sys := prefixSystem(t)
	k1, k2 := authorizedKey(t, "alice@laptop"), authorizedKey(t, "alice@desktop")
	params := ProvisionUserParams{AllocationID: "a1", Username: "alice", UID: 2501, SSHPublicKeys: []string{k1, k2}, Sudo: true}
	if _, err := runTask(t, sys, protocol.TaskProvisionUser, params); err != nil {
		t.Fatal(err)
	}
	// Again: the same effect (tasks are retried).
	if _, err := runTask(t, sys, protocol.TaskProvisionUser, params); err != nil {
		t.Fatalf("second run: %v", err)
	}
	uid, home, ok, err := sys.lookup("alice")
	if err != nil || !ok || uid != 2501 || home != "/home/alice" {
		t.Fatalf("account: uid %d home %q ok %v err %v", uid, home, ok, err)
	}
	keys, err := os.ReadFile(filepath.Join(sys.Prefix, "home/alice/.ssh/authorized_keys"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(string(keys), "ssh-ed25519 ") != 2 || strings.Contains(string(keys), "laptop") {
		t.Fatalf("authorized_keys (two keys, comments stripped): %q", keys)
	}
	for path, mode := range map[string]os.FileMode{"home/alice/.ssh": 0o700, "home/alice/.ssh/authorized_keys": 0o600, "etc/sudoers.d/gpuaas-alice": 0o440} {
		fi, err := os.Stat(filepath.Join(sys.Prefix, path))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != mode {
			t.Errorf("%s mode %v; want %v", path, fi.Mode().Perm(), mode)
		}
		if st := fi.Sys().(*syscall.Stat_t); path != "etc/sudoers.d/gpuaas-alice" && st.Uid != 2501 {
			t.Errorf("%s owned by %d; want 2501", path, st.Uid)
		}
	}
	// Without sudo the rule goes away; with another uid the task refuses.
	params.Sudo = false
	if _, err := runTask(t, sys, protocol.TaskProvisionUser, params); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(sys.Prefix, "etc/sudoers.d/gpuaas-alice")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("sudo rule kept: %v", err)
	}
	params.UID = 2502
	if _, err := runTask(t, sys, protocol.TaskProvisionUser, params); err == nil {
		t.Fatal("provisioning an existing account with another uid succeeded")
	}

	// Revoke kills the account's processes and removes account and home.
	sleeper := exec.Command("sleep", "600")
	sleeper.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 2501, Gid: 2501}}
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- sleeper.Wait() }()
	out, err := runTask(t, sys, protocol.TaskRevokeUser, RevokeUserParams{AllocationID: "a1", Username: "alice"})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		_ = sleeper.Process.Kill()
		t.Fatal("the tenant's process survived revoke_user")
	}
	if _, _, ok, _ := sys.lookup("alice"); ok || out["removed"] != true {
		t.Fatalf("account still there after revoke: %v", out)
	}
	if _, err := os.Stat(filepath.Join(sys.Prefix, "home/alice")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("home kept: %v", err)
	}
	// Revoking again is already done.
	if out, err := runTask(t, sys, protocol.TaskRevokeUser, RevokeUserParams{AllocationID: "a1", Username: "alice"}); err != nil || out["removed"] != false {
		t.Fatalf("second revoke: %v %v", out, err)
	}
}

func TestTaskParamsRefused(t *testing.T) {
	sys := prefixSystem(t)
	key := authorizedKey(t, "x")
	before, _ := os.ReadFile(filepath.Join(sys.Prefix, "etc/passwd"))
	cases := []struct {
		typ    string
		params any
	}{
		{protocol.TaskProvisionUser, map[string]any{"username": "root", "uid": 2501, "ssh_public_keys": []string{key}}},
		{protocol.TaskProvisionUser, map[string]any{"username": "a;rm -rf /", "uid": 2501, "ssh_public_keys": []string{key}}},
		{protocol.TaskProvisionUser, map[string]any{"username": "bob", "uid": 0, "ssh_public_keys": []string{key}, "shell": "/bin/sh"}},
		{protocol.TaskProvisionUser, map[string]any{"username": "bob", "uid": 100, "ssh_public_keys": []string{key}}},
		{protocol.TaskProvisionUser, map[string]any{"username": "bob", "uid": 2501, "ssh_public_keys": []string{`command="/bin/sh" ` + key}}},
		{protocol.TaskProvisionUser, map[string]any{"username": "bob", "uid": 2501, "ssh_public_keys": []string{key + "\nssh-ed25519 AAAA"}}},
		{protocol.TaskProvisionUser, map[string]any{"username": "bob", "uid": 2501}},
		{protocol.TaskRevokeUser, map[string]any{"username": "root"}},
		{protocol.TaskRevokeUser, map[string]any{"username": "daemon"}},
		{protocol.TaskWipe, map[string]any{"paths": []string{"/"}}},
	}
	for i, c := range cases {
		if _, err := runTask(t, sys, c.typ, c.params); !errors.Is(err, ErrInvalid) {
			t.Errorf("case %d (%s %v): %v; want ErrInvalid", i, c.typ, c.params, err)
		}
	}
	after, _ := os.ReadFile(filepath.Join(sys.Prefix, "etc/passwd"))
	if string(before) != string(after) {
		t.Fatal("a refused task changed the accounts")
	}
	// An account outside the tenant range is never removed, even by name.
	if _, err := runTask(t, sys, protocol.TaskRevokeUser, map[string]any{"username": "nobodyx"}); err != nil {
		t.Fatalf("revoke of a missing tenant: %v", err)
	}
}

func TestWipeEmptiesScratchOnly(t *testing.T) {
	sys := prefixSystem(t)
	for _, f := range []string{"scratch/a/x.bin", "scratch/a/dir/y", "scratch/b/z", "home/keep"} {
		p := filepath.Join(sys.Prefix, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("data"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out, err := runTask(t, sys, protocol.TaskWipe, WipeParams{AllocationID: "a1"})
	if err != nil {
		t.Fatal(err)
	}
	if out["removed_entries"] != float64(3) {
		t.Fatalf("wipe: %v", out)
	}
	for _, d := range []string{"scratch/a", "scratch/b"} {
		entries, err := os.ReadDir(filepath.Join(sys.Prefix, d))
		if err != nil || len(entries) != 0 {
			t.Fatalf("%s after wipe: %v %v", d, entries, err)
		}
	}
	if _, err := os.Stat(filepath.Join(sys.Prefix, "home/keep")); err != nil {
		t.Fatal("wipe touched something outside the scratch areas")
	}
}

func TestInventoryFacts(t *testing.T) {
	out, err := runTask(t, &System{}, protocol.TaskInventory, nil)
	if err != nil {
		t.Fatal(err)
	}
	if out["cpu_cores"].(float64) < 1 || out["memory_bytes"].(float64) <= 0 || out["hostname"] == "" {
		t.Fatalf("facts: %v", out)
	}
	// A fake nvidia-smi that prints what the real one prints for two kinds.
	dir := t.TempDir()
	smi := filepath.Join(dir, "nvidia-smi")
	script := "#!/bin/sh\nprintf 'NVIDIA H100 80GB HBM3, 81559, 550.54.15\\nNVIDIA H100 80GB HBM3, 81559, 550.54.15\\nNVIDIA L40S, 46068, 550.54.15\\n'\n"
	if err := os.WriteFile(smi, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := CollectFacts(context.Background(), smi)
	if err != nil {
		t.Fatal(err)
	}
	if len(f.GPUs) != 2 || f.GPUs[0].Count != 2 || f.GPUs[0].MemoryMiB != 81559 || f.GPUs[1].Model != "NVIDIA L40S" || f.GPUs[0].DriverVersion != "550.54.15" {
		t.Fatalf("gpus: %+v", f.GPUs)
	}
}
