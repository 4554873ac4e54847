package tasks

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/crypto/ssh"
)

// What the agent keeps in sshd's configuration folder so that the node's sshd
// accepts the core's short-lived tenant certificates (the browser terminal):
//
//	gpuaas_user_ca.pub               the CA keys, one authorized_keys line each
//	sshd_config.d/60-gpuaas.conf     TrustedUserCAKeys and AuthorizedPrincipalsFile
//	gpuaas_principals/<user>         written by allocation.provision_user
//
// A certificate is accepted only for an account that has a principals file
// naming the certificate's principal, so a certificate the CA signs never
// opens root or any other account that is not a live tenant's.
const (
	SSHCAFile      = "gpuaas_user_ca.pub"
	SSHDropIn      = "sshd_config.d/60-gpuaas.conf"
	SSHPrincipals  = "gpuaas_principals"
	DefaultSSHDir  = "/etc/ssh"
	defaultSSHDPid = "/run/sshd.pid"
)

func (s *System) sshDir() string {
	if s.SSHDir != "" {
		return s.SSHDir
	}
	return DefaultSSHDir
}

func (s *System) sshdConfig() []byte { return SSHDTrustConfig(s.sshDir()) }

// SSHDTrustConfig is the sshd drop-in (SSHDropIn) that makes sshd trust the
// CA keys in dir/SSHCAFile for the principals in dir/SSHPrincipals/<user>
// (paths as the node sees them). Provisioners that prepare a node without
// the agent (cloud-init) write the same files.
func SSHDTrustConfig(dir string) []byte {
	return []byte("# Written by gpuaas (node agent or provisioning); rewritten when the CA changes.\n" +
		"# Tenants reach their account with short-lived certificates of the gpuaas SSH CA,\n" +
		"# accepted only for principals listed in the account's principals file.\n" +
		"TrustedUserCAKeys " + filepath.Join(dir, SSHCAFile) + "\n" +
		"AuthorizedPrincipalsFile " + filepath.Join(dir, SSHPrincipals, "%u") + "\n")
}

// InstallSSHTrust makes the node's sshd accept user certificates of the CA
// keys given (authorized_keys lines, as the core hands them out at
// enrollment and with each heartbeat). It writes only what changed and then
// reloads sshd; it reports whether anything changed. No keys leaves the
// current trust as it is.
func (s *System) InstallSSHTrust(ctx context.Context, caKeys []string) (bool, error) {
	if len(caKeys) == 0 {
		return false, nil
	}
	var ca bytes.Buffer
	for i, line := range caKeys {
		pub, _, options, rest, err := ssh.ParseAuthorizedKey([]byte(line))
		if err != nil || len(options) > 0 || len(bytes.TrimSpace(rest)) > 0 {
			return false, fmt.Errorf("SSH CA key %d is not one plain authorized_keys line", i)
		}
		if _, isCert := pub.(*ssh.Certificate); isCert {
			return false, fmt.Errorf("SSH CA key %d is a certificate, not a CA key", i)
		}
		ca.Write(ssh.MarshalAuthorizedKey(pub))
	}
	dir := s.path(s.sshDir())
	if err := os.MkdirAll(filepath.Join(dir, SSHPrincipals), 0o755); err != nil {
		return false, err
	}
	if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, SSHDropIn)), 0o755); err != nil {
		return false, err
	}
	changed := false
	for _, f := range []struct {
		name string
		data []byte
	}{{SSHCAFile, ca.Bytes()}, {SSHDropIn, s.sshdConfig()}} {
		c, err := writeIfChanged(filepath.Join(dir, f.name), f.data, 0o644)
		if err != nil {
			return false, err
		}
		changed = changed || c
	}
	if !changed {
		return false, nil
	}
	reload := s.ReloadSSHD
	if reload == nil {
		reload = reloadSSHD
	}
	if err := reload(ctx); err != nil {
		return true, fmt.Errorf("reload sshd: %w", err)
	}
	return true, nil
}

// writeIfChanged writes data to path (atomically) unless it holds it already.
func writeIfChanged(path string, data []byte, mode os.FileMode) (bool, error) {
	old, err := os.ReadFile(path)
	if err == nil && bytes.Equal(old, data) {
		return false, nil
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, err
	}
	return true, writeFileAtomic(path, data, mode)
}

// reloadSSHD has a running sshd reread its configuration after checking it;
// an sshd that is not running reads it when it starts.
func reloadSSHD(ctx context.Context) error {
	raw, err := os.ReadFile(defaultSSHDPid)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil || pid < 2 {
		return fmt.Errorf("%s holds no process id", defaultSSHDPid)
	}
	if err := run(ctx, "sshd", "-t"); err != nil {
		return fmt.Errorf("sshd refuses its configuration: %w", err)
	}
	return syscall.Kill(pid, syscall.SIGHUP)
}

// principalsFile is where an account's accepted certificate principals live.
func (s *System) principalsFile(user string) string {
	return s.path(filepath.Join(s.sshDir(), SSHPrincipals, user))
}

// allowCertificates lets certificates for principal user open the account.
func (s *System) allowCertificates(user string) error {
	p := s.principalsFile(user)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	return writeFileAtomic(p, []byte(user+"\n"), 0o644)
}

// denyCertificates removes the account's principals file.
func (s *System) denyCertificates(user string) error {
	if err := os.Remove(s.principalsFile(user)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}
