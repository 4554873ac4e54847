package base_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	plugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/gpuaas/gpuaas/sdk/base"
	basepb "github.com/gpuaas/gpuaas/sdk/base/proto"
)

// fakeBase is a BasePlugin whose Info fails with a chosen error.
type fakeBase struct {
	mu      sync.Mutex
	infoErr error
	got     *base.Config
}

var _ base.BasePlugin = (*fakeBase)(nil)

func (f *fakeBase) Info(context.Context) (*base.Info, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.infoErr != nil {
		return nil, f.infoErr
	}
	return &base.Info{Name: "fake", Kind: base.KindStorage, DriverVersion: "1.0.0", APIVersions: []string{"1.0", "1.1"}}, nil
}

func (f *fakeBase) ConfigSchema(context.Context) (*base.ConfigSchema, error) {
	return testSchema(), nil
}

func (f *fakeBase) Configure(_ context.Context, cfg *base.Config) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.got = cfg
	if cfg.String("region") == "mars" {
		return &base.ConfigError{Field: "region", Reason: "no such region"}
	}
	return nil
}

func (f *fakeBase) fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.infoErr = err
}

type setup struct {
	fake     *fakeBase
	client   *base.Client
	conn     *grpc.ClientConn
	server   *grpc.Server
	exit     context.CancelFunc
	exitCtx  context.Context
	rawOnCtx func(ctx context.Context, method string) error
}

// newSetup serves a fakeBase over real gRPC on a local socket.
func newSetup(t *testing.T) *setup {
	t.Helper()
	fake := &fakeBase{}
	conn, server := plugin.TestGRPCConn(t, func(s *grpc.Server) {
		basepb.RegisterBasePluginServer(s, base.NewServer(fake, []string{base.CapabilityPresign}))
	})
	t.Cleanup(func() {
		_ = conn.Close()
		server.Stop()
	})
	exitCtx, exit := context.WithCancel(context.Background())
	t.Cleanup(exit)
	s := &setup{fake: fake, client: base.NewClient(conn, exitCtx), conn: conn, server: server, exit: exit, exitCtx: exitCtx}
	s.rawOnCtx = func(ctx context.Context, method string) error {
		err := conn.Invoke(ctx, method, &basepb.InfoRequest{}, &basepb.InfoResponse{})
		return base.ErrorFromStatus(ctx, exitCtx, err)
	}
	return s
}

func TestSentinelsRoundTrip(t *testing.T) {
	t.Parallel()
	s := newSetup(t)
	for _, sentinel := range base.Sentinels() {
		t.Run(sentinel.Error(), func(t *testing.T) {
			msg := fmt.Sprintf("maas: machine abc: %v", sentinel)
			s.fake.fail(fmt.Errorf("maas: machine abc: %w", sentinel))
			_, err := s.client.Info(context.Background())
			if !errors.Is(err, sentinel) {
				t.Fatalf("got %v, want %q", err, sentinel)
			}
			if !strings.HasSuffix(err.Error(), msg) {
				t.Errorf("message %q does not end with the driver's %q", err.Error(), msg)
			}
			for _, other := range base.Sentinels() {
				if other != sentinel && errors.Is(err, other) {
					t.Errorf("%v also matches %q", err, other)
				}
			}
		})
	}
	t.Run("unclassified", func(t *testing.T) {
		s.fake.fail(errors.New("disk on fire"))
		_, err := s.client.Info(context.Background())
		if err == nil || !strings.HasSuffix(err.Error(), "disk on fire") {
			t.Fatalf("got %v", err)
		}
		for _, other := range base.Sentinels() {
			if errors.Is(err, other) {
				t.Errorf("%v matches %q", err, other)
			}
		}
	})
}

