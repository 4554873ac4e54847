// Package natssrv runs an embedded NATS server with JetStream stored on disk.
package natssrv

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/logger"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/gpuaas/gpuaas/devstack/loopback"
)

// Config describes one server.
type Config struct {
	Port     int
	StoreDir string // JetStream store; kept across restarts
	LogFile  string
}

// Server is an embedded NATS server that can be shut down and started again on the same port
// with the same JetStream store, so streams and their messages survive.
type Server struct {
	cfg Config

	mu  sync.Mutex
	srv *server.Server
	log *logger.Logger
}

// New returns a stopped server.
func New(cfg Config) (*Server, error) {
	if cfg.Port == 0 || cfg.StoreDir == "" || cfg.LogFile == "" {
		return nil, errors.New("natssrv: Port, StoreDir and LogFile are required")
	}
	return &Server{cfg: cfg}, nil
}

// URL is the client URL (NATS_URL).
func (s *Server) URL() string { return "nats://" + s.Addr() }

// Addr is host:port.
func (s *Server) Addr() string { return loopback.Addr(s.cfg.Port) }

// Start starts the server and returns once a client sees JetStream.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		return nil
	}
	srv, err := server.NewServer(&server.Options{
		ServerName: "gpuaas-devstack",
		Host:       loopback.Host,
		Port:       s.cfg.Port,
		JetStream:  true,
		StoreDir:   s.cfg.StoreDir,
		NoSigs:     true,
		// No HTTP monitoring, no cluster: one loopback port only.
	})
	if err != nil {
		return fmt.Errorf("configure nats: %w", err)
	}
	l := logger.NewFileLogger(s.cfg.LogFile, true, false, false, true)
	srv.SetLogger(l, false, false)
	srv.Start()
	s.srv, s.log = srv, l
	if !srv.ReadyForConnections(10 * time.Second) {
		s.stopLocked(ctx)
		return errors.New("nats not accepting connections after 10s")
	}
	if err := loopback.Poll(ctx, 20*time.Millisecond, nil, s.CheckHealth); err != nil {
		s.stopLocked(ctx)
		return fmt.Errorf("nats not healthy: %w", err)
	}
	return nil
}

// Stop shuts the server down and returns once its port is closed.
func (s *Server) Stop(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopLocked(ctx)
}

func (s *Server) stopLocked(ctx context.Context) error {
	if s.srv == nil {
		return nil
	}
	s.srv.Shutdown()
	s.srv.WaitForShutdown()
	s.srv = nil
	_ = s.log.Close()
	return loopback.WaitClosed(ctx, s.Addr())
}

// CheckHealth connects as a client and reads the JetStream account info.
func (s *Server) CheckHealth(ctx context.Context) error {
	nc, err := nats.Connect(s.URL(), nats.Timeout(time.Second), nats.NoReconnect())
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	_, err = js.AccountInfo(ctx)
	return err
}
