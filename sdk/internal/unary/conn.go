// Package unary makes gRPC unary calls to a local plugin on the calling
// goroutine.
//
// grpc-go hands every call between three goroutines: the caller, the
// transport's writer and its reader. Each handoff readies a goroutine, and
// when the host has an idle P the scheduler wakes another thread to run it.
// Between two processes on a small machine those wake-ups, not gRPC's CPU
// time, are most of a call's latency: the same call took ~180–220 µs at p50
// with the host at GOMAXPROCS=2 and ~110–150 µs at GOMAXPROCS=1.
//
// A Conn writes the request and reads the response itself, on its own
// HTTP/2 connection to the plugin's socket (TLS with the same go-plugin
// AutoMTLS configuration). Concurrent calls take separate connections from
// a small pool. Streams, and calls with call options this package does not
// know or with outgoing metadata, go through the grpc.ClientConn as before. The wire is plain gRPC
// over HTTP/2: the plugin's server is grpc-go's and sees an ordinary client.
package unary

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Conn is a grpc.ClientConnInterface. Invoke makes unary calls on pooled
// HTTP/2 connections of its own; NewStream uses the grpc.ClientConn.
type Conn struct {
	cc        *grpc.ClientConn
	tlsConfig func() *tls.Config
	now       func() time.Time

	mu     sync.Mutex
	addr   net.Addr // learnt from the first call made through cc
	idle   []*h2conn
	closed bool
}

var _ grpc.ClientConnInterface = (*Conn)(nil)

const (
	// maxIdle is how many idle connections the pool keeps; a burst of more
	// concurrent calls dials more and closes the surplus afterwards.
	maxIdle = 4
	// maxIdleAge is how long an idle connection is trusted. grpc-go's
	// server pings a connection idle for two hours and closes it when the
	// ping goes unanswered; a connection is never kept anywhere near that.
	maxIdleAge = time.Minute
)

// New returns a Conn over cc. tlsConfig returns the client TLS
// configuration of the plugin connection (go-plugin fills it in at start);
// nil means plaintext. The Conn closes its connections when done is done.
func New(cc *grpc.ClientConn, tlsConfig func() *tls.Config, done context.Context) *Conn {
	c := &Conn{cc: cc, tlsConfig: tlsConfig, now: time.Now}
	context.AfterFunc(done, c.Close)
	return c
}

// Invoke implements grpc.ClientConnInterface.
func (c *Conn) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	req, ok1 := args.(proto.Message)
	resp, ok2 := reply.(proto.Message)
	addr := c.address()
	_, withMetadata := metadata.FromOutgoingContext(ctx)
	if !ok1 || !ok2 || addr == nil || withMetadata || !plainOptions(opts) {
		return c.invokeGRPC(ctx, method, args, reply, opts)
	}
	msg, err := encodeMessage(req)
	if err != nil {
		return status.Errorf(codes.Internal, "grpc: error while marshaling: %v", err)
	}
	for attempt := 0; ; attempt++ {
		h, err := c.get(ctx, addr)
		if err != nil {
			return err
		}
		body, err := h.call(ctx, method, msg)
		var unsent *notProcessedError
		if errors.As(err, &unsent) && h.reused && attempt == 0 {
			// A pooled connection the server had already let go of: the
			// call never reached a handler, so it is sent once more on a
			// fresh connection.
			h.close()
			continue
		}
		c.put(h)
		if err != nil {
			return err
		}
		if err := proto.Unmarshal(body, resp); err != nil {
			return status.Errorf(codes.Internal, "grpc: failed to unmarshal the received message: %v", err)
		}
		return nil
	}
}

// NewStream implements grpc.ClientConnInterface.
func (c *Conn) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	return c.cc.NewStream(ctx, desc, method, opts...)
}

// invokeGRPC makes the call through grpc-go, and learns the plugin's
// address from it.
func (c *Conn) invokeGRPC(ctx context.Context, method string, args, reply any, opts []grpc.CallOption) error {
	var p peer.Peer
	err := c.cc.Invoke(ctx, method, args, reply, append(opts[:len(opts):len(opts)], grpc.Peer(&p))...)
	if p.Addr != nil && c.address() == nil {
		if _, local := p.Addr.(*net.UnixAddr); local || isLoopback(p.Addr) {
			c.mu.Lock()
			c.addr = p.Addr
			c.mu.Unlock()
		}
	}
	return err
}

func isLoopback(a net.Addr) bool {
	t, ok := a.(*net.TCPAddr)
	return ok && t.IP.IsLoopback()
}

// plainOptions reports whether opts only hold options that do not change
// how a call is made.
func plainOptions(opts []grpc.CallOption) bool {
	for _, o := range opts {
		switch o.(type) {
		case grpc.StaticMethodCallOption, grpc.EmptyCallOption:
		default:
			return false
		}
	}
	return true
}

func (c *Conn) address() net.Addr {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.addr
}

// get takes the most recently used idle connection, or dials one.
func (c *Conn) get(ctx context.Context, addr net.Addr) (*h2conn, error) {
	now := c.now()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, status.Error(codes.Unavailable, "plugin connection closed")
	}
	var stale []*h2conn
	var h *h2conn
	for len(c.idle) > 0 {
		last := c.idle[len(c.idle)-1]
		c.idle = c.idle[:len(c.idle)-1]
		if now.Sub(last.idleSince) < maxIdleAge {
			h = last
			break
		}
		stale = append(stale, last)
	}
	c.mu.Unlock()
	for _, s := range stale {
		s.close()
	}
	if h != nil {
		h.reused = true
		return h, nil
	}
	var tlsConfig *tls.Config
	if c.tlsConfig != nil {
		tlsConfig = c.tlsConfig()
	}
	h, err := dial(ctx, addr, tlsConfig)
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, status.FromContextError(ctxErr).Err()
		}
		return nil, status.Errorf(codes.Unavailable, "connection error: %v", err)
	}
	return h, nil
}

// put returns h to the pool if it can carry another call.
func (c *Conn) put(h *h2conn) {
	if !h.reusable() {
		h.close()
		return
	}
	h.idleSince = c.now()
	c.mu.Lock()
	if !c.closed && len(c.idle) < maxIdle {
		c.idle = append(c.idle, h)
		h = nil
	}
	c.mu.Unlock()
	if h != nil {
		h.close()
	}
}

// Close closes the idle connections; calls made later fail. Calls in
// flight finish on their connections, which are then closed.
func (c *Conn) Close() {
	c.mu.Lock()
	idle := c.idle
	c.idle, c.closed = nil, true
	c.mu.Unlock()
	for _, h := range idle {
		h.close()
	}
}

// notProcessedError is a call the server refused before any handler saw
// it (GOAWAY below its stream id, or REFUSED_STREAM).
type notProcessedError struct{ err error }

func (e *notProcessedError) Error() string { return e.err.Error() }
func (e *notProcessedError) Unwrap() error { return e.err }

// GRPCStatus lets status.FromError see the wrapped status.
func (e *notProcessedError) GRPCStatus() *status.Status {
	st, _ := status.FromError(e.err)
	return st
}

func unavailable(format string, args ...any) error {
	return status.Error(codes.Unavailable, fmt.Sprintf(format, args...))
}
