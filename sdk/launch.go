package sdk

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"time"

	"github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/internal/unary"
	"github.com/gpuaas/gpuaas/sdk/payments"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// HostPluginSet is the plugin set a host dispenses from: every kind, with
// no implementation. Dispense returns *provisioner.Client,
// *payments.Client or *storage.Client.
func HostPluginSet() plugin.PluginSet { return hostPluginSet(nil) }

func hostPluginSet(wrap base.ConnWrapper) plugin.PluginSet {
	return plugin.PluginSet{
		string(base.KindProvisioner): &provisioner.Plugin{WrapConn: wrap},
		string(base.KindPayments):    &payments.Plugin{WrapConn: wrap},
		string(base.KindStorage):     &storage.Plugin{WrapConn: wrap},
	}
}

// Launch describes how a host starts a driver binary.
type Launch struct {
	// Path of the binary.
	Path string
	Args []string
	// Env is the plugin's environment ("KEY=value"), on top of the few
	// host variables in PassedEnv. Nothing else of the host's environment
	// (DATABASE_URL, VAULT_TOKEN, ...) reaches a driver.
	Env []string
	// SHA256 is the checksum recorded when the binary was installed. It is
	// required: go-plugin refuses a binary whose checksum differs.
	SHA256 []byte
	// Logger receives the plugin's log lines (default: hclog.Default()).
	Logger hclog.Logger
	// Stderr, if set, also receives the plugin's raw stderr.
	Stderr io.Writer
	// StartTimeout bounds the handshake (default one minute).
	StartTimeout time.Duration
}

// ClientConfig returns the go-plugin client configuration for l: the gpuaas
// handshake, gRPC only, AutoMTLS and the SecureConfig checksum.
func ClientConfig(l Launch) (*plugin.ClientConfig, error) {
	if l.Path == "" {
		return nil, fmt.Errorf("plugin launch: empty path: %w", base.ErrInvalidArgument)
	}
	if len(l.SHA256) != sha256.Size {
		return nil, fmt.Errorf("plugin launch %s: want a %d-byte SHA-256 checksum, have %d bytes: %w",
			l.Path, sha256.Size, len(l.SHA256), base.ErrInvalidArgument)
	}
	cmd := exec.Command(l.Path, l.Args...)
	for _, k := range PassedEnv() {
		if v, ok := os.LookupEnv(k); ok {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
	}
	cmd.Env = append(cmd.Env, l.Env...)
	cfg := &plugin.ClientConfig{
		HandshakeConfig:  base.Handshake(),
		Cmd:              cmd,
		SecureConfig:     &plugin.SecureConfig{Checksum: append([]byte(nil), l.SHA256...), Hash: sha256.New()},
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		AutoMTLS:         true,
		GRPCDialOptions:  dialTuning(),
		SkipHostEnv:      true,
		Logger:           l.Logger,
		Stderr:           l.Stderr,
		StartTimeout:     l.StartTimeout,
	}
	// Unary calls go on connections of their own, made with the mTLS
	// configuration go-plugin fills in at start (package unary explains
	// why); streams stay on go-plugin's gRPC connection.
	cfg.Plugins = hostPluginSet(func(c *grpc.ClientConn, doneCtx context.Context) grpc.ClientConnInterface {
		return unary.New(c, func() *tls.Config { return cfg.TLSConfig }, doneCtx)
	})
	return cfg, nil
}

// PassedEnv lists the host environment variables a plugin inherits: what
// a program needs to find tools, temporary space, time zones, CA
// certificates and proxies.
func PassedEnv() []string {
	return []string{
		"PATH", "HOME", "TMPDIR", "TZ", "LANG", "LC_ALL",
		"SSL_CERT_FILE", "SSL_CERT_DIR",
		"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
	}
}

// Dispense connects to a started (or not yet started) plugin client and
// returns the driver of the given kind: a *provisioner.Client,
// *payments.Client or *storage.Client.
func Dispense(c *plugin.Client, kind base.Kind) (base.BasePlugin, error) {
	rpc, err := c.Client()
	if err != nil {
		return nil, fmt.Errorf("plugin %s: %w", kind, err)
	}
	raw, err := rpc.Dispense(string(kind))
	if err != nil {
		return nil, fmt.Errorf("plugin %s: dispense: %w", kind, err)
	}
	d, ok := raw.(base.BasePlugin)
	if !ok {
		return nil, fmt.Errorf("plugin %s: dispensed %T: %w", kind, raw, errors.ErrUnsupported)
	}
	return d, nil
}

// FileSHA256 returns the SHA-256 of the file at path, as recorded when a
// plugin is installed.
func FileSHA256(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("checksum: %w", err)
	}
	defer func() { _ = f.Close() }()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, fmt.Errorf("checksum %s: %w", path, err)
	}
	return h.Sum(nil), nil
}
