// Package tasks holds the agent's compiled task handlers: each decodes and
// validates its typed parameters and does one fixed thing with fixed
// programs (useradd, userdel, pkill, nvidia-smi). Nothing runs a command,
// path or argument a task names beyond the validated values of its fields.
package tasks

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/agent/protocol"
)

// ErrInvalid marks parameters a handler refuses; the task fails without
// touching the node.
var ErrInvalid = errors.New("invalid task parameters")

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// Handler runs one task type.
type Handler interface {
	// Run validates params and carries the task out, returning its output.
	// Running the same task again has the same effect (tasks are retried).
	Run(ctx context.Context, params json.RawMessage) (json.RawMessage, error)
}

// System is where the handlers act: the node's root (and for tests, a prefix
// holding a copy of /etc that useradd and userdel edit instead of the real
// one).
type System struct {
	// Prefix, when set, is passed to useradd/userdel as --prefix and roots
	// home directories and sudoers files; "" is the real system.
	Prefix string
	// HomeBase is where tenant homes live (default /home).
	HomeBase string
	// ScratchDirs are the node's scratch areas node.wipe empties.
	ScratchDirs []string
	// SudoersDir is where sudo rules go (default /etc/sudoers.d).
	SudoersDir string
	// UIDMin and UIDMax bound tenant uids (default 2000-59999).
	UIDMin, UIDMax int
	// SSHDir is sshd's configuration folder (default /etc/ssh), where the
	// agent installs the SSH CA trust and the tenants' principals files
	// (sshtrust.go).
	SSHDir string
	// ReloadSSHD has sshd reread its configuration after the trust changed
	// (default: check it with sshd -t, then SIGHUP the pid in
	// /run/sshd.pid when sshd runs).
	ReloadSSHD func(context.Context) error
}

func (s *System) path(p string) string { return filepath.Join(s.Prefix, p) }

func (s *System) homeBase() string {
	if s.HomeBase != "" {
		return s.HomeBase
	}
	return "/home"
}

func (s *System) sudoersDir() string {
	if s.SudoersDir != "" {
		return s.SudoersDir
	}
	return "/etc/sudoers.d"
}

func (s *System) uidRange() (int, int) {
	lo, hi := s.UIDMin, s.UIDMax
	if lo == 0 {
		lo = 2000
	}
	if hi == 0 {
		hi = 59999
	}
	return lo, hi
}

func (s *System) prefixArgs() []string {
	if s.Prefix == "" {
		return nil
	}
	return []string{"--prefix", s.Prefix}
}

