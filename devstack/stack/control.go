package stack

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/gpuaas/gpuaas/devstack/loopback"
)

// The control API lets tests inject faults into a running stack:
//
//	GET  /v1/components               {"components":[{"name","state","address"}...]}
//	GET  /v1/components/{name}        {"name","state","address"}
//	POST /v1/components/{name}/stop   returns once the component is down (port closed)
//	POST /v1/components/{name}/start  returns once it is healthy again, same port and data
//
// Errors are {"error": "..."} with 404 for an unknown component and 500 otherwise.
func (s *Stack) controlHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/components", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"components": s.Components()})
	})
	mux.HandleFunc("GET /v1/components/{name}", func(w http.ResponseWriter, r *http.Request) {
		m, ok := s.member(r.PathValue("name"))
		if !ok {
			writeError(w, ErrUnknownComponent)
			return
		}
		writeJSON(w, http.StatusOK, m.status())
	})
	change := func(op func(context.Context, string) error) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			name := r.PathValue("name")
			if err := op(r.Context(), name); err != nil {
				writeError(w, err)
				return
			}
			m, _ := s.member(name)
			writeJSON(w, http.StatusOK, m.status())
		}
	}
	mux.HandleFunc("POST /v1/components/{name}/stop", change(s.StopComponent))
	mux.HandleFunc("POST /v1/components/{name}/start", change(s.StartComponent))
	return mux
}

func (s *Stack) serveControl() error {
	l, err := net.Listen("tcp", loopback.Addr(0))
	if err != nil {
		return err
	}
	s.controlAddr = l.Addr().String()
	srv := &http.Server{Handler: s.controlHandler(), ReadHeaderTimeout: 10 * time.Second}
	s.control = srv
	go func() {
		// srv, not s.control: a Stop racing this start may already have
		// cleared the field.
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("control API stopped", "error", err)
		}
	}()
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	status := http.StatusInternalServerError
	if errors.Is(err, ErrUnknownComponent) {
		status = http.StatusNotFound
	}
	writeJSON(w, status, map[string]string{"error": err.Error()})
}
