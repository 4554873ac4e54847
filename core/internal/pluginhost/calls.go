package pluginhost

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/payments"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// Provisioner returns the provisioner driver of the named instance,
// starting its plugin if it is not running. Each call on the driver is
// measured and, when the plugin process dies during it, retried once on a
// restarted process with the same arguments. The driver also implements
// provisioner.WebhookHandler, provisioner.Discoverer and
// provisioner.Unenroller, measured and retried the same way (Discover is a
// read; Unenroll is idempotent and retried with the same operation id);
// without the capability they return base.ErrUnimplemented. Configure on it is refused: instances are
// configured with Host.Configure.
func (h *Host) Provisioner(ctx context.Context, instance string) (provisioner.Driver, error) {
	p, err := h.driverProc(ctx, instance, base.KindProvisioner)
	if err != nil {
		return nil, err
	}
	return &provisionerDriver{p: p}, nil
}

// Payments returns the payments driver of the named instance; see
// Provisioner. The driver also implements payments.PortalCreator and
// payments.Refunder.
func (h *Host) Payments(ctx context.Context, instance string) (payments.Driver, error) {
	p, err := h.driverProc(ctx, instance, base.KindPayments)
	if err != nil {
		return nil, err
	}
	return &paymentsDriver{p: p}, nil
}

// Storage returns the storage driver of the named instance; see
// Provisioner. Put is retried only when the plugin died before reading any
// of the body; a Get whose stream breaks midway is not retried (the error
// surfaces from Body.Read). The driver also implements storage.Presigner.
func (h *Host) Storage(ctx context.Context, instance string) (storage.Driver, error) {
	p, err := h.driverProc(ctx, instance, base.KindStorage)
	if err != nil {
		return nil, err
	}
	return &storageDriver{p: p}, nil
}

// driverProc returns the runtime of a started instance of kind.
func (h *Host) driverProc(ctx context.Context, name string, kind base.Kind) (*proc, error) {
	p := h.proc(name)
	if p == nil {
		return nil, errcode.New(CodeUnavailable, "plugin instance %q: the plugin host is shut down", name)
	}
	l, err := p.acquire(ctx)
	if err != nil {
		if errcode.Of(err) == CodeInstanceNotFound {
			h.dropProc(p)
		}
		return nil, err
	}
	if l.kind != kind {
		return nil, errcode.New(CodeKindMismatch, "plugin instance %q is a %s instance, not %s", name, l.kind, kind)
	}
	return p, nil
}

// dropProc forgets an idle runtime (of an instance that does not exist).
func (h *Host) dropProc(p *proc) {
	h.mu.Lock()
	defer h.mu.Unlock()
	p.mu.Lock()
	idle := p.cur == nil && p.starting == nil
	p.mu.Unlock()
	if idle && h.procs[p.name] == p {
		delete(h.procs, p.name)
	}
}

// pluginGone reports whether err means the plugin process died under the
// call (as opposed to an error the driver returned).
func pluginGone(l *live, err error) bool {
	return errors.Is(err, base.ErrPluginExited) || (errors.Is(err, base.ErrUnavailable) && l.client.Exited())
}

// invoke runs fn on the instance's driver, measured. When the plugin
// process died during the call and retryable allows it, the process is
// restarted and fn runs once more with the same arguments.
func invoke[D any, R any](ctx context.Context, p *proc, method string, retryable func() bool,
	fn func(context.Context, D) (R, error)) (R, error) {
	cm := p.callMetrics(method)
	start := time.Now()
	r, l, err := invokeOnce(ctx, p, fn)
	if err != nil && l != nil && pluginGone(l, err) && ctx.Err() == nil && (retryable == nil || retryable()) {
		p.lost(l, fmt.Sprintf("plugin process exited during %s", method))
		p.log.Info("retrying call on a restarted plugin", "method", method)
		r, _, err = invokeOnce(ctx, p, fn)
	}
	cm.observe(time.Since(start), err)
	if err != nil {
		var zero R
		return zero, fmt.Errorf("plugin instance %q: %w", p.name, err)
	}
	return r, nil
}

