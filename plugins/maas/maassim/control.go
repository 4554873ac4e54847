package maassim

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"
)

// ErrNoMachine is returned by controls for an unknown system id.
var ErrNoMachine = errors.New("maassim: no such machine")

// MachineState is a machine as the controls report it.
type MachineState struct {
	SystemID     string            `json:"system_id"`
	Hostname     string            `json:"hostname"`
	Status       Status            `json:"status"`
	StatusName   string            `json:"status_name"`
	Message      string            `json:"status_message"`
	Error        string            `json:"error_description,omitempty"`
	Owner        string            `json:"owner,omitempty"`
	Annotations  map[string]string `json:"workload_annotations,omitempty"`
	Phase        string            `json:"phase,omitempty"`
	Failure      Failure           `json:"failure"`
	Deploys      int               `json:"deploys"`
	Pool         string            `json:"pool"`
	Commissioned bool              `json:"commissioned"`
}

func (s *Server) stateLocked(m *machine) MachineState {
	st := MachineState{
		SystemID: m.id(), Hostname: m.spec.Hostname, Status: m.status, StatusName: m.status.String(),
		Message: m.message, Error: m.errorDesc, Owner: m.owner, Failure: m.failure, Deploys: m.deployCount,
		Pool: m.spec.Pool, Commissioned: m.commissioned(), Annotations: map[string]string{},
	}
	for k, v := range m.annotations {
		st.Annotations[k] = v
	}
	if m.phase != nil {
		st.Phase = m.phase.kind
	}
	return st
}

func (s *Server) machineLocked(id string) (*machine, error) {
	m, ok := s.machines[id]
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrNoMachine, id)
	}
	s.advanceLocked(m, s.now())
	return m, nil
}

// Machines lists the machines in hostname order.
func (s *Server) Machines() []MachineState {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []MachineState
	for _, m := range s.sortedMachinesLocked() {
		s.advanceLocked(m, s.now())
		out = append(out, s.stateLocked(m))
	}
	return out
}

// Machine reports one machine.
func (s *Server) Machine(systemID string) (MachineState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.machineLocked(systemID)
	if err != nil {
		return MachineState{}, err
	}
	return s.stateLocked(m), nil
}

// AddMachine adds a machine and returns its system id.
func (s *Server) AddMachine(spec MachineSpec) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := spec.Validate(); err != nil {
		return "", fmt.Errorf("maassim: %w", err)
	}
	if err := s.addMachineLocked(spec); err != nil {
		return "", err
	}
	return spec.SystemID, nil
}

// Commission starts commissioning a machine, as an operator pressing
// "Commission" would (the API's op=commission does the same).
func (s *Server) Commission(systemID string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.machineLocked(systemID)
	if err != nil {
		return err
	}
	if !m.status.commissionable() {
		return fmt.Errorf("maassim: machine %s is %s and cannot commission", systemID, m.status)
	}
	s.startCommissioningLocked(m, s.now(), s.creds[0].Username, "")
	return nil
}

// Advance ends the machine's current phase now, even a stuck one. A phase
// that leads to another (disk erasing to releasing) starts the next one.
func (s *Server) Advance(systemID string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.machineLocked(systemID)
	if err != nil {
		return err
	}
	if m.phase == nil {
		return fmt.Errorf("maassim: machine %s is %s, not in a transition", systemID, m.status)
	}
	now := s.now()
	p := m.phase
	for p.emitted < len(p.steps) {
		s.emitLocked(m, now, "", "Node status event", "DEBUG", p.steps[p.emitted])
		p.emitted++
	}
	if p.kind == phaseCommissioning && !p.scripted && p.failure == "" {
		p.scripted = true
		s.runCommissioningScriptsLocked(m, now)
	}
	s.finishPhaseLocked(m, p, now)
	return nil
}

// InjectFailure sets the failures of a machine; an empty Failure clears
// them. A failure applies to phases that start afterwards, and a stuck
// phase also to the one in progress.
func (s *Server) InjectFailure(systemID string, f Failure) error {
	switch f.Stuck {
	case "", phaseCommissioning, phaseDeploying, phaseErasing, phaseReleasing:
	default:
		return fmt.Errorf("maassim: stuck phase %q: want commissioning, deploying, disk_erasing or releasing", f.Stuck)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.machineLocked(systemID)
	if err != nil {
		return err
	}
	m.failure = f
	if m.phase != nil && f.Stuck == m.phase.kind {
		m.phase.stuck = true
		if m.phase.timer != nil {
			m.phase.timer.Stop()
		}
	}
	return nil
}

// InjectFault makes the next f.Count matching API calls fail.
func (s *Server) InjectFault(f Fault) error {
	if f.Count <= 0 || f.Status < 400 || f.Status > 599 {
		return fmt.Errorf("maassim: fault needs a positive count and a 4xx or 5xx status")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = append(s.faults, f)
	return nil
}

// ClearFaults removes the injected API faults.
func (s *Server) ClearFaults() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = nil
}

// SetLatency delays API calls whose path (below /MAAS/api/2.0/) starts with
// one of paths (all calls when none) by d; a caller that goes away ends
// the wait. Zero turns it off.
func (s *Server) SetLatency(d time.Duration, paths ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.latency, s.latencyPaths = d, append([]string(nil), paths...)
}

// Calls lists the API calls served so far.
func (s *Server) Calls() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.calls)
}

