package base

import (
	"context"
	"fmt"

	"google.golang.org/grpc"

	basepb "github.com/gpuaas/gpuaas/sdk/base/proto"
)

// Client calls a plugin's BasePlugin service. Every driver kind's client
// embeds one.
type Client struct {
	rpc     basepb.BasePluginClient
	doneCtx context.Context
}

var _ BasePlugin = (*Client)(nil)

// NewClient returns a client on conn. doneCtx is done when the plugin
// process exits (go-plugin passes it to GRPCClient); errors then match
// ErrPluginExited.
func NewClient(conn grpc.ClientConnInterface, doneCtx context.Context) *Client {
	return &Client{rpc: basepb.NewBasePluginClient(conn), doneCtx: doneCtx}
}

// Err converts an error from a call on this plugin into an SDK error.
func (c *Client) Err(ctx context.Context, err error) error {
	return ErrorFromStatus(ctx, c.doneCtx, err)
}

// Info implements BasePlugin.
func (c *Client) Info(ctx context.Context) (*Info, error) {
	resp, err := c.rpc.Info(ctx, &basepb.InfoRequest{})
	if err != nil {
		return nil, fmt.Errorf("info: %w", c.Err(ctx, err))
	}
	return infoFromProto(resp), nil
}

// ConfigSchema implements BasePlugin.
func (c *Client) ConfigSchema(ctx context.Context) (*ConfigSchema, error) {
	resp, err := c.rpc.ConfigSchema(ctx, &basepb.ConfigSchemaRequest{})
	if err != nil {
		return nil, fmt.Errorf("config schema: %w", c.Err(ctx, err))
	}
	return schemaFromProto(resp)
}

// Configure implements BasePlugin. cfg.APIVersion must be the version the
// host negotiated (NegotiateAPIVersion); the plugin validates the values
// against its schema again and reports a bad field as a *ConfigError.
func (c *Client) Configure(ctx context.Context, cfg *Config) error {
	body, err := cfg.MarshalJSON()
	if err != nil {
		return fmt.Errorf("configure: %w", err)
	}
	return c.ConfigureJSON(ctx, cfg.APIVersion, cfg.Instance, body)
}

// ConfigureJSON sends a configuration as a JSON object, unvalidated; the
// plugin validates it against its schema and reports a bad field as a
// *ConfigError.
func (c *Client) ConfigureJSON(ctx context.Context, apiVersion, instance string, configJSON []byte) error {
	_, err := c.rpc.Configure(ctx, &basepb.ConfigureRequest{
		ApiVersion: apiVersion,
		Instance:   instance,
		ConfigJson: configJSON,
	})
	if err != nil {
		return fmt.Errorf("configure: %w", c.Err(ctx, err))
	}
	return nil
}

// ConnWrapper returns the connection a host-side client calls its plugin
// on, given go-plugin's gRPC connection and the context that is done when
// the plugin exits. sdk.ClientConfig uses it to put unary calls on a lean
// call path; streams stay on the gRPC connection.
type ConnWrapper func(c *grpc.ClientConn, doneCtx context.Context) grpc.ClientConnInterface

// Apply returns w(c, doneCtx), or c itself when w is nil.
func (w ConnWrapper) Apply(c *grpc.ClientConn, doneCtx context.Context) grpc.ClientConnInterface {
	if w == nil {
		return c
	}
	return w(c, doneCtx)
}