func invokeOnce[D any, R any](ctx context.Context, p *proc, fn func(context.Context, D) (R, error)) (R, *live, error) {
	var zero R
	l, err := p.acquire(ctx)
	if err != nil {
		return zero, nil, err
	}
	d, ok := l.driver.(D)
	if !ok {
		return zero, l, errcode.New(CodeKindMismatch, "plugin instance %q is a %s instance", p.name, l.kind)
	}
	r, err := fn(ctx, d)
	return r, l, err
}

// errConfigure is what Configure on a host driver returns.
func errConfigure(name string) error {
	return fmt.Errorf("plugin instance %q: configure instances through the plugin host: %w", name, base.ErrFailedPrecondition)
}

type none struct{}

// provisionerDriver is a provisioner instance's driver as the host hands it out.
type provisionerDriver struct{ p *proc }

var (
	_ provisioner.Driver         = (*provisionerDriver)(nil)
	_ provisioner.WebhookHandler = (*provisionerDriver)(nil)
	_ provisioner.Discoverer     = (*provisionerDriver)(nil)
	_ provisioner.Unenroller     = (*provisionerDriver)(nil)
)

func (d *provisionerDriver) Info(ctx context.Context) (*base.Info, error) {
	return invoke(ctx, d.p, "Info", nil, func(ctx context.Context, drv provisioner.Driver) (*base.Info, error) { return drv.Info(ctx) })
}

func (d *provisionerDriver) ConfigSchema(ctx context.Context) (*base.ConfigSchema, error) {
	return invoke(ctx, d.p, "ConfigSchema", nil, func(ctx context.Context, drv provisioner.Driver) (*base.ConfigSchema, error) {
		return drv.ConfigSchema(ctx)
	})
}

func (d *provisionerDriver) Configure(context.Context, *base.Config) error {
	return errConfigure(d.p.name)
}

func (d *provisionerDriver) Capabilities(ctx context.Context) (*provisioner.Capabilities, error) {
	return invoke(ctx, d.p, "Capabilities", nil, func(ctx context.Context, drv provisioner.Driver) (*provisioner.Capabilities, error) {
		return drv.Capabilities(ctx)
	})
}

func (d *provisionerDriver) Enroll(ctx context.Context, req *provisioner.EnrollRequest) (*provisioner.Enrollment, error) {
	return invoke(ctx, d.p, "Enroll", nil, func(ctx context.Context, drv provisioner.Driver) (*provisioner.Enrollment, error) {
		return drv.Enroll(ctx, req)
	})
}

func (d *provisionerDriver) Provision(ctx context.Context, req *provisioner.ProvisionRequest) (*provisioner.Operation, error) {
	return invoke(ctx, d.p, "Provision", nil, func(ctx context.Context, drv provisioner.Driver) (*provisioner.Operation, error) {
		return drv.Provision(ctx, req)
	})
}

func (d *provisionerDriver) Release(ctx context.Context, req *provisioner.ReleaseRequest) (*provisioner.Operation, error) {
	return invoke(ctx, d.p, "Release", nil, func(ctx context.Context, drv provisioner.Driver) (*provisioner.Operation, error) {
		return drv.Release(ctx, req)
	})
}

func (d *provisionerDriver) Status(ctx context.Context, operationID string) (*provisioner.Operation, error) {
	return invoke(ctx, d.p, "Status", nil, func(ctx context.Context, drv provisioner.Driver) (*provisioner.Operation, error) {
		return drv.Status(ctx, operationID)
	})
}

func (d *provisionerDriver) Probe(ctx context.Context, nodeID string) (*provisioner.Health, error) {
	return invoke(ctx, d.p, "Probe", nil, func(ctx context.Context, drv provisioner.Driver) (*provisioner.Health, error) {
		return drv.Probe(ctx, nodeID)
	})
}

func (d *provisionerDriver) HandleWebhook(ctx context.Context, hook *provisioner.Webhook) ([]provisioner.NodeEvent, error) {
	return invoke(ctx, d.p, "HandleWebhook", nil, func(ctx context.Context, drv provisioner.WebhookHandler) ([]provisioner.NodeEvent, error) {
		return drv.HandleWebhook(ctx, hook)
	})
}