// Deploys lists the accepted deploy calls, of one machine or (empty) all.
func (s *Server) Deploys(systemID string) []Deploy {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Deploy
	for _, d := range s.deploys {
		if systemID == "" || d.SystemID == systemID {
			out = append(out, d)
		}
	}
	return out
}

// Webhooks lists the webhook deliveries of commissioning scripts.
func (s *Server) Webhooks() []WebhookDelivery {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.webhooks)
}

// Environment is what a commissioning script sees on the machine.
func (s *Server) Environment(systemID string) (MachineEnvironment, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.machines[systemID]
	if !ok {
		return MachineEnvironment{}, fmt.Errorf("%w: %q", ErrNoMachine, systemID)
	}
	return m.environment(), nil
}

// Script returns the current content of a stored script.
func (s *Server) Script(name string) ([]byte, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sc, ok := s.scripts[name]
	if !ok {
		return nil, false
	}
	return slices.Clone(sc.current().data), true
}

// serveControl serves the controls over HTTP:
//
//	GET  /_sim/machines                    machine states
//	POST /_sim/machines                    add a machine (MachineSpec)
//	GET  /_sim/machines/{id}               one machine
//	POST /_sim/machines/{id}/commission    start commissioning
//	POST /_sim/machines/{id}/advance       end the current phase now
//	POST /_sim/machines/{id}/failure       set failures (Failure; {} clears)
//	GET  /_sim/machines/{id}/environment   what a commissioning script sees
//	POST /_sim/faults                      Fault, e.g. {"count":3,"status":503,"op":"deploy","after":true}; count 0 clears
//	POST /_sim/latency                     {"delay":"2s","paths":["machines/"]}
//	GET  /_sim/calls | /_sim/deploys[?system_id=] | /_sim/webhooks
//	GET  /_sim/credentials                 the API key
func (s *Server) serveControl(w http.ResponseWriter, r *http.Request) {
	parts := strings.Split(strings.Trim(strings.TrimPrefix(r.URL.Path, "/_sim/"), "/"), "/")
	fail := func(err error) {
		status := http.StatusBadRequest
		if errors.Is(err, ErrNoMachine) {
			status = http.StatusNotFound
		}
		writeJSON(w, status, map[string]string{"error": err.Error()})
	}
	decode := func(v any) bool {
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
		dec.DisallowUnknownFields()
		if err := dec.Decode(v); err != nil {
			fail(fmt.Errorf("maassim: control body: %w", err))
			return false
		}
		return true
	}
	get, post := r.Method == http.MethodGet, r.Method == http.MethodPost
	switch {
	case len(parts) == 1 && parts[0] == "machines" && get:
		writeJSON(w, http.StatusOK, s.Machines())
	case len(parts) == 1 && parts[0] == "machines" && post:
		var spec MachineSpec
		if !decode(&spec) {
			return
		}
		id, err := s.AddMachine(spec)
		if err != nil {
			fail(err)
			return
		}
		st, _ := s.Machine(id)
		writeJSON(w, http.StatusCreated, st)
	case len(parts) == 2 && parts[0] == "machines" && get:
		st, err := s.Machine(parts[1])
		if err != nil {
			fail(err)
			return
		}
		writeJSON(w, http.StatusOK, st)
	case len(parts) == 3 && parts[0] == "machines" && parts[2] == "environment" && get:
		env, err := s.Environment(parts[1])
		if err != nil {
			fail(err)
			return
		}
		writeJSON(w, http.StatusOK, env)
	case len(parts) == 3 && parts[0] == "machines" && post:
		var err error
		switch parts[2] {
		case "commission":
			err = s.Commission(parts[1])
		case "advance":
			err = s.Advance(parts[1])
		case "failure":
			var f Failure
			if !decode(&f) {
				return
			}
			err = s.InjectFailure(parts[1], f)
		default:
			writeText(w, http.StatusNotFound, "Not Found")
			return
		}
		if err != nil {
			fail(err)
			return
		}
		st, _ := s.Machine(parts[1])
		writeJSON(w, http.StatusOK, st)
	case len(parts) == 1 && parts[0] == "faults" && post:
		var f Fault
		if !decode(&f) {
			return
		}
		if f.Status == 0 {
			f.Status = http.StatusServiceUnavailable
		}
		if f.Count <= 0 {
			s.ClearFaults()
		} else if err := s.InjectFault(f); err != nil {
			fail(err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"ok": true})
	case len(parts) == 1 && parts[0] == "latency" && post:
		var l struct {
			Delay string   `json:"delay"`
			Paths []string `json:"paths"`
		}
		if !decode(&l) {
			return
		}
		d, err := time.ParseDuration(l.Delay)
		if err != nil {
			fail(fmt.Errorf("maassim: latency: %w", err))
			return
		}
		s.SetLatency(d, l.Paths...)
		writeJSON(w, http.StatusOK, map[string]any{"ok": true})
	case len(parts) == 1 && parts[0] == "calls" && get:
		writeJSON(w, http.StatusOK, s.Calls())
	case len(parts) == 1 && parts[0] == "deploys" && get:
		writeJSON(w, http.StatusOK, s.Deploys(r.URL.Query().Get("system_id")))
	case len(parts) == 1 && parts[0] == "webhooks" && get:
		writeJSON(w, http.StatusOK, s.Webhooks())
	case len(parts) == 1 && parts[0] == "credentials" && get:
		writeJSON(w, http.StatusOK, map[string]string{"api_key": s.APIKey()})
	default:
		writeText(w, http.StatusNotFound, "Not Found")
	}
}
