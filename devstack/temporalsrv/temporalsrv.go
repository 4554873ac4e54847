// Package temporalsrv runs a Temporal server inside the current process, persisted in a
// SQLite file, the way the Temporal CLI's dev server does.
package temporalsrv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"go.temporal.io/api/workflowservice/v1"
	sdkclient "go.temporal.io/sdk/client"
	sdklog "go.temporal.io/sdk/log"
	"go.temporal.io/server/common/authorization"
	"go.temporal.io/server/common/cluster"
	"go.temporal.io/server/common/config"
	"go.temporal.io/server/common/dynamicconfig"
	"go.temporal.io/server/common/log"
	"go.temporal.io/server/common/membership/static"
	sqliteplugin "go.temporal.io/server/common/persistence/sql/sqlplugin/sqlite"
	"go.temporal.io/server/common/primitives"
	sqliteschema "go.temporal.io/server/schema/sqlite"
	"go.temporal.io/server/temporal"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/gpuaas/gpuaas/devstack/loopback"
)

const clusterName = "active"

// Ports are the loopback ports of the four Temporal services. Only Frontend is for clients.
type Ports struct {
	Frontend, FrontendHTTP, History, Matching, Worker int
}

// Config describes one embedded Temporal server.
type Config struct {
	// DBFile is the SQLite file. Its schema is created when the file does not exist.
	DBFile string
	// LogFile receives the server's logs at LogLevel ("warn" unless set).
	LogFile  string
	LogLevel string
	// Namespaces are registered before the server starts (idempotent).
	Namespaces []string
	Ports      Ports
}

// Server is an embedded Temporal server that can be stopped and started again on the same
// ports with the same data.
type Server struct {
	cfg Config

	mu  sync.Mutex
	srv temporal.Server
	log *logSink
}

// logSink writes to the log file until closed and then drops writes: goroutines of a stopped
// server may still log for a moment.
type logSink struct {
	mu sync.Mutex
	f  *os.File
}

func (l *logSink) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return len(p), nil
	}
	return l.f.Write(p)
}

func (l *logSink) Sync() error { return nil }

func (l *logSink) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	f := l.f
	l.f = nil
	if f == nil {
		return nil
	}
	return f.Close()
}

// New returns a stopped server.
func New(cfg Config) (*Server, error) {
	if cfg.DBFile == "" || cfg.LogFile == "" || len(cfg.Namespaces) == 0 || cfg.Ports.Frontend == 0 {
		return nil, errors.New("temporalsrv: DBFile, LogFile, Namespaces and Ports are required")
	}
	if cfg.LogLevel == "" {
		cfg.LogLevel = "warn"
	}
	return &Server{cfg: cfg}, nil
}

// Addr is the frontend's gRPC address (TEMPORAL_ADDRESS).
func (s *Server) Addr() string { return loopback.Addr(s.cfg.Ports.Frontend) }

// Start prepares the database, starts the server and returns once every namespace can be
// described through the frontend.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		return nil
	}
	f, err := os.OpenFile(s.cfg.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open temporal log: %w", err)
	}
	sink := &logSink{f: f}
	logger := log.NewZapLogger(zap.New(
		zapcore.NewCore(zapcore.NewConsoleEncoder(log.DefaultZapEncoderConfig), sink, log.ParseZapLevel(s.cfg.LogLevel)),
		zap.ErrorOutput(sink),
	))

	srv, err := s.build(logger)
	if err == nil {
		err = srv.Start()
	}
	if err != nil {
		_ = sink.Close()
		return fmt.Errorf("start temporal: %w", err)
	}
	s.srv, s.log = srv, sink
	if err := s.waitHealthy(ctx); err != nil {
		s.stopLocked(ctx)
		return err
	}
	return nil
}

// Stop stops the server and returns once its frontend port is closed.
func (s *Server) Stop(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopLocked(ctx)
}

func (s *Server) stopLocked(ctx context.Context) error {
	if s.srv == nil {
		return nil
	}
	err := s.srv.Stop()
	s.srv = nil
	_ = s.log.Close()
	if werr := loopback.WaitClosed(ctx, s.Addr()); werr != nil {
		err = errors.Join(err, werr)
	}
	if err != nil {
		return fmt.Errorf("stop temporal: %w", err)
	}
	return nil
}

// CheckHealth describes every configured namespace through the frontend.
func (s *Server) CheckHealth(ctx context.Context) error {
	c, err := sdkclient.DialContext(ctx, sdkclient.Options{
		HostPort:  s.Addr(),
		Namespace: s.cfg.Namespaces[0],
		Logger:    sdklog.NewStructuredLogger(slog.New(slog.NewTextHandler(io.Discard, nil))),
	})
	if err != nil {
		return fmt.Errorf("dial temporal frontend: %w", err)
	}
	defer c.Close()
	for _, ns := range s.cfg.Namespaces {
		if _, err := c.WorkflowService().DescribeNamespace(ctx, &workflowservice.DescribeNamespaceRequest{Namespace: ns}); err != nil {
			return fmt.Errorf("describe namespace %q: %w", ns, err)
		}
	}
	return nil
}