func (d *provisionerDriver) Discover(ctx context.Context, req *provisioner.DiscoverRequest) (*provisioner.DiscoverPage, error) {
	return invoke(ctx, d.p, "Discover", nil, func(ctx context.Context, drv provisioner.Discoverer) (*provisioner.DiscoverPage, error) {
		return drv.Discover(ctx, req)
	})
}

func (d *provisionerDriver) Unenroll(ctx context.Context, req *provisioner.UnenrollRequest) error {
	_, err := invoke(ctx, d.p, "Unenroll", nil, func(ctx context.Context, drv provisioner.Unenroller) (none, error) {
		return none{}, drv.Unenroll(ctx, req)
	})
	return err
}

// paymentsDriver is a payments instance's driver as the host hands it out.
type paymentsDriver struct{ p *proc }

var (
	_ payments.Driver        = (*paymentsDriver)(nil)
	_ payments.PortalCreator = (*paymentsDriver)(nil)
	_ payments.Refunder      = (*paymentsDriver)(nil)
)

func (d *paymentsDriver) Info(ctx context.Context) (*base.Info, error) {
	return invoke(ctx, d.p, "Info", nil, func(ctx context.Context, drv payments.Driver) (*base.Info, error) { return drv.Info(ctx) })
}

func (d *paymentsDriver) ConfigSchema(ctx context.Context) (*base.ConfigSchema, error) {
	return invoke(ctx, d.p, "ConfigSchema", nil, func(ctx context.Context, drv payments.Driver) (*base.ConfigSchema, error) {
		return drv.ConfigSchema(ctx)
	})
}

func (d *paymentsDriver) Configure(context.Context, *base.Config) error {
	return errConfigure(d.p.name)
}

func (d *paymentsDriver) CreateCheckout(ctx context.Context, req *payments.CheckoutRequest) (*payments.CheckoutSession, error) {
	return invoke(ctx, d.p, "CreateCheckout", nil, func(ctx context.Context, drv payments.Driver) (*payments.CheckoutSession, error) {
		return drv.CreateCheckout(ctx, req)
	})
}

func (d *paymentsDriver) HandleWebhook(ctx context.Context, hook *payments.Webhook) ([]payments.Event, error) {
	return invoke(ctx, d.p, "HandleWebhook", nil, func(ctx context.Context, drv payments.Driver) ([]payments.Event, error) {
		return drv.HandleWebhook(ctx, hook)
	})
}

func (d *paymentsDriver) CreatePortal(ctx context.Context, req *payments.PortalRequest) (*payments.PortalSession, error) {
	return invoke(ctx, d.p, "CreatePortal", nil, func(ctx context.Context, drv payments.PortalCreator) (*payments.PortalSession, error) {
		return drv.CreatePortal(ctx, req)
	})
}

func (d *paymentsDriver) Refund(ctx context.Context, req *payments.RefundRequest) (*payments.Refund, error) {
	return invoke(ctx, d.p, "Refund", nil, func(ctx context.Context, drv payments.Refunder) (*payments.Refund, error) {
		return drv.Refund(ctx, req)
	})
}

// storageDriver is a storage instance's driver as the host hands it out.
type storageDriver struct{ p *proc }

var (
	_ storage.Driver      = (*storageDriver)(nil)
	_ storage.Presigner   = (*storageDriver)(nil)
	_ storage.RangeGetter = (*storageDriver)(nil)

	_ storage.MultipartUploader = (*storageDriver)(nil)
)

func (d *storageDriver) Info(ctx context.Context) (*base.Info, error) {
	return invoke(ctx, d.p, "Info", nil, func(ctx context.Context, drv storage.Driver) (*base.Info, error) { return drv.Info(ctx) })
}

func (d *storageDriver) ConfigSchema(ctx context.Context) (*base.ConfigSchema, error) {
	return invoke(ctx, d.p, "ConfigSchema", nil, func(ctx context.Context, drv storage.Driver) (*base.ConfigSchema, error) {
		return drv.ConfigSchema(ctx)
	})
}

func (d *storageDriver) Configure(context.Context, *base.Config) error {
	return errConfigure(d.p.name)
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n int64
}

var _ io.Reader = (*countingReader)(nil)

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += int64(n)
	return n, err
}

