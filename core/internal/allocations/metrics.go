package allocations

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the provisioning metrics of one core.
type Metrics struct {
	toActive *prometheus.HistogramVec
	released *prometheus.CounterVec
}

// NewMetrics registers the provisioning metrics, and a collector that counts
// allocations and nodes by state (from Postgres, at scrape time) on reg.
func NewMetrics(reg prometheus.Registerer, pool *pgxpool.Pool) *Metrics {
	m := &Metrics{
		toActive: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "gpuaas_provisioning_seconds",
			Help:    "Time from an allocation's creation to active (outcome=active) or failed (outcome=failed).",
			Buckets: []float64{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600},
		}, []string{"sku", "outcome"}),
		released: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gpuaas_releases_total",
			Help: "Release attempts that ended, by outcome (released, release_failed).",
		}, []string{"sku", "outcome"}),
	}
	reg.MustRegister(m.toActive, m.released, &stateCollector{pool: pool})
	return m
}

func (m *Metrics) provisioned(a *Allocation, outcome State) {
	if m != nil {
		m.toActive.WithLabelValues(a.SKU, string(outcome)).Observe(time.Since(a.CreatedAt).Seconds())
	}
}

func (m *Metrics) releaseEnded(a *Allocation) {
	if m != nil {
		m.released.WithLabelValues(a.SKU, string(a.State)).Inc()
	}
}

// stateCollector counts allocations and nodes by state when scraped.
type stateCollector struct{ pool *pgxpool.Pool }

var (
	allocationsDesc = prometheus.NewDesc("gpuaas_allocations", "Allocations by state and SKU (terminal states excluded).", []string{"state", "sku"}, nil)
	nodesDesc       = prometheus.NewDesc("gpuaas_nodes", "Nodes by state and SKU.", []string{"state", "sku"}, nil)
)

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- allocationsDesc
	ch <- nodesDesc
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, q := range []struct {
		desc *prometheus.Desc
		sql  string
	}{
		{allocationsDesc, `SELECT state, sku_id, count(*) FROM allocations WHERE state NOT IN ('released', 'failed') GROUP BY 1, 2`},
		{nodesDesc, `SELECT state, coalesce(sku_id, ''), count(*) FROM nodes GROUP BY 1, 2`},
	} {
		rows, err := c.pool.Query(ctx, q.sql)
		if err != nil {
			ch <- prometheus.NewInvalidMetric(q.desc, err)
			continue
		}
		for rows.Next() {
			var state, sku string
			var n int64
			if err := rows.Scan(&state, &sku, &n); err != nil {
				ch <- prometheus.NewInvalidMetric(q.desc, err)
				break
			}
			ch <- prometheus.MustNewConstMetric(q.desc, prometheus.GaugeValue, float64(n), state, sku)
		}
		rows.Close()
	}
}
