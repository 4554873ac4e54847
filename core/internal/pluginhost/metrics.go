package pluginhost

import (
	"context"
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/sdk/base"
)

// metrics are the host's Prometheus metrics, labelled by instance.
type metrics struct {
	calls    *prometheus.CounterVec
	errors   *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	restarts *prometheus.CounterVec
	state    *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gpuaas_plugin_calls_total",
			Help: "Driver calls made through the plugin host, by instance and method (a retried call counts once).",
		}, []string{"instance", "method"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gpuaas_plugin_call_errors_total",
			Help: "Driver calls that failed, by instance, method and SDK error code (not_found, unavailable, plugin_exited, ...).",
		}, []string{"instance", "method", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "gpuaas_plugin_call_duration_seconds",
			Help:    "Duration of driver calls through the plugin host, including a restart and retry.",
			Buckets: prometheus.ExponentialBuckets(50e-6, 2, 18), // 50 µs .. 6.5 s
		}, []string{"instance", "method"}),
		restarts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gpuaas_plugin_restarts_total",
			Help: "Restarts of plugin processes after a crash, by instance.",
		}, []string{"instance"}),
		state: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "gpuaas_plugin_instance_state",
			Help: "1 for the state an instance is in, 0 for the others.",
		}, []string{"instance", "state"}),
	}
	if reg != nil {
		reg.MustRegister(m.calls, m.errors, m.latency, m.restarts, m.state)
	}
	return m
}

func (m *metrics) setState(instance string, s State) {
	for _, st := range States() {
		v := 0.0
		if st == s {
			v = 1
		}
		m.state.WithLabelValues(instance, string(st)).Set(v)
	}
}

// callMetrics are one method's metrics for one instance, resolved once.
type callMetrics struct {
	instance, method string
	calls            prometheus.Counter
	latency          prometheus.Observer
	errors           *prometheus.CounterVec
}

func (p *proc) callMetrics(method string) *callMetrics {
	if cm, ok := p.calls.Load(method); ok {
		return cm.(*callMetrics)
	}
	m := p.h.m
	cm := &callMetrics{
		instance: p.name, method: method,
		calls:   m.calls.WithLabelValues(p.name, method),
		latency: m.latency.WithLabelValues(p.name, method),
		errors:  m.errors,
	}
	actual, _ := p.calls.LoadOrStore(method, cm)
	return actual.(*callMetrics)
}

func (cm *callMetrics) observe(d time.Duration, err error) {
	cm.calls.Inc()
	cm.latency.Observe(d.Seconds())
	if err != nil {
		cm.errors.WithLabelValues(cm.instance, cm.method, errorCode(err)).Inc()
	}
}

// errorCode names an error by the SDK sentinel it matches, or by the host's
// error code.
func errorCode(err error) string {
	switch {
	case errors.Is(err, base.ErrPluginExited):
		return "plugin_exited"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, base.ErrDeadlineExceeded):
		return "deadline_exceeded"
	}
	for _, s := range []struct {
		err  error
		code string
	}{
		{base.ErrNotFound, "not_found"},
		{base.ErrInvalidArgument, "invalid_argument"},
		{base.ErrConflict, "conflict"},
		{base.ErrFailedPrecondition, "failed_precondition"},
		{base.ErrUnavailable, "unavailable"},
		{base.ErrUnauthenticated, "unauthenticated"},
		{base.ErrPermissionDenied, "permission_denied"},
		{base.ErrResourceExhausted, "resource_exhausted"},
		{base.ErrUnimplemented, "unimplemented"},
		{base.ErrInternal, "internal"},
	} {
		if errors.Is(err, s.err) {
			return s.code
		}
	}
	if e := errcode.As(err); e != nil {
		return string(e.Code)
	}
	return "unknown"
}
