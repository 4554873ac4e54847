package maas

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"path"
	"regexp"
	"slices"
	"strings"

	yaml "go.yaml.in/yaml/v3"

	"github.com/gpuaas/gpuaas/agent/tasks"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

var (
	// usernameRE is a portable Linux user name: no shell metacharacters.
	usernameRE = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)
	// labelRE is what ids written onto the node may contain.
	labelRE = regexp.MustCompile(`^[A-Za-z0-9._:-]{0,128}$`)
)

// reservedUsers are accounts the image has or needs.
func reservedUsers() []string {
	return []string{
		"root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy",
		"www-data", "backup", "list", "irc", "gnats", "nobody", "nogroup", "syslog", "messagebus",
		"sshd", "ubuntu", "admin", "lxd", "maas", "landscape", "pollinate", "tss", "uuidd", "tcpdump",
		"usbmux", "dnsmasq", "polkitd", "fwupd-refresh", "_apt", "gpuaas",
	}
}

// tenant is a validated provision request, in canonical form.
type tenant struct {
	Username  string   `json:"username"`
	UID       int      `json:"uid,omitempty"`
	OrgID     string   `json:"org_id,omitempty"`
	ProjectID string   `json:"project_id,omitempty"`
	Alloc     string   `json:"allocation_id,omitempty"`
	Keys      []string `json:"keys"`
	CAKeys    []string `json:"ca_keys,omitempty"`
	Image     string   `json:"image"`
	NodeID    string   `json:"node_id"`
}

// validateProvision checks a provision request and returns it canonical.
// Every field that reaches the node is checked here, so nothing a tenant
// sends can reach a shell.
func validateProvision(s *settings, req *provisioner.ProvisionRequest) (*tenant, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("maas: provision: %s: %w", fmt.Sprintf(format, args...), base.ErrInvalidArgument)
	}
	if !systemIDRE.MatchString(req.NodeID) {
		return nil, bad("node id %q is not a MAAS system id", req.NodeID)
	}
	u := req.User
	if !usernameRE.MatchString(u.Username) {
		return nil, bad("user name %q must match %s", u.Username, usernameRE)
	}
	if slices.Contains(reservedUsers(), u.Username) || strings.HasPrefix(u.Username, "systemd-") {
		return nil, bad("user name %q is reserved", u.Username)
	}
	if u.UID != 0 && (u.UID < 1000 || u.UID > 59999) {
		return nil, bad("uid %d outside 1000-59999", u.UID)
	}
	for name, v := range map[string]string{"org id": u.OrgID, "project id": u.ProjectID, "allocation id": req.AllocationID} {
		if !labelRE.MatchString(v) {
			return nil, bad("%s %q must match %s", name, v, labelRE)
		}
	}
	if len(req.SSHPublicKeys) == 0 || len(req.SSHPublicKeys) > 32 {
		return nil, bad("want 1 to 32 SSH public keys, have %d", len(req.SSHPublicKeys))
	}
	t := &tenant{Username: u.Username, UID: u.UID, OrgID: u.OrgID, ProjectID: u.ProjectID, Alloc: req.AllocationID, NodeID: req.NodeID}
	for i, k := range req.SSHPublicKeys {
		ck, err := provisioner.CanonicalSSHKey(k)
		if err != nil {
			return nil, bad("SSH key %d: %v", i+1, err)
		}
		if !slices.Contains(t.Keys, ck) {
			t.Keys = append(t.Keys, ck)
		}
	}
	if len(req.SSHUserCAKeys) > 4 {
		return nil, bad("want at most 4 SSH CA keys, have %d", len(req.SSHUserCAKeys))
	}
	for i, k := range req.SSHUserCAKeys {
		ck, err := provisioner.CanonicalSSHKey(k)
		if err != nil {
			return nil, bad("SSH CA key %d: %v", i+1, err)
		}
		t.CAKeys = append(t.CAKeys, ck)
	}
	t.Image = req.Image
	if t.Image == "" {
		t.Image = s.defaultImage
	}
	if !slices.Contains(s.images, t.Image) {
		return nil, bad("image %q is not offered (have %v)", t.Image, s.images)
	}
	return t, nil
}

