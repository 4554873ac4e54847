package sdktest_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/examples/diskstore"
	"github.com/gpuaas/gpuaas/sdk/examples/instantpay"
	"github.com/gpuaas/gpuaas/sdk/examples/instantprov"
	"github.com/gpuaas/gpuaas/sdk/payments"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
	"github.com/gpuaas/gpuaas/sdk/sdktest"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// The kit must fail drivers that break the contract. Each case runs the
// suite against a broken driver in a child test process and expects it to
// fail with a specific complaint.

const brokenEnv = "SDKTEST_BROKEN_DRIVER"

func TestKitRejectsBrokenDrivers(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		want string
	}{
		{"storage-put-not-idempotent", "a retry must not write again"},
		{"storage-keeps-short-body", "Put of 50 bytes declared as 100"},
		{"storage-claims-presign", "PresignGet: storage: presign get"},
		{"provisioner-enroll-not-idempotent", "minted another secret"},
		{"provisioner-discover-ignores-cursor", "the cursor must continue after the previous page"},
		{"provisioner-unenroll-not-idempotent", "Unenroll of a node already unenrolled (it must succeed)"},
		{"payments-webhook-unverified", "one body byte changed"},
		{"payments-refund-not-idempotent", "Refund retried with the same operation id made refund"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			cmd := exec.Command(os.Args[0], "-test.run=^TestBrokenDriverHelper$", "-test.v", "-test.count=1")
			cmd.Env = append(os.Environ(), brokenEnv+"="+c.name)
			out, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("the kit passed a driver that is %s:\n%s", c.name, out)
			}
			if !strings.Contains(string(out), c.want) {
				t.Fatalf("the kit failed %s, but not with %q:\n%s", c.name, c.want, out)
			}
		})
	}
}

// TestBrokenDriverHelper runs one suite against a broken driver when
// TestKitRejectsBrokenDrivers starts it as a child process; run directly it
// has nothing to do.
func TestBrokenDriverHelper(t *testing.T) {
	variant := os.Getenv(brokenEnv)
	switch variant {
	case "":
		return
	case "storage-put-not-idempotent", "storage-keeps-short-body", "storage-claims-presign":
		sdktest.StorageSuite{Config: func(t testing.TB) map[string]any {
			return map[string]any{"root": t.TempDir()}
		}}.Run(t, sdktest.InProcess(func(testing.TB) base.BasePlugin {
			d := diskstore.New(hclog.NewNullLogger())
			switch variant {
			case "storage-put-not-idempotent":
				return &freshOpStorage{Driver: d}
			case "storage-keeps-short-body":
				return &shortBodyStorage{Driver: d}
			}
			return &falsePresigner{Driver: d}
		}))
	case "provisioner-enroll-not-idempotent":
		instantprovSuite().Run(t, sdktest.InProcess(func(testing.TB) base.BasePlugin {
			return &freshOpProvisioner{Driver: instantprov.New(hclog.NewNullLogger())}
		}))
	case "provisioner-discover-ignores-cursor":
		instantprovSuite().Run(t, sdktest.InProcess(func(testing.TB) base.BasePlugin {
			return &cursorlessDiscoverer{Driver: instantprov.New(hclog.NewNullLogger())}
		}))
	case "provisioner-unenroll-not-idempotent":
		instantprovSuite().Run(t, sdktest.InProcess(func(testing.TB) base.BasePlugin {
			return &strictUnenroller{Driver: instantprov.New(hclog.NewNullLogger())}
		}))
	case "payments-webhook-unverified":
		instantpaySuite().Run(t, sdktest.InProcess(func(testing.TB) base.BasePlugin {
			return &resigningPayments{Driver: instantpay.New(hclog.NewNullLogger())}
		}))
	case "payments-refund-not-idempotent":
		instantpaySuite().Run(t, sdktest.InProcess(func(testing.TB) base.BasePlugin {
			return &freshOpRefunds{Driver: instantpay.New(hclog.NewNullLogger())}
		}))
	default:
		t.Fatalf("unknown broken driver %q", variant)
	}
}

// freshOp turns a retry into a new operation.
func freshOp(id string) string { return id + "-fresh-" + rand.Text() }

// freshOpStorage forgets operation ids: every retried Put writes again.
type freshOpStorage struct{ *diskstore.Driver }

var _ storage.Driver = (*freshOpStorage)(nil)