func run(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Handlers returns the handler of every task type on sys.
func Handlers(sys *System) map[string]Handler {
	return map[string]Handler{
		protocol.TaskProvisionUser: &provisionUser{sys},
		protocol.TaskRevokeUser:    &revokeUser{sys},
		protocol.TaskInventory:     &inventory{sys},
		protocol.TaskWipe:          &wipe{sys},
	}
}

var usernameRE = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,30}$`)

// reserved are accounts no task may create or remove.
func reserved() []string {
	return []string{"root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy", "www-data",
		"backup", "list", "irc", "gnats", "nobody", "systemd-network", "systemd-resolve", "messagebus", "sshd", "syslog",
		"ubuntu", "admin", "gpuaas", "maas", "nvidia-persistenced", "_apt"}
}

func (s *System) checkUser(name string, uid int) error {
	if !usernameRE.MatchString(name) || slices.Contains(reserved(), name) {
		return invalid("username %q is not a tenant account name", name)
	}
	lo, hi := s.uidRange()
	if uid != 0 && (uid < lo || uid > hi) {
		return invalid("uid %d outside the tenant range %d-%d", uid, lo, hi)
	}
	return nil
}

func decode(params json.RawMessage, v any) error {
	dec := json.NewDecoder(bytes.NewReader(params))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return invalid("%v", err)
	}
	return nil
}

// ProvisionUserParams are the parameters of allocation.provision_user.
type ProvisionUserParams struct {
	AllocationID  string   `json:"allocation_id"`
	Username      string   `json:"username"`
	UID           int      `json:"uid"`
	SSHPublicKeys []string `json:"ssh_public_keys"`
	Sudo          bool     `json:"sudo"`
}

type provisionUser struct{ sys *System }

// lookup reports the uid of an existing account in the system's passwd.
func (s *System) lookup(name string) (uid int, home string, ok bool, err error) {
	b, err := os.ReadFile(s.path("/etc/passwd"))
	if err != nil {
		return 0, "", false, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(line, ":")
		if len(f) >= 7 && f[0] == name {
			uid, _ = strconv.Atoi(f[2])
			return uid, f[5], true, nil
		}
	}
	return 0, "", false, nil
}

func (h *provisionUser) Run(ctx context.Context, params json.RawMessage) (json.RawMessage, error) {
	var p ProvisionUserParams
	if err := decode(params, &p); err != nil {
		return nil, err
	}
	if err := h.sys.checkUser(p.Username, p.UID); err != nil {
		return nil, err
	}
	if len(p.SSHPublicKeys) == 0 || len(p.SSHPublicKeys) > 32 {
		return nil, invalid("1 to 32 SSH public keys")
	}
	var keys bytes.Buffer
	for i, line := range p.SSHPublicKeys {
		pub, comment, options, rest, err := ssh.ParseAuthorizedKey([]byte(line))
		if err != nil || len(options) > 0 || len(bytes.TrimSpace(rest)) > 0 || strings.ContainsAny(comment, "\r\n") {
			return nil, invalid("ssh_public_keys[%d] is not one plain authorized_keys line", i)
		}
		keys.Write(ssh.MarshalAuthorizedKey(pub)) // re-encoded: no options, no comment
	}
	home := filepath.Join(h.sys.homeBase(), p.Username)
	uid, existingHome, exists, err := h.sys.lookup(p.Username)
	if err != nil {
		return nil, err
	}
	switch {
	case exists && p.UID != 0 && uid != p.UID:
		return nil, fmt.Errorf("account %s exists with uid %d, not %d", p.Username, uid, p.UID)
	case exists:
		home = existingHome
	default:
		args := append(h.sys.prefixArgs(), "--create-home", "--home-dir", home, "--shell", "/bin/bash",
			"--comment", "gpuaas tenant "+p.AllocationID, "--user-group",
			// No password that could match, but not a locked account: sshd
			// without PAM refuses every login to a locked ("!") one.
			"--password", "*")
		if p.UID != 0 {
			args = append(args, "--uid", strconv.Itoa(p.UID))
		}
		if err := run(ctx, "useradd", append(args, p.Username)...); err != nil {
			return nil, err
		}
		if uid, _, _, err = h.sys.lookup(p.Username); err != nil {
			return nil, err
		}
	}
	sshDir := h.sys.path(filepath.Join(home, ".ssh"))
	if err := os.MkdirAll(sshDir, 0o700); err != nil {
		return nil, err
	}
	authorized := filepath.Join(sshDir, "authorized_keys")
	if err := writeFileAtomic(authorized, keys.Bytes(), 0o600); err != nil {
		return nil, err
	}
	for _, p := range []string{h.sys.path(home), sshDir, authorized} {
		if err := os.Lchown(p, uid, uid); err != nil {
			return nil, err
		}
	}
	if err := h.sys.allowCertificates(p.Username); err != nil {
		return nil, err
	}
	sudoers := h.sys.path(filepath.Join(h.sys.sudoersDir(), "gpuaas-"+p.Username))
	if p.Sudo {
		if err := os.MkdirAll(filepath.Dir(sudoers), 0o755); err != nil {
			return nil, err
		}
		if err := writeFileAtomic(sudoers, []byte(p.Username+" ALL=(ALL) NOPASSWD:ALL\n"), 0o440); err != nil {
			return nil, err
		}
	} else if err := os.Remove(sudoers); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	return json.Marshal(map[string]any{"username": p.Username, "uid": uid, "home": home, "keys": len(p.SSHPublicKeys), "sudo": p.Sudo})
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// RevokeUserParams are the parameters of allocation.revoke_user.
type RevokeUserParams struct {
	AllocationID string `json:"allocation_id"`
	Username     string `json:"username"`
}

type revokeUser struct{ sys *System }

// Run kills the account's processes, then removes the account, its home and
// its sudo rule. A missing account is already revoked.
func (h *revokeUser) Run(ctx context.Context, params json.RawMessage) (json.RawMessage, error) {
	var p RevokeUserParams
	if err := decode(params, &p); err != nil {
		return nil, err
	}
	if err := h.sys.checkUser(p.Username, 0); err != nil {
		return nil, err
	}
	uid, home, exists, err := h.sys.lookup(p.Username)
	if err != nil {
		return nil, err
	}
	lo, hi := h.sys.uidRange()
	if exists && (uid < lo || uid > hi) {
		return nil, fmt.Errorf("account %s has uid %d outside the tenant range; refusing to remove it", p.Username, uid)
	}
	// No new certificate logins first, then end the running ones.
	if err := h.sys.denyCertificates(p.Username); err != nil {
		return nil, err
	}
	killed := 0
	if exists {
		// pkill exits 1 when nothing matched.
		for range 3 {
			err := run(ctx, "pkill", "-KILL", "-U", strconv.Itoa(uid))
			if err != nil {
				break
			}
			killed++
			time.Sleep(100 * time.Millisecond)
		}
		if err := run(ctx, "userdel", append(h.sys.prefixArgs(), "--force", p.Username)...); err != nil {
			return nil, err
		}
		if home != "" && strings.HasPrefix(filepath.Clean(home), h.sys.homeBase()+"/") {
			if err := os.RemoveAll(h.sys.path(home)); err != nil {
				return nil, err
			}
		}
	}
	if err := os.Remove(h.sys.path(filepath.Join(h.sys.sudoersDir(), "gpuaas-"+p.Username))); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	return json.Marshal(map[string]any{"username": p.Username, "removed": exists, "kill_rounds": killed})
}

// WipeParams are the parameters of node.wipe.
type WipeParams struct {
	AllocationID string `json:"allocation_id"`
}

type wipe struct{ sys *System }

// Run empties the node's configured scratch areas (never the areas
// themselves, never anything a task names).
func (h *wipe) Run(_ context.Context, params json.RawMessage) (json.RawMessage, error) {
	var p WipeParams
	if err := decode(params, &p); err != nil {
		return nil, err
	}
	removed := 0
	for _, dir := range h.sys.ScratchDirs {
		dir = h.sys.path(dir)
		entries, err := os.ReadDir(dir)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, e := range entries {
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				return nil, err
			}
			removed++
		}
	}
	return json.Marshal(map[string]any{"removed_entries": removed, "areas": len(h.sys.ScratchDirs)})
}

type inventory struct{ sys *System }

// Run reports the node's facts.
func (h *inventory) Run(ctx context.Context, params json.RawMessage) (json.RawMessage, error) {
	var p struct{}
	if len(bytes.TrimSpace(params)) > 0 && string(bytes.TrimSpace(params)) != "null" {
		if err := decode(params, &p); err != nil {
			return nil, err
		}
	}
	f, err := CollectFacts(ctx, "")
	if err != nil {
		return nil, err
	}
	return json.Marshal(f)
}
