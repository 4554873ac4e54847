package provisioner

import (
	"context"
	"errors"
	"fmt"

	"github.com/gpuaas/gpuaas/sdk/base"
	provisionerpb "github.com/gpuaas/gpuaas/sdk/provisioner/proto"
)

// Server serves a Driver over gRPC. It checks the arguments the contract
// promises the driver before the driver sees them.
type Server struct {
	provisionerpb.UnimplementedProvisionerServer

	impl Driver
}

var _ provisionerpb.ProvisionerServer = (*Server)(nil)

// NewServer wraps impl.
func NewServer(impl Driver) *Server { return &Server{impl: impl} }

func required(what, v string) error {
	if v == "" {
		return fmt.Errorf("%s: empty: %w", what, base.ErrInvalidArgument)
	}
	return nil
}

func nothing(call string) error {
	return base.StatusFromError(fmt.Errorf("provisioner: %s: driver returned nothing: %w", call, base.ErrInternal))
}

// Capabilities implements provisionerpb.ProvisionerServer.
func (s *Server) Capabilities(ctx context.Context, _ *provisionerpb.CapabilitiesRequest) (*provisionerpb.CapabilitiesResponse, error) {
	c, err := s.impl.Capabilities(ctx)
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if c == nil {
		return nil, nothing("capabilities")
	}
	return capabilitiesToProto(c), nil
}

// Enroll implements provisionerpb.ProvisionerServer.
func (s *Server) Enroll(ctx context.Context, req *provisionerpb.EnrollRequest) (*provisionerpb.EnrollResponse, error) {
	r := enrollFromProto(req)
	if err := errors.Join(required("operation id", r.OperationID), required("node id", r.NodeID)); err != nil {
		return nil, base.StatusFromError(fmt.Errorf("provisioner: enroll: %w", err))
	}
	e, err := s.impl.Enroll(ctx, r)
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if e == nil {
		return nil, nothing("enroll")
	}
	return enrollmentToProto(e), nil
}

// Provision implements provisionerpb.ProvisionerServer.
func (s *Server) Provision(ctx context.Context, req *provisionerpb.ProvisionRequest) (*provisionerpb.Operation, error) {
	r := provisionFromProto(req)
	if err := errors.Join(required("operation id", r.OperationID), required("node id", r.NodeID),
		required("username", r.User.Username)); err != nil {
		return nil, base.StatusFromError(fmt.Errorf("provisioner: provision: %w", err))
	}
	op, err := s.impl.Provision(ctx, r)
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if op == nil {
		return nil, nothing("provision")
	}
	return operationToProto(op), nil
}

// Release implements provisionerpb.ProvisionerServer.
func (s *Server) Release(ctx context.Context, req *provisionerpb.ReleaseRequest) (*provisionerpb.Operation, error) {
	r := releaseFromProto(req)
	err := errors.Join(required("operation id", r.OperationID), required("node id", r.NodeID))
	if r.Mode == "" {
		err = errors.Join(err, fmt.Errorf("release mode: unknown: %w", base.ErrInvalidArgument))
	}
	if err != nil {
		return nil, base.StatusFromError(fmt.Errorf("provisioner: release: %w", err))
	}
	op, err := s.impl.Release(ctx, r)
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if op == nil {
		return nil, nothing("release")
	}
	return operationToProto(op), nil
}

// Status implements provisionerpb.ProvisionerServer.
func (s *Server) Status(ctx context.Context, req *provisionerpb.StatusRequest) (*provisionerpb.Operation, error) {
	if err := required("operation id", req.GetOperationId()); err != nil {
		return nil, base.StatusFromError(fmt.Errorf("provisioner: status: %w", err))
	}
	op, err := s.impl.Status(ctx, req.GetOperationId())
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if op == nil {
		return nil, nothing("status")
	}
	return operationToProto(op), nil
}

// Probe implements provisionerpb.ProvisionerServer.
func (s *Server) Probe(ctx context.Context, req *provisionerpb.ProbeRequest) (*provisionerpb.ProbeResponse, error) {
	h, err := s.impl.Probe(ctx, req.GetNodeId())
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if h == nil {
		return nil, nothing("probe")
	}
	return healthToProto(h), nil
}

// HandleWebhook implements provisionerpb.ProvisionerServer.
func (s *Server) HandleWebhook(ctx context.Context, req *provisionerpb.WebhookRequest) (*provisionerpb.WebhookResponse, error) {
	h, ok := s.impl.(WebhookHandler)
	if !ok {
		return nil, base.StatusFromError(fmt.Errorf("provisioner: handle webhook: driver takes no webhooks: %w", base.ErrUnimplemented))
	}
	events, err := h.HandleWebhook(ctx, webhookFromProto(req))
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	return eventsToProto(events), nil
}

// Discover implements provisionerpb.ProvisionerServer.
func (s *Server) Discover(ctx context.Context, req *provisionerpb.DiscoverRequest) (*provisionerpb.DiscoverResponse, error) {
	d, ok := s.impl.(Discoverer)
	if !ok {
		return nil, base.StatusFromError(fmt.Errorf("provisioner: discover: driver cannot list its nodes: %w", base.ErrUnimplemented))
	}
	r := discoverFromProto(req)
	if r.Limit < 0 {
		return nil, base.StatusFromError(fmt.Errorf("provisioner: discover: limit %d: %w", r.Limit, base.ErrInvalidArgument))
	}
	page, err := d.Discover(ctx, r)
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if page == nil {
		return nil, nothing("discover")
	}
	return discoverPageToProto(page), nil
}

// Unenroll implements provisionerpb.ProvisionerServer.
func (s *Server) Unenroll(ctx context.Context, req *provisionerpb.UnenrollRequest) (*provisionerpb.UnenrollResponse, error) {
	u, ok := s.impl.(Unenroller)
	if !ok {
		return nil, base.StatusFromError(fmt.Errorf("provisioner: unenroll: driver has nothing to undo: %w", base.ErrUnimplemented))
	}
	r := unenrollFromProto(req)
	if err := errors.Join(required("operation id", r.OperationID), required("node id", r.NodeID)); err != nil {
		return nil, base.StatusFromError(fmt.Errorf("provisioner: unenroll: %w", err))
	}
	if err := u.Unenroll(ctx, r); err != nil {
		return nil, base.StatusFromError(err)
	}
	return &provisionerpb.UnenrollResponse{}, nil
}
