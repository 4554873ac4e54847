package storage

import (
	"context"
	"io"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
)

// Metrics are the storage metrics of one core.
type Metrics struct {
	bytesIn  prometheus.Counter
	bytesOut prometheus.Counter
	ops      *prometheus.CounterVec
	aborts   *prometheus.CounterVec
}

// newMetrics makes the metrics and, with a registerer, registers them with
// a collector of what projects store (from Postgres, at scrape time).
func newMetrics(reg prometheus.Registerer, pool *pgxpool.Pool) *Metrics {
	m := &Metrics{
		bytesIn: prometheus.NewCounter(prometheus.CounterOpts{Name: "gpuaas_storage_bytes_in_total",
			Help: "Bytes of uploads streamed through the core to the storage driver."}),
		bytesOut: prometheus.NewCounter(prometheus.CounterOpts{Name: "gpuaas_storage_bytes_out_total",
			Help: "Bytes of downloads streamed from the storage driver through the core."}),
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "gpuaas_storage_operations_total",
			Help: "Storage operations by kind (upload, download, mkdir, rename, delete, presign, complete) and result (ok, or the error code)."},
			[]string{"operation", "result"}),
		aborts: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "gpuaas_storage_uploads_aborted_total",
			Help: "Uploads that did not complete, by reason (quota, client, cancelled, backend, expired, unconfirmed); their partial data was removed."},
			[]string{"reason"}),
	}
	if reg != nil {
		reg.MustRegister(m.bytesIn, m.bytesOut, m.ops, m.aborts, &usageCollector{pool: pool})
	}
	return m
}

func (m *Metrics) operation(op string, err error) {
	result := "ok"
	if err != nil {
		result = string(errcode.Of(err))
	}
	m.ops.WithLabelValues(op, result).Inc()
}

func (m *Metrics) aborted(reason string) { m.aborts.WithLabelValues(reason).Inc() }

// usageCollector reports what projects store, summed, when scraped.
type usageCollector struct{ pool *pgxpool.Pool }

var (
	storedBytesDesc   = prometheus.NewDesc("gpuaas_storage_stored_bytes", "Bytes of project storage objects.", nil, nil)
	storedObjectsDesc = prometheus.NewDesc("gpuaas_storage_objects", "Project storage objects (files and folder markers).", nil, nil)
	reservedDesc      = prometheus.NewDesc("gpuaas_storage_reserved_bytes", "Quota reserved by uploads in flight.", nil, nil)
)

func (c *usageCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- storedBytesDesc
	ch <- storedObjectsDesc
	ch <- reservedDesc
}

func (c *usageCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var bytes, objects, reserved float64
	err := c.pool.QueryRow(ctx, `SELECT coalesce(sum(bytes_used), 0), coalesce(sum(objects), 0), coalesce(sum(bytes_reserved), 0) FROM storage_usage`).
		Scan(&bytes, &objects, &reserved)
	if err != nil {
		for _, d := range []*prometheus.Desc{storedBytesDesc, storedObjectsDesc, reservedDesc} {
			ch <- prometheus.NewInvalidMetric(d, err)
		}
		return
	}
	ch <- prometheus.MustNewConstMetric(storedBytesDesc, prometheus.GaugeValue, bytes)
	ch <- prometheus.MustNewConstMetric(storedObjectsDesc, prometheus.GaugeValue, objects)
	ch <- prometheus.MustNewConstMetric(reservedDesc, prometheus.GaugeValue, reserved)
}

// counted counts the bytes read through a download's body; it writes
// itself (the driver's chunks go out without another copy) when the body
// can.
func counted(rc io.ReadCloser, c prometheus.Counter) io.ReadCloser {
	b := &countedBody{rc: rc, count: c}
	if _, ok := rc.(io.WriterTo); ok {
		return &countedWriterTo{b}
	}
	return b
}

type countedBody struct {
	rc    io.ReadCloser
	count prometheus.Counter
}

var (
	_ io.ReadCloser = (*countedBody)(nil)
	_ io.WriterTo   = (*countedWriterTo)(nil)
)

func (b *countedBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	b.count.Add(float64(n))
	return n, err
}

func (b *countedBody) Close() error { return b.rc.Close() }

type countedWriterTo struct{ *countedBody }

func (b *countedWriterTo) WriteTo(w io.Writer) (int64, error) {
	n, err := b.rc.(io.WriterTo).WriteTo(w)
	b.count.Add(float64(n))
	return n, err
}
