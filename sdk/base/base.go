// Package base holds what every gpuaas driver plugin shares, whatever its
// kind: the go-plugin handshake, the BasePlugin calls (Info, ConfigSchema,
// Configure), the configuration schema and its validation, API version
// negotiation, and the sentinel errors that cross the plugin boundary.
package base

import (
	"context"

	plugin "github.com/hashicorp/go-plugin"
)

// Kind is the kind of driver a plugin binary serves. It is also the name
// under which the go-plugin plugin set dispenses it.
type Kind string

// The driver kinds of DESIGN.md §6.
const (
	KindProvisioner Kind = "provisioner"
	KindPayments    Kind = "payments"
	KindStorage     Kind = "storage"
)

// Kinds lists every driver kind.
func Kinds() []Kind { return []Kind{KindProvisioner, KindPayments, KindStorage} }

// Optional capabilities a driver may implement, reported in Info.Capabilities.
// The SDK fills them in from the optional Go interfaces the driver satisfies.
const (
	CapabilityWebhook   = "webhook"   // provisioner.WebhookHandler
	CapabilityDiscover  = "discover"  // provisioner.Discoverer
	CapabilityUnenroll  = "unenroll"  // provisioner.Unenroller
	CapabilityPortal    = "portal"    // payments.PortalCreator
	CapabilityRefund    = "refund"    // payments.Refunder
	CapabilityPresign   = "presign"   // storage.Presigner
	CapabilityRange     = "range"     // storage.RangeGetter
	CapabilityMultipart = "multipart" // storage.MultipartUploader
)

// Handshake values. ProtocolVersion changes only on a wire break; the driver
// API version is negotiated through Info (see NegotiateAPIVersion).
const (
	ProtocolVersion  = 1
	MagicCookieKey   = "GPUAAS_PLUGIN_MAGIC_COOKIE"
	MagicCookieValue = "9f1c0a1e6b3d4c7e8a2f5b0d1e3c6a9b7d4f2e8c1a5b3d6f9e0c2a4b7d1e3f5a"
)

// Handshake is the go-plugin handshake shared by the core and every driver.
// A binary started without the cookie refuses to run as a plugin.
func Handshake() plugin.HandshakeConfig {
	return plugin.HandshakeConfig{
		ProtocolVersion:  ProtocolVersion,
		MagicCookieKey:   MagicCookieKey,
		MagicCookieValue: MagicCookieValue,
	}
}

// Info identifies a driver.
type Info struct {
	// Name of the driver, lower case, e.g. "maas" or "storage-s3".
	Name string
	// Kind of driver the binary serves.
	Kind Kind
	// DriverVersion is the driver's own release version, e.g. "1.4.2".
	DriverVersion string
	// APIVersions are the versions of the kind's driver API the driver
	// implements, e.g. storage.SupportedAPIVersions().
	APIVersions []string
	// Capabilities lists the optional interfaces the driver implements. The
	// SDK sets it when serving; drivers leave it empty.
	Capabilities []string
}

// HasCapability reports whether the driver implements an optional capability.
func (i *Info) HasCapability(c string) bool {
	for _, have := range i.Capabilities {
		if have == c {
			return true
		}
	}
	return false
}

// BasePlugin is implemented by every driver, whatever its kind.
type BasePlugin interface {
	// Info identifies the driver. It must work before Configure.
	Info(ctx context.Context) (*Info, error)
	// ConfigSchema describes the configuration Configure accepts. It must
	// work before Configure and must not change while the process runs.
	ConfigSchema(ctx context.Context) (*ConfigSchema, error)
	// Configure applies a configuration that the SDK has already validated
	// against ConfigSchema (defaults filled in). It may be called again to
	// reconfigure; a driver must accept the same configuration twice.
	Configure(ctx context.Context, cfg *Config) error
}