func (s *Server) waitHealthy(ctx context.Context) error {
	if err := loopback.Poll(ctx, 50*time.Millisecond, nil, s.CheckHealth); err != nil {
		return fmt.Errorf("temporal not healthy: %w", err)
	}
	return nil
}

func (s *Server) build(logger log.Logger) (temporal.Server, error) {
	sqlConf := &config.SQL{
		PluginName:   sqliteplugin.PluginName,
		DatabaseName: s.cfg.DBFile,
		ConnectAttributes: map[string]string{
			"mode":         "rwc",
			"journal_mode": "wal",
			"synchronous":  "NORMAL",
		},
	}
	if _, err := os.Stat(s.cfg.DBFile); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(filepath.Dir(s.cfg.DBFile), 0o755); err != nil {
			return nil, err
		}
		if err := sqliteschema.SetupSchema(sqlConf); err != nil {
			return nil, fmt.Errorf("create sqlite schema: %w", err)
		}
	}
	var nsConfs []*sqliteschema.NamespaceConfig
	for _, ns := range s.cfg.Namespaces {
		nc, err := sqliteschema.NewNamespaceConfig(clusterName, ns, false, nil)
		if err != nil {
			return nil, err
		}
		nsConfs = append(nsConfs, nc)
	}
	if err := sqliteschema.CreateNamespaces(sqlConf, nsConfs...); err != nil {
		return nil, fmt.Errorf("register namespaces: %w", err)
	}

	conf := s.serverConfig(sqlConf)
	authorizer, err := authorization.GetAuthorizerFromConfig(&conf.Global.Authorization)
	if err != nil {
		return nil, err
	}
	claimMapper, err := authorization.GetClaimMapperFromConfig(&conf.Global.Authorization, logger)
	if err != nil {
		return nil, err
	}
	p := s.cfg.Ports
	dyn := dynamicconfig.StaticClient{
		dynamicconfig.HistoryCacheHostLevelMaxSize.Key():                 8096,
		dynamicconfig.FrontendMaxNamespaceVisibilityRPSPerInstance.Key(): 100,
	}
	// Static membership: every service is one known host, so no gossip ports and no join wait.
	return temporal.NewServer(
		temporal.WithConfig(conf),
		temporal.ForServices(temporal.DefaultServices),
		temporal.WithStaticHosts(map[primitives.ServiceName]static.Hosts{
			primitives.FrontendService: static.SingleLocalHost(loopback.Addr(p.Frontend)),
			primitives.HistoryService:  static.SingleLocalHost(loopback.Addr(p.History)),
			primitives.MatchingService: static.SingleLocalHost(loopback.Addr(p.Matching)),
			primitives.WorkerService:   static.SingleLocalHost(loopback.Addr(p.Worker)),
		}),
		temporal.WithLogger(logger),
		temporal.WithAuthorizer(authorizer),
		temporal.WithClaimMapper(func(*config.Config) authorization.ClaimMapper { return claimMapper }),
		temporal.WithDynamicConfigClient(dyn),
	)
}

func (s *Server) serverConfig(sqlConf *config.SQL) *config.Config {
	p := s.cfg.Ports
	svc := func(grpcPort, httpPort int) config.Service {
		return config.Service{RPC: config.RPC{GRPCPort: grpcPort, HTTPPort: httpPort, BindOnIP: loopback.Host}}
	}
	var conf config.Config
	conf.Global.Membership.MaxJoinDuration = 30 * time.Second
	conf.Global.Membership.BroadcastAddress = loopback.Host
	conf.Persistence.DefaultStore = "sqlite"
	conf.Persistence.VisibilityStore = "sqlite"
	conf.Persistence.NumHistoryShards = 1
	conf.Persistence.DataStores = map[string]config.DataStore{"sqlite": {SQL: sqlConf}}
	conf.ClusterMetadata = &cluster.Config{
		FailoverVersionIncrement: 10,
		MasterClusterName:        clusterName,
		CurrentClusterName:       clusterName,
		ClusterInformation: map[string]cluster.ClusterInformation{
			clusterName: {
				Enabled:                true,
				InitialFailoverVersion: 1,
				RPCAddress:             loopback.Addr(p.Frontend),
				HTTPAddress:            loopback.Addr(p.FrontendHTTP),
			},
		},
	}
	conf.DCRedirectionPolicy.Policy = "noop"
	conf.Services = map[string]config.Service{
		"frontend": svc(p.Frontend, p.FrontendHTTP),
		"history":  svc(p.History, 0),
		"matching": svc(p.Matching, 0),
		"worker":   svc(p.Worker, 0),
	}
	conf.Archival.History.State = "disabled"
	conf.Archival.Visibility.State = "disabled"
	conf.NamespaceDefaults.Archival.History.State = "disabled"
	conf.NamespaceDefaults.Archival.Visibility.State = "disabled"
	conf.PublicClient.HostPort = loopback.Addr(p.Frontend)
	return &conf
}
