package storage

import (
	"context"
	"errors"

	plugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	"github.com/gpuaas/gpuaas/sdk/base"
	basepb "github.com/gpuaas/gpuaas/sdk/base/proto"
	storagepb "github.com/gpuaas/gpuaas/sdk/storage/proto"
)

// Plugin is the go-plugin wrapper of a storage driver. In a plugin binary
// Impl is the driver; on the host Impl is nil and Dispense returns a
// *Client.
type Plugin struct {
	plugin.NetRPCUnsupportedPlugin

	Impl Driver
	// WrapConn, on the host, wraps the connection the client calls on.
	WrapConn base.ConnWrapper
}

var _ plugin.GRPCPlugin = (*Plugin)(nil)

// OptionalCapabilities lists the optional capabilities d implements.
func OptionalCapabilities(d Driver) []string {
	var caps []string
	if _, ok := d.(Presigner); ok {
		caps = append(caps, base.CapabilityPresign)
	}
	if _, ok := d.(RangeGetter); ok {
		caps = append(caps, base.CapabilityRange)
	}
	if _, ok := d.(MultipartUploader); ok {
		caps = append(caps, base.CapabilityMultipart)
	}
	return caps
}

// GRPCServer implements plugin.GRPCPlugin.
func (p *Plugin) GRPCServer(_ *plugin.GRPCBroker, s *grpc.Server) error {
	if p.Impl == nil {
		return errors.New("storage plugin: no driver to serve")
	}
	basepb.RegisterBasePluginServer(s, base.NewServer(p.Impl, OptionalCapabilities(p.Impl)))
	storagepb.RegisterStorageServer(s, NewServer(p.Impl))
	return nil
}

// GRPCClient implements plugin.GRPCPlugin. doneCtx is done when the plugin
// process exits.
func (p *Plugin) GRPCClient(doneCtx context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (any, error) {
	return NewClient(p.WrapConn.Apply(c, doneCtx), doneCtx), nil
}
