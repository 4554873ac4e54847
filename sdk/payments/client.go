package payments

import (
	"context"
	"fmt"

	"google.golang.org/grpc"

	"github.com/gpuaas/gpuaas/sdk/base"
	paymentspb "github.com/gpuaas/gpuaas/sdk/payments/proto"
)

// Client is the host's side of a payments plugin. It implements Driver,
// PortalCreator and Refunder; without a capability its call returns
// base.ErrUnimplemented.
type Client struct {
	*base.Client

	rpc paymentspb.PaymentsClient
}

var (
	_ Driver        = (*Client)(nil)
	_ PortalCreator = (*Client)(nil)
	_ Refunder      = (*Client)(nil)
)

// NewClient returns a client on conn. doneCtx is done when the plugin
// process exits.
func NewClient(conn grpc.ClientConnInterface, doneCtx context.Context) *Client {
	return &Client{Client: base.NewClient(conn, doneCtx), rpc: paymentspb.NewPaymentsClient(conn)}
}

// CreateCheckout implements Driver.
func (c *Client) CreateCheckout(ctx context.Context, req *CheckoutRequest) (*CheckoutSession, error) {
	resp, err := c.rpc.CreateCheckout(ctx, checkoutToProto(req))
	if err != nil {
		return nil, fmt.Errorf("payments: create checkout: %w", c.Err(ctx, err))
	}
	return sessionFromProto(resp), nil
}

// CreatePortal implements PortalCreator.
func (c *Client) CreatePortal(ctx context.Context, req *PortalRequest) (*PortalSession, error) {
	resp, err := c.rpc.CreatePortal(ctx, portalToProto(req))
	if err != nil {
		return nil, fmt.Errorf("payments: create portal: %w", c.Err(ctx, err))
	}
	return portalSessionFromProto(resp), nil
}

// HandleWebhook implements Driver.
func (c *Client) HandleWebhook(ctx context.Context, hook *Webhook) ([]Event, error) {
	resp, err := c.rpc.HandleWebhook(ctx, webhookToProto(hook))
	if err != nil {
		return nil, fmt.Errorf("payments: handle webhook: %w", c.Err(ctx, err))
	}
	return eventsFromProto(resp), nil
}

// Refund implements Refunder.
func (c *Client) Refund(ctx context.Context, req *RefundRequest) (*Refund, error) {
	resp, err := c.rpc.Refund(ctx, refundToProto(req))
	if err != nil {
		return nil, fmt.Errorf("payments: refund %q: %w", req.SessionID, c.Err(ctx, err))
	}
	return refundResultFromProto(resp), nil
}
