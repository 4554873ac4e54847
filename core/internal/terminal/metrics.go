package terminal

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	active   prometheus.Gauge
	opened   prometheus.Counter
	refused  *prometheus.CounterVec
	closed   *prometheus.CounterVec
	bytesIn  prometheus.Counter // client to node
	bytesOut prometheus.Counter // node to client
}

// newMetrics makes the metrics and registers them with reg (nil: none).
func newMetrics(reg prometheus.Registerer) *metrics {
	bytes := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "gpuaas_terminal_bytes_total",
		Help: "Terminal bytes relayed: in is client to node, out is node to client."}, []string{"direction"})
	m := &metrics{
		active: prometheus.NewGauge(prometheus.GaugeOpts{Name: "gpuaas_terminal_sessions_active",
			Help: "Terminal sessions open in this process."}),
		opened: prometheus.NewCounter(prometheus.CounterOpts{Name: "gpuaas_terminal_sessions_opened_total",
			Help: "Terminal sessions opened (WebSocket upgraded, node logged in)."}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "gpuaas_terminal_sessions_refused_total",
			Help: "Terminal session requests refused before the upgrade, by reason."}, []string{"reason"}),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "gpuaas_terminal_sessions_closed_total",
			Help: "Terminal sessions closed, by reason."}, []string{"reason"}),
		bytesIn:  bytes.WithLabelValues("in"),
		bytesOut: bytes.WithLabelValues("out"),
	}
	if reg != nil {
		reg.MustRegister(m.active, m.opened, m.refused, m.closed, bytes)
	}
	return m
}
