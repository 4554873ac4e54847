package base

import (
	"context"
	"fmt"
	"slices"

	basepb "github.com/gpuaas/gpuaas/sdk/base/proto"
)

// Server serves a BasePlugin over gRPC. Every driver kind's go-plugin
// wrapper registers one next to its own service.
type Server struct {
	basepb.UnimplementedBasePluginServer

	impl         BasePlugin
	capabilities []string
}

var _ basepb.BasePluginServer = (*Server)(nil)

// NewServer wraps impl. capabilities are reported in Info; the kind's
// wrapper derives them from the optional interfaces impl satisfies.
func NewServer(impl BasePlugin, capabilities []string) *Server {
	return &Server{impl: impl, capabilities: append([]string(nil), capabilities...)}
}

// Info implements basepb.BasePluginServer.
func (s *Server) Info(ctx context.Context, _ *basepb.InfoRequest) (*basepb.InfoResponse, error) {
	info, err := s.impl.Info(ctx)
	if err != nil {
		return nil, StatusFromError(err)
	}
	if info == nil {
		return nil, StatusFromError(fmt.Errorf("info: driver returned nothing: %w", ErrInternal))
	}
	out := *info
	out.Capabilities = append([]string(nil), s.capabilities...)
	return infoToProto(&out), nil
}

// ConfigSchema implements basepb.BasePluginServer.
func (s *Server) ConfigSchema(ctx context.Context, _ *basepb.ConfigSchemaRequest) (*basepb.ConfigSchemaResponse, error) {
	schema, err := s.schema(ctx)
	if err != nil {
		return nil, StatusFromError(err)
	}
	out, err := schemaToProto(schema)
	if err != nil {
		return nil, StatusFromError(fmt.Errorf("%w: %w", err, ErrInternal))
	}
	return out, nil
}

func (s *Server) schema(ctx context.Context) (*ConfigSchema, error) {
	schema, err := s.impl.ConfigSchema(ctx)
	if err != nil {
		return nil, fmt.Errorf("config schema: %w", err)
	}
	if schema == nil {
		return nil, fmt.Errorf("config schema: driver returned nothing: %w", ErrInternal)
	}
	return schema, nil
}

// Configure implements basepb.BasePluginServer: it validates the
// configuration against the driver's schema before the driver sees it, and
// refuses an API version the driver did not offer.
func (s *Server) Configure(ctx context.Context, req *basepb.ConfigureRequest) (*basepb.ConfigureResponse, error) {
	info, err := s.impl.Info(ctx)
	if err != nil {
		return nil, StatusFromError(fmt.Errorf("configure: info: %w", err))
	}
	if !slices.Contains(info.APIVersions, req.GetApiVersion()) {
		return nil, StatusFromError(fmt.Errorf("configure: api version %q is not one of the driver's %v: %w",
			req.GetApiVersion(), info.APIVersions, ErrInvalidArgument))
	}
	schema, err := s.schema(ctx)
	if err != nil {
		return nil, StatusFromError(err)
	}
	cfg, err := ValidateConfigJSON(schema, req.GetConfigJson())
	if err != nil {
		return nil, StatusFromError(err)
	}
	cfg.APIVersion = req.GetApiVersion()
	cfg.Instance = req.GetInstance()
	if err := s.impl.Configure(ctx, cfg); err != nil {
		return nil, StatusFromError(err)
	}
	return &basepb.ConfigureResponse{}, nil
}