func TestConfigureOverTheWire(t *testing.T) {
	t.Parallel()
	s := newSetup(t)
	ctx := context.Background()

	info, err := s.client.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !info.HasCapability(base.CapabilityPresign) || info.Name != "fake" {
		t.Errorf("Info = %+v", info)
	}
	schema, err := s.client.ConfigSchema(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(schema.Fields) != len(testSchema().Fields) || schema.Field("retries").Default != float64(3) || !schema.Field("dsn").Secret() {
		t.Errorf("schema did not survive the wire: %+v", schema)
	}
	version, err := base.NegotiateAPIVersion([]string{"1.0", "1.1"}, info.APIVersions)
	if err != nil || version != "1.1" {
		t.Fatalf("negotiated %q, %v", version, err)
	}

	for _, c := range []struct {
		name    string
		version string
		json    string
		field   string
		target  error
	}{
		{"missing required field", version, `{"token":"t"}`, "url", base.ErrInvalidArgument},
		{"wrong type", version, `{"url":"https://x.example","token":"t","retries":"many"}`, "retries", base.ErrInvalidArgument},
		{"rejected by the driver", version, `{"url":"https://x.example","token":"t","region":"mars"}`, "region", base.ErrInvalidArgument},
		{"api version not offered", "9.0", `{"url":"https://x.example","token":"t"}`, "", base.ErrInvalidArgument},
		{"valid", version, `{"url":"https://x.example","token":"t"}`, "", nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := s.client.ConfigureJSON(ctx, c.version, "region-a", []byte(c.json))
			if c.target == nil {
				if err != nil {
					t.Fatal(err)
				}
				s.fake.mu.Lock()
				got := s.fake.got
				s.fake.mu.Unlock()
				if got.APIVersion != version || got.Instance != "region-a" || got.Int("retries") != 3 {
					t.Errorf("the driver got %+v", got.Redacted())
				}
				return
			}
			if !errors.Is(err, c.target) {
				t.Fatalf("got %v, want %v", err, c.target)
			}
			var cfgErr *base.ConfigError
			if c.field != "" && (!errors.As(err, &cfgErr) || cfgErr.Field != c.field) {
				t.Fatalf("got %v, want a *ConfigError for %q", err, c.field)
			}
		})
	}
}

func TestTransportErrors(t *testing.T) {
	t.Parallel()
	t.Run("unknown method is unimplemented", func(t *testing.T) {
		t.Parallel()
		s := newSetup(t)
		err := s.rawOnCtx(context.Background(), "/gpuaas.sdk.base.v1.BasePlugin/NoSuchCall")
		if !errors.Is(err, base.ErrUnimplemented) {
			t.Fatalf("got %v, want ErrUnimplemented", err)
		}
	})
	t.Run("cancelled before the call", func(t *testing.T) {
		t.Parallel()
		s := newSetup(t)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := s.client.Info(ctx)
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want context.Canceled", err)
		}
	})
	t.Run("expired before the call", func(t *testing.T) {
		t.Parallel()
		s := newSetup(t)
		ctx, cancel := context.WithTimeout(context.Background(), -time.Second)
		defer cancel()
		_, err := s.client.Info(ctx)
		if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, base.ErrDeadlineExceeded) {
			t.Fatalf("got %v, want context.DeadlineExceeded and ErrDeadlineExceeded", err)
		}
	})
	t.Run("plugin gone", func(t *testing.T) {
		t.Parallel()
		s := newSetup(t)
		s.server.Stop()
		s.exit()
		_, err := s.client.Info(context.Background())
		if !errors.Is(err, base.ErrPluginExited) || !errors.Is(err, base.ErrUnavailable) {
			t.Fatalf("got %v, want ErrPluginExited and ErrUnavailable", err)
		}
	})
	t.Run("connection down, plugin alive", func(t *testing.T) {
		t.Parallel()
		s := newSetup(t)
		s.server.Stop()
		_, err := s.client.Info(context.Background())
		if !errors.Is(err, base.ErrUnavailable) || errors.Is(err, base.ErrPluginExited) {
			t.Fatalf("got %v, want ErrUnavailable only", err)
		}
	})
}

// lateCtx has passed its deadline but not yet said so (a context ends from
// a goroutine of its own, which a busy machine may run late).
type lateCtx struct {
	context.Context
	deadline time.Time
}

func (c lateCtx) Deadline() (time.Time, bool) { return c.deadline, true }
func (c lateCtx) Done() <-chan struct{}       { return nil }
func (c lateCtx) Err() error                  { return nil }

// A call reset by the plugin when its copy of the deadline passed is the
// caller's deadline, even while the caller's context has not ended yet.
func TestResetAtTheDeadlineIsTheDeadline(t *testing.T) {
	reset := status.Error(codes.Canceled, "stream terminated by RST_STREAM with error code: CANCEL")
	ctx := lateCtx{Context: context.Background(), deadline: time.Now().Add(5 * time.Millisecond)}
	err := base.ErrorFromStatus(ctx, context.Background(), reset)
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, base.ErrDeadlineExceeded) {
		t.Fatalf("got %v, want context.DeadlineExceeded", err)
	}
	// Without a deadline near, a reset is a cancel.
	far := lateCtx{Context: context.Background(), deadline: time.Now().Add(time.Hour)}
	if err := base.ErrorFromStatus(far, context.Background(), reset); errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
}
