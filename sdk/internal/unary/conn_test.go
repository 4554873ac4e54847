package unary

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math"
	"math/big"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// The tests run a real grpc-go server with mutual TLS on a Unix socket, as
// go-plugin's AutoMTLS sets it up, and check the Conn against grpc-go's own
// client on the same calls.

// echoService's Echo answers by the request's first byte: see handle.
type echoService struct {
	calls     atomic.Int64
	deadlines atomic.Int64 // calls whose context had a deadline
	started   chan struct{}
	cancelled chan struct{}
}

func (e *echoService) handle(ctx context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
	e.calls.Add(1)
	if _, ok := ctx.Deadline(); ok {
		e.deadlines.Add(1)
	}
	v := in.GetValue()
	switch {
	case len(v) == 0:
		return &wrapperspb.BytesValue{}, nil
	case v[0] == 'E': // an error whose message needs percent-encoding
		return nil, status.Errorf(codes.FailedPrecondition, "node %q is not ready: 100%% busy, état ✗", v[1:])
	case v[0] == 'D': // an error with details
		st, err := status.New(codes.InvalidArgument, "bad field").WithDetails(wrapperspb.String("region"))
		if err != nil {
			return nil, err
		}
		return nil, st.Err()
	case v[0] == 'B': // block until the caller goes away
		e.started <- struct{}{}
		<-ctx.Done()
		e.cancelled <- struct{}{}
		return nil, ctx.Err()
	case v[0] == 'G': // a large answer: n MiB of a pattern
		return &wrapperspb.BytesValue{Value: bytes.Repeat([]byte("0123456789abcdef"), int(v[1])<<16)}, nil
	}
	return &wrapperspb.BytesValue{Value: v}, nil
}

var echoDesc = grpc.ServiceDesc{
	ServiceName: "unarytest.Echo",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Echo",
		Handler: func(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			in := &wrapperspb.BytesValue{}
			if err := dec(in); err != nil {
				return nil, err
			}
			return srv.(*echoService).handle(ctx, in)
		},
	}},
}

const echoMethod = "/unarytest.Echo/Echo"

type fixture struct {
	svc      *echoService
	server   *grpc.Server
	accepted atomic.Int64 // connections the server accepted
	viaGRPC  atomic.Int64 // calls that went through grpc-go's client
	cc       *grpc.ClientConn
	conn     *Conn
	done     context.CancelFunc
}

type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

func newFixture(t *testing.T, serverOpts ...grpc.ServerOption) *fixture {
	t.Helper()
	serverTLS, clientTLS := mutualTLS(t)
	lis, err := net.Listen("unix", filepath.Join(t.TempDir(), "plugin.sock"))
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{svc: &echoService{started: make(chan struct{}, 1), cancelled: make(chan struct{}, 1)}}
	f.server = grpc.NewServer(append([]grpc.ServerOption{grpc.Creds(credentials.NewTLS(serverTLS))}, serverOpts...)...)
	f.server.RegisterService(&echoDesc, f.svc)
	go func() { _ = f.server.Serve(countingListener{lis, &f.accepted}) }()
	t.Cleanup(f.server.Stop)

	addr := lis.Addr().String()
	f.cc, err = grpc.NewClient("passthrough:///localhost",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", addr)
		}),
		grpc.WithTransportCredentials(credentials.NewTLS(clientTLS)),
		// go-plugin's message limits.
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32), grpc.MaxCallSendMsgSize(math.MaxInt32)),
		grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			f.viaGRPC.Add(1)
			return invoker(ctx, method, req, reply, cc, opts...)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.cc.Close() })
	done, cancel := context.WithCancel(context.Background())
	f.done = cancel
	f.conn = New(f.cc, func() *tls.Config { return clientTLS }, done)
	t.Cleanup(cancel)
	return f
}

// mutualTLS returns server and client configurations that trust each
// other's self-signed certificate only, as go-plugin's AutoMTLS does.
func mutualTLS(t *testing.T) (server, client *tls.Config) {
	t.Helper()
	serverCert, serverPool := selfSigned(t)
	clientCert, clientPool := selfSigned(t)
	server = &tls.Config{Certificates: []tls.Certificate{serverCert}, ClientCAs: clientPool,
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12}
	client = &tls.Config{Certificates: []tls.Certificate{clientCert}, RootCAs: serverPool,
		ServerName: "localhost", MinVersion: tls.VersionTLS12}
	return server, client
}

func selfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IsCA:         true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}

func (f *fixture) echo(ctx context.Context, cc grpc.ClientConnInterface, in []byte, opts ...grpc.CallOption) ([]byte, error) {
	out := &wrapperspb.BytesValue{}
	err := cc.Invoke(ctx, echoMethod, wrapperspb.Bytes(in), out, opts...)
	return out.GetValue(), err
}

// warm makes the first call, which goes through grpc-go and teaches the
// Conn the plugin's address, and a second that leaves a pooled connection.
func (f *fixture) warm(t *testing.T) {
	t.Helper()
	if _, err := f.echo(context.Background(), f.conn, []byte("warm")); err != nil {
		t.Fatal(err)
	}
	if f.conn.address() == nil {
		t.Fatal("the first call did not teach the Conn the server's address")
	}
	f.echoOK(t, context.Background(), false, []byte("warm"))
}

// echoOK makes a call on the Conn that must succeed, and checks whether it
// went through grpc-go's client.
func (f *fixture) echoOK(t *testing.T, ctx context.Context, viaGRPC bool, in []byte, opts ...grpc.CallOption) {
	t.Helper()
	before := f.viaGRPC.Load()
	got, err := f.echo(ctx, f.conn, in, opts...)
	if err != nil || !bytes.Equal(got, in) {
		t.Fatalf("asked %q, answered %q, %v", in, got, err)
	}
	if went := f.viaGRPC.Load() != before; went != viaGRPC {
		t.Fatalf("call %q went through grpc-go: %v, want %v", in, went, viaGRPC)
	}
}

func TestInvokeAnswersAsGRPCGo(t *testing.T) {
	f := newFixture(t)
	f.warm(t)
	viaGRPC := f.viaGRPC.Load()
	for _, tc := range []struct {
		name string
		in   []byte
	}{
		{"small", []byte("hello")},
		{"empty", nil},
		{"status with an encoded message", []byte("Egpu-7/ü%")},
		{"status with details", []byte("D")},
		// Larger than a frame and than the server's initial window: the
		// request waits for the server's WINDOW_UPDATEs.
		{"1 MiB request", bytes.Repeat([]byte{'x'}, 1<<20)},
		// Larger than the stream window the client grants: the client
		// must return window while the answer comes in.
		{"20 MiB answer", []byte{'G', 20}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want, wantErr := f.echo(context.Background(), f.cc, tc.in)
			got, gotErr := f.echo(context.Background(), f.conn, tc.in)
			if !bytes.Equal(got, want) {
				t.Errorf("answer: %d bytes, grpc-go's %d bytes (equal prefix: %v)", len(got), len(want), bytes.HasPrefix(want, got[:min(len(got), 16)]))
			}
			ws, gs := status.Convert(wantErr), status.Convert(gotErr)
			if !proto.Equal(gs.Proto(), ws.Proto()) {
				t.Errorf("status %v, grpc-go's %v", gs.Proto(), ws.Proto())
			}
		})
	}
	// Each case above made one call through grpc-go (the reference) and
	// one that must not have.
	if n := f.viaGRPC.Load() - viaGRPC; n != 6 {
		t.Errorf("%d calls went through grpc-go's client, want the 6 reference calls only", n)
	}
}

func TestUnknownMethodIsUnimplemented(t *testing.T) {
	f := newFixture(t)
	f.warm(t)
	err := f.conn.Invoke(context.Background(), "/unarytest.Echo/Nope", wrapperspb.Bytes(nil), &wrapperspb.BytesValue{})
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("got %v, want Unimplemented", err)
	}
	// The connection carries on after a failed call.
	if got, err := f.echo(context.Background(), f.conn, []byte("again")); err != nil || string(got) != "again" {
		t.Fatalf("next call: %q, %v", got, err)
	}
	if n := f.accepted.Load(); n != 2 {
		t.Fatalf("server accepted %d connections, want 2 (grpc-go's and one pooled)", n)
	}
}