// fingerprint identifies the request, to recognize a retry. The SSH CA
// keys are no part of it: they say how the node trusts the core, not what
// the tenant asked for, and a retry made after the core rotated its SSH CA
// carries the new ones (the deployment keeps those of the first attempt;
// the node agent or a later provisioning brings the new CA).
func (t *tenant) fingerprint() string {
	c := *t
	c.CAKeys = nil
	return hashJSON(&c)
}

// legacyFingerprint is the fingerprint earlier versions of this driver
// recorded, which covered the CA keys: an operation one of them started,
// retried after an upgrade, is still recognized.
func (t *tenant) legacyFingerprint() string { return hashJSON(t) }

func hashJSON(v any) string {
	b, _ := json.Marshal(v)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:16])
}

// cloud-config document types (cloud-init's schema).
type cloudConfig struct {
	Users       []any       `yaml:"users"`
	SSHPwauth   bool        `yaml:"ssh_pwauth"`
	DisableRoot bool        `yaml:"disable_root"`
	WriteFiles  []writeFile `yaml:"write_files"`
}

type cloudUser struct {
	Name              string   `yaml:"name"`
	UID               int      `yaml:"uid,omitempty"`
	Gecos             string   `yaml:"gecos"`
	Shell             string   `yaml:"shell"`
	LockPasswd        bool     `yaml:"lock_passwd"`
	Sudo              string   `yaml:"sudo,omitempty"`
	SSHAuthorizedKeys []string `yaml:"ssh_authorized_keys"`
}

type writeFile struct {
	Path        string `yaml:"path"`
	Permissions string `yaml:"permissions"`
	Owner       string `yaml:"owner"`
	Content     string `yaml:"content"`
}

// cloudConfigFor renders the cloud-init user data that creates the tenant
// user with its keys. The YAML is produced by a YAML encoder, never by
// string pasting.
func cloudConfigFor(s *settings, t *tenant) ([]byte, error) {
	user := cloudUser{
		Name:              t.Username,
		UID:               t.UID,
		Gecos:             "gpuaas tenant",
		Shell:             "/bin/bash",
		LockPasswd:        true,
		SSHAuthorizedKeys: t.Keys,
	}
	if s.tenantSudo {
		user.Sudo = "ALL=(ALL) NOPASSWD:ALL"
	}
	meta, err := json.MarshalIndent(map[string]string{
		"allocation_id": t.Alloc, "org_id": t.OrgID, "project_id": t.ProjectID,
		"username": t.Username, "instance": s.instance, "driver": "maas " + Version,
	}, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("maas: user data: %w", err)
	}
	doc := cloudConfig{
		Users:       []any{"default", user},
		SSHPwauth:   false,
		DisableRoot: true,
		WriteFiles: []writeFile{{
			Path: "/etc/gpuaas/allocation.json", Permissions: "0644", Owner: "root:root", Content: string(meta) + "\n",
		}},
	}
	if len(t.CAKeys) > 0 {
		// The browser terminal's trust, as the node agent installs it:
		// certificates of the CA open this tenant's account only. sshd
		// starts after cloud-init writes these.
		dir := tasks.DefaultSSHDir
		doc.WriteFiles = append(doc.WriteFiles,
			writeFile{Path: path.Join(dir, tasks.SSHCAFile), Permissions: "0644", Owner: "root:root", Content: strings.Join(t.CAKeys, "\n") + "\n"},
			writeFile{Path: path.Join(dir, tasks.SSHDropIn), Permissions: "0644", Owner: "root:root", Content: string(tasks.SSHDTrustConfig(dir))},
			writeFile{Path: path.Join(dir, tasks.SSHPrincipals, t.Username), Permissions: "0644", Owner: "root:root", Content: t.Username + "\n"})
	}
	var buf bytes.Buffer
	buf.WriteString("#cloud-config\n")
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(doc); err != nil {
		return nil, fmt.Errorf("maas: user data: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("maas: user data: %w", err)
	}
	return buf.Bytes(), nil
}