func (f *freshOpStorage) Put(ctx context.Context, req *storage.PutRequest, body io.Reader) (*storage.ObjectInfo, error) {
	r := *req
	r.OperationID = freshOp(r.OperationID)
	time.Sleep(time.Millisecond) // a visible change of ModTime
	return f.Driver.Put(ctx, &r, body)
}

// shortBodyStorage stores whatever arrived, even when the body failed.
type shortBodyStorage struct{ *diskstore.Driver }

var _ storage.Driver = (*shortBodyStorage)(nil)

func (s *shortBodyStorage) Put(ctx context.Context, req *storage.PutRequest, body io.Reader) (*storage.ObjectInfo, error) {
	data, _ := io.ReadAll(body)
	r := *req
	r.Size = int64(len(data))
	return s.Driver.Put(ctx, &r, bytes.NewReader(data))
}

// falsePresigner claims the presign capability and does not deliver.
type falsePresigner struct{ *diskstore.Driver }

var (
	_ storage.Driver    = (*falsePresigner)(nil)
	_ storage.Presigner = (*falsePresigner)(nil)
)

func (*falsePresigner) PresignGet(context.Context, *storage.PresignRequest) (*storage.PresignedURL, error) {
	return nil, fmt.Errorf("not really: %w", base.ErrUnimplemented)
}

func (*falsePresigner) PresignPut(context.Context, *storage.PresignRequest) (*storage.PresignedURL, error) {
	return nil, fmt.Errorf("not really: %w", base.ErrUnimplemented)
}

// freshOpProvisioner forgets enrollment operation ids.
type freshOpProvisioner struct{ *instantprov.Driver }

var _ provisioner.Driver = (*freshOpProvisioner)(nil)

func (f *freshOpProvisioner) Enroll(ctx context.Context, req *provisioner.EnrollRequest) (*provisioner.Enrollment, error) {
	r := *req
	r.OperationID = freshOp(r.OperationID)
	return f.Driver.Enroll(ctx, &r)
}

// cursorlessDiscoverer starts every discovery page from the beginning.
type cursorlessDiscoverer struct{ *instantprov.Driver }

var (
	_ provisioner.Driver     = (*cursorlessDiscoverer)(nil)
	_ provisioner.Discoverer = (*cursorlessDiscoverer)(nil)
)

func (c *cursorlessDiscoverer) Discover(ctx context.Context, req *provisioner.DiscoverRequest) (*provisioner.DiscoverPage, error) {
	r := *req
	r.Cursor = ""
	page, err := c.Driver.Discover(ctx, &r)
	if err == nil && page.NextCursor != "" {
		page.NextCursor += "-" + rand.Text() // a fresh cursor, so only the repeat shows
	}
	return page, err
}

// strictUnenroller answers a retry of its operation, but refuses to
// unenroll again a node it already unenrolled.
type strictUnenroller struct {
	*instantprov.Driver

	mu   sync.Mutex
	done map[string]string // node id -> the operation that unenrolled it
}

var (
	_ provisioner.Driver     = (*strictUnenroller)(nil)
	_ provisioner.Unenroller = (*strictUnenroller)(nil)
)

func (s *strictUnenroller) Unenroll(ctx context.Context, req *provisioner.UnenrollRequest) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done == nil {
		s.done = map[string]string{}
	}
	if op, ok := s.done[req.NodeID]; ok && op != req.OperationID {
		return fmt.Errorf("node %q is not enrolled: %w", req.NodeID, base.ErrNotFound)
	}
	s.done[req.NodeID] = req.OperationID
	return s.Driver.Unenroll(ctx, req)
}

// resigningPayments accepts any body: it signs what it received itself.
type resigningPayments struct{ *instantpay.Driver }

var _ payments.Driver = (*resigningPayments)(nil)

func (r *resigningPayments) HandleWebhook(ctx context.Context, hook *payments.Webhook) ([]payments.Event, error) {
	h := hook.Header.Clone()
	h.Set(instantpay.SignatureHeader, instantpay.Sign([]byte(webhookSecret), time.Now(), hook.Body))
	return r.Driver.HandleWebhook(ctx, &payments.Webhook{Body: hook.Body, Header: h})
}

// freshOpRefunds forgets refund operation ids.
type freshOpRefunds struct{ *instantpay.Driver }

var (
	_ payments.Driver   = (*freshOpRefunds)(nil)
	_ payments.Refunder = (*freshOpRefunds)(nil)
)

func (f *freshOpRefunds) Refund(ctx context.Context, req *payments.RefundRequest) (*payments.Refund, error) {
	r := *req
	r.OperationID = freshOp(r.OperationID)
	return f.Driver.Refund(ctx, &r)
}