func TestDeadlineReachesTheServer(t *testing.T) {
	f := newFixture(t)
	f.warm(t)
	before := f.svc.deadlines.Load()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := f.echo(ctx, f.conn, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if f.svc.deadlines.Load() != before+1 {
		t.Fatal("the handler's context had no deadline: grpc-timeout was not sent")
	}

	ctx, cancel = context.WithTimeout(context.Background(), 150*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := f.echo(ctx, f.conn, []byte("B"))
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("got %v, want DeadlineExceeded", err)
	}
	if waited := time.Since(start); waited > 5*time.Second {
		t.Fatalf("the call returned %v after its deadline", waited)
	}
	<-f.svc.started
	select {
	case <-f.svc.cancelled:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler's context was not cancelled")
	}
	if _, err := f.echo(context.Background(), f.conn, []byte("after")); err != nil {
		t.Fatalf("call after a deadline: %v", err)
	}
}

func TestCancelReachesTheServer(t *testing.T) {
	f := newFixture(t)
	f.warm(t)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := f.echo(ctx, f.conn, []byte("B"))
		errc <- err
	}()
	<-f.svc.started
	cancel()
	select {
	case err := <-errc:
		if status.Code(err) != codes.Canceled {
			t.Fatalf("got %v, want Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a cancelled call did not return")
	}
	select {
	case <-f.svc.cancelled:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler's context was not cancelled")
	}
	// An already cancelled context fails before anything is sent.
	calls := f.svc.calls.Load()
	if _, err := f.echo(ctx, f.conn, []byte("x")); status.Code(err) != codes.Canceled {
		t.Fatalf("got %v, want Canceled", err)
	}
	if f.svc.calls.Load() != calls {
		t.Fatal("a call with a cancelled context reached the server")
	}
}

func TestConcurrentCallsShareAPool(t *testing.T) {
	f := newFixture(t)
	f.warm(t)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 16 {
		wg.Go(func() {
			for i := range 40 {
				in := fmt.Appendf(nil, "g%d-%d", g, i)
				got, err := f.echo(context.Background(), f.conn, in)
				if err == nil && !bytes.Equal(got, in) {
					err = fmt.Errorf("asked %q, answered %q", in, got)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	f.conn.mu.Lock()
	idle := len(f.conn.idle)
	f.conn.mu.Unlock()
	if idle < 1 || idle > maxIdle {
		t.Fatalf("%d idle connections kept, want 1..%d", idle, maxIdle)
	}
}

func TestGoAwayIsFollowed(t *testing.T) {
	// The server ends every connection after 50 ms (GOAWAY, then close);
	// calls spread over half a second cross several of those endings.
	f := newFixture(t, grpc.KeepaliveParams(keepalive.ServerParameters{
		MaxConnectionAge: 50 * time.Millisecond, MaxConnectionAgeGrace: 10 * time.Second,
	}))
	f.warm(t)
	for i := range 25 {
		in := fmt.Appendf(nil, "call-%d", i)
		got, err := f.echo(context.Background(), f.conn, in)
		if err != nil || !bytes.Equal(got, in) {
			t.Fatalf("call %d: %q, %v", i, got, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := f.accepted.Load(); n < 4 {
		t.Fatalf("server accepted %d connections; the ages did not end any", n)
	}
}

func TestIdleConnectionEndedByServer(t *testing.T) {
	// The server ends connections idle for 30 ms: a GOAWAY and a PING, then,
	// once the PING is answered, a second GOAWAY naming the last stream it
	// takes. The pooled connection answers the PING during the next call,
	// whose stream the server then still serves; the connection is not
	// pooled again, so every other call dials.
	f := newFixture(t, grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: 30 * time.Millisecond}))
	f.warm(t)
	for i := range 5 {
		time.Sleep(150 * time.Millisecond)
		in := fmt.Appendf(nil, "call-%d", i)
		got, err := f.echo(context.Background(), f.conn, in)
		if err != nil || !bytes.Equal(got, in) {
			t.Fatalf("call %d: %q, %v", i, got, err)
		}
	}
	if n := f.accepted.Load(); n < 4 {
		t.Fatalf("server accepted %d connections, want at least 4: grpc-go's and three pooled", n)
	}
}

func TestStaleIdleConnectionIsReplaced(t *testing.T) {
	f := newFixture(t)
	f.warm(t)
	if _, err := f.echo(context.Background(), f.conn, []byte("a")); err != nil {
		t.Fatal(err)
	}
	accepted := f.accepted.Load()
	f.conn.now = func() time.Time { return time.Now().Add(2 * maxIdleAge) }
	if _, err := f.echo(context.Background(), f.conn, []byte("b")); err != nil {
		t.Fatal(err)
	}
	if f.accepted.Load() != accepted+1 {
		t.Fatal("a connection idle past maxIdleAge was used again")
	}
}

func TestFallsBackToGRPC(t *testing.T) {
	f := newFixture(t)
	f.warm(t)
	for _, tc := range []struct {
		name string
		ctx  context.Context
		opts []grpc.CallOption
	}{
		{"outgoing metadata", metadata.AppendToOutgoingContext(context.Background(), "k", "v"), nil},
		{"a call option", context.Background(), []grpc.CallOption{grpc.WaitForReady(true)}},
	} {
		t.Run(tc.name, func(t *testing.T) { f.echoOK(t, tc.ctx, true, []byte("x"), tc.opts...) })
	}
	// Static method options, as generated code passes, stay on the path.
	f.echoOK(t, context.Background(), false, []byte("x"), grpc.StaticMethod())
}

func TestServerGoneIsUnavailable(t *testing.T) {
	f := newFixture(t)
	f.warm(t)
	f.server.Stop()
	_, err := f.echo(context.Background(), f.conn, []byte("x"))
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("got %v, want Unavailable", err)
	}
}

func TestClosedWhenThePluginExits(t *testing.T) {
	f := newFixture(t)
	f.warm(t)
	f.done() // go-plugin's doneCtx: the plugin process exited
	deadline := time.Now().Add(5 * time.Second)
	for {
		f.conn.mu.Lock()
		closed := f.conn.closed
		f.conn.mu.Unlock()
		if closed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the Conn did not close when its done context ended")
		}
		time.Sleep(time.Millisecond)
	}
	_, err := f.echo(context.Background(), f.conn, []byte("x"))
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("got %v, want Unavailable", err)
	}
	var st interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &st) {
		t.Fatalf("%T carries no gRPC status", err)
	}
}

func TestEncodeTimeout(t *testing.T) {
	for d, want := range map[time.Duration]string{
		-time.Second:               "0n",
		time.Nanosecond:            "1n",
		99999999 * time.Nanosecond: "99999999n",
		100 * time.Millisecond:     "100000u",
		1500 * time.Microsecond:    "1500000n",
		time.Minute:                "60000000u",
		2 * time.Hour:              "7200000m",
		200 * 24 * time.Hour:       "17280000S",
	} {
		if got := encodeTimeout(d); got != want {
			t.Errorf("encodeTimeout(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestResetStreamStatus(t *testing.T) {
	past, future := time.Now().Add(-time.Second), time.Now().Add(time.Hour)
	for _, tc := range []struct {
		code     http2.ErrCode
		deadline time.Time
		want     codes.Code
		unsent   bool
	}{
		{http2.ErrCodeCancel, time.Time{}, codes.Canceled, false},
		{http2.ErrCodeCancel, future, codes.Canceled, false},
		// A server resets a stream whose deadline has passed.
		{http2.ErrCodeCancel, past, codes.DeadlineExceeded, false},
		{http2.ErrCodeRefusedStream, time.Time{}, codes.Unavailable, true},
		{http2.ErrCodeInternal, past, codes.Internal, false},
	} {
		err := rstError(tc.code, tc.deadline)
		var unsent *notProcessedError
		if status.Code(err) != tc.want || errors.As(err, &unsent) != tc.unsent {
			t.Errorf("RST_STREAM %v, deadline %v: %v (not processed: %v), want %v (not processed: %v)",
				tc.code, tc.deadline, err, errors.As(err, &unsent), tc.want, tc.unsent)
		}
	}
}
