package provisioner

import (
	"context"
	"fmt"

	"google.golang.org/grpc"

	"github.com/gpuaas/gpuaas/sdk/base"
	provisionerpb "github.com/gpuaas/gpuaas/sdk/provisioner/proto"
)

// Client is the host's side of a provisioner plugin. It implements Driver,
// WebhookHandler, Discoverer and Unenroller; without the capability
// HandleWebhook, Discover and Unenroll return base.ErrUnimplemented.
type Client struct {
	*base.Client

	rpc provisionerpb.ProvisionerClient
}

var (
	_ Driver         = (*Client)(nil)
	_ WebhookHandler = (*Client)(nil)
	_ Discoverer     = (*Client)(nil)
	_ Unenroller     = (*Client)(nil)
)

// NewClient returns a client on conn. doneCtx is done when the plugin
// process exits.
func NewClient(conn grpc.ClientConnInterface, doneCtx context.Context) *Client {
	return &Client{Client: base.NewClient(conn, doneCtx), rpc: provisionerpb.NewProvisionerClient(conn)}
}

// Capabilities implements Driver.
func (c *Client) Capabilities(ctx context.Context) (*Capabilities, error) {
	resp, err := c.rpc.Capabilities(ctx, &provisionerpb.CapabilitiesRequest{})
	if err != nil {
		return nil, fmt.Errorf("provisioner: capabilities: %w", c.Err(ctx, err))
	}
	return capabilitiesFromProto(resp), nil
}

// Enroll implements Driver.
func (c *Client) Enroll(ctx context.Context, req *EnrollRequest) (*Enrollment, error) {
	resp, err := c.rpc.Enroll(ctx, enrollToProto(req))
	if err != nil {
		return nil, fmt.Errorf("provisioner: enroll %q: %w", req.NodeID, c.Err(ctx, err))
	}
	return enrollmentFromProto(resp), nil
}

// Provision implements Driver.
func (c *Client) Provision(ctx context.Context, req *ProvisionRequest) (*Operation, error) {
	resp, err := c.rpc.Provision(ctx, provisionToProto(req))
	if err != nil {
		return nil, fmt.Errorf("provisioner: provision %q: %w", req.NodeID, c.Err(ctx, err))
	}
	return operationFromProto(resp), nil
}

// Release implements Driver.
func (c *Client) Release(ctx context.Context, req *ReleaseRequest) (*Operation, error) {
	resp, err := c.rpc.Release(ctx, releaseToProto(req))
	if err != nil {
		return nil, fmt.Errorf("provisioner: release %q: %w", req.NodeID, c.Err(ctx, err))
	}
	return operationFromProto(resp), nil
}

// Status implements Driver.
func (c *Client) Status(ctx context.Context, operationID string) (*Operation, error) {
	resp, err := c.rpc.Status(ctx, &provisionerpb.StatusRequest{OperationId: operationID})
	if err != nil {
		return nil, fmt.Errorf("provisioner: status %q: %w", operationID, c.Err(ctx, err))
	}
	return operationFromProto(resp), nil
}

// Probe implements Driver.
func (c *Client) Probe(ctx context.Context, nodeID string) (*Health, error) {
	resp, err := c.rpc.Probe(ctx, &provisionerpb.ProbeRequest{NodeId: nodeID})
	if err != nil {
		return nil, fmt.Errorf("provisioner: probe %q: %w", nodeID, c.Err(ctx, err))
	}
	return healthFromProto(resp), nil
}

// HandleWebhook implements WebhookHandler.
func (c *Client) HandleWebhook(ctx context.Context, hook *Webhook) ([]NodeEvent, error) {
	resp, err := c.rpc.HandleWebhook(ctx, webhookToProto(hook))
	if err != nil {
		return nil, fmt.Errorf("provisioner: handle webhook: %w", c.Err(ctx, err))
	}
	return eventsFromProto(resp), nil
}

// Discover implements Discoverer.
func (c *Client) Discover(ctx context.Context, req *DiscoverRequest) (*DiscoverPage, error) {
	resp, err := c.rpc.Discover(ctx, discoverToProto(req))
	if err != nil {
		return nil, fmt.Errorf("provisioner: discover: %w", c.Err(ctx, err))
	}
	return discoverPageFromProto(resp), nil
}

// Unenroll implements Unenroller.
func (c *Client) Unenroll(ctx context.Context, req *UnenrollRequest) error {
	if _, err := c.rpc.Unenroll(ctx, unenrollToProto(req)); err != nil {
		return fmt.Errorf("provisioner: unenroll %q: %w", req.NodeID, c.Err(ctx, err))
	}
	return nil
}