func (d *storageDriver) Put(ctx context.Context, req *storage.PutRequest, body io.Reader) (*storage.ObjectInfo, error) {
	cr := &countingReader{r: body}
	untouched := func() bool { return cr.n == 0 }
	return invoke(ctx, d.p, "Put", untouched, func(ctx context.Context, drv storage.Driver) (*storage.ObjectInfo, error) {
		return drv.Put(ctx, req, cr)
	})
}

func (d *storageDriver) Get(ctx context.Context, key string) (*storage.Object, error) {
	return invoke(ctx, d.p, "Get", nil, func(ctx context.Context, drv storage.Driver) (*storage.Object, error) {
		return drv.Get(ctx, key)
	})
}

func (d *storageDriver) GetRange(ctx context.Context, key string, r storage.Range) (*storage.Object, error) {
	return invoke(ctx, d.p, "GetRange", nil, func(ctx context.Context, drv storage.RangeGetter) (*storage.Object, error) {
		return drv.GetRange(ctx, key, r)
	})
}

func (d *storageDriver) Stat(ctx context.Context, key string) (*storage.ObjectInfo, error) {
	return invoke(ctx, d.p, "Stat", nil, func(ctx context.Context, drv storage.Driver) (*storage.ObjectInfo, error) {
		return drv.Stat(ctx, key)
	})
}

func (d *storageDriver) Delete(ctx context.Context, req *storage.DeleteRequest) error {
	_, err := invoke(ctx, d.p, "Delete", nil, func(ctx context.Context, drv storage.Driver) (none, error) {
		return none{}, drv.Delete(ctx, req)
	})
	return err
}

func (d *storageDriver) Copy(ctx context.Context, req *storage.CopyRequest) (*storage.ObjectInfo, error) {
	return invoke(ctx, d.p, "Copy", nil, func(ctx context.Context, drv storage.Driver) (*storage.ObjectInfo, error) {
		return drv.Copy(ctx, req)
	})
}

func (d *storageDriver) List(ctx context.Context, req *storage.ListRequest) (*storage.ListPage, error) {
	return invoke(ctx, d.p, "List", nil, func(ctx context.Context, drv storage.Driver) (*storage.ListPage, error) {
		return drv.List(ctx, req)
	})
}

func (d *storageDriver) PresignGet(ctx context.Context, req *storage.PresignRequest) (*storage.PresignedURL, error) {
	return invoke(ctx, d.p, "PresignGet", nil, func(ctx context.Context, drv storage.Presigner) (*storage.PresignedURL, error) {
		return drv.PresignGet(ctx, req)
	})
}

func (d *storageDriver) PresignPut(ctx context.Context, req *storage.PresignRequest) (*storage.PresignedURL, error) {
	return invoke(ctx, d.p, "PresignPut", nil, func(ctx context.Context, drv storage.Presigner) (*storage.PresignedURL, error) {
		return drv.PresignPut(ctx, req)
	})
}

func (d *storageDriver) StartMultipart(ctx context.Context, req *storage.StartMultipartRequest) (string, error) {
	return invoke(ctx, d.p, "StartMultipart", nil, func(ctx context.Context, drv storage.MultipartUploader) (string, error) {
		return drv.StartMultipart(ctx, req)
	})
}

func (d *storageDriver) PresignPart(ctx context.Context, req *storage.PresignPartRequest) (*storage.PresignedURL, error) {
	return invoke(ctx, d.p, "PresignPart", nil, func(ctx context.Context, drv storage.MultipartUploader) (*storage.PresignedURL, error) {
		return drv.PresignPart(ctx, req)
	})
}

func (d *storageDriver) CompleteMultipart(ctx context.Context, req *storage.CompleteMultipartRequest) (*storage.ObjectInfo, error) {
	return invoke(ctx, d.p, "CompleteMultipart", nil, func(ctx context.Context, drv storage.MultipartUploader) (*storage.ObjectInfo, error) {
		return drv.CompleteMultipart(ctx, req)
	})
}

func (d *storageDriver) AbortMultipart(ctx context.Context, req *storage.AbortMultipartRequest) error {
	_, err := invoke(ctx, d.p, "AbortMultipart", nil, func(ctx context.Context, drv storage.MultipartUploader) (none, error) {
		return none{}, drv.AbortMultipart(ctx, req)
	})
	return err
}
