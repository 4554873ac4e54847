package maassim

import (
	"fmt"
	"sort"
	"strings"
	"time"
)

// Status is a MAAS node status (maasserver.enum.NODE_STATUS).
type Status int

// Node statuses, numbered as MAAS numbers them.
const (
	StatusNew                 Status = 0
	StatusCommissioning       Status = 1
	StatusFailedCommissioning Status = 2
	StatusMissing             Status = 3
	StatusReady               Status = 4
	StatusReserved            Status = 5
	StatusDeployed            Status = 6
	StatusRetired             Status = 7
	StatusBroken              Status = 8
	StatusDeploying           Status = 9
	StatusAllocated           Status = 10
	StatusFailedDeployment    Status = 11
	StatusReleasing           Status = 12
	StatusFailedReleasing     Status = 13
	StatusDiskErasing         Status = 14
	StatusFailedDiskErasing   Status = 15
	StatusTesting             Status = 21
)

// String is the status name MAAS shows (status_name).
func (s Status) String() string {
	switch s {
	case StatusNew:
		return "New"
	case StatusCommissioning:
		return "Commissioning"
	case StatusFailedCommissioning:
		return "Failed commissioning"
	case StatusMissing:
		return "Missing"
	case StatusReady:
		return "Ready"
	case StatusReserved:
		return "Reserved"
	case StatusDeployed:
		return "Deployed"
	case StatusRetired:
		return "Retired"
	case StatusBroken:
		return "Broken"
	case StatusDeploying:
		return "Deploying"
	case StatusAllocated:
		return "Allocated"
	case StatusFailedDeployment:
		return "Failed deployment"
	case StatusReleasing:
		return "Releasing"
	case StatusFailedReleasing:
		return "Failed releasing"
	case StatusDiskErasing:
		return "Disk erasing"
	case StatusFailedDiskErasing:
		return "Failed disk erasing"
	case StatusTesting:
		return "Testing"
	}
	return fmt.Sprintf("Status(%d)", int(s))
}

// releasable lists the statuses op=release accepts (RELEASABLE_STATUSES).
func (s Status) releasable() bool {
	switch s {
	case StatusAllocated, StatusReserved, StatusBroken, StatusDeploying, StatusDeployed,
		StatusFailedDeployment, StatusFailedDiskErasing, StatusFailedReleasing:
		return true
	}
	return false
}

// commissionable lists the statuses op=commission accepts.
func (s Status) commissionable() bool {
	switch s {
	case StatusNew, StatusReady, StatusFailedCommissioning, StatusBroken, StatusMissing:
		return true
	}
	return false
}

// Failure is what to inject into one machine. Failures stay until cleared
// with an empty Failure.
type Failure struct {
	// Commission makes commissioning end in "Failed commissioning".
	Commission string `json:"commission,omitempty"`
	// Deploy makes deployment end in "Failed deployment" with this reason.
	Deploy string `json:"deploy,omitempty"`
	// Erase makes disk erasing end in "Failed disk erasing".
	Erase string `json:"erase,omitempty"`
	// Stuck names a phase that never ends: commissioning, deploying,
	// disk_erasing or releasing (a timeout for the caller).
	Stuck string `json:"stuck,omitempty"`
}

// phase names.
const (
	phaseCommissioning = "commissioning"
	phaseDeploying     = "deploying"
	phaseErasing       = "disk_erasing"
	phaseReleasing     = "releasing"
)

// Phase step messages, as MAAS shows them in status_message.
func phaseSteps(kind string) []string {
	switch kind {
	case phaseCommissioning:
		return []string{"Powering on", "Performing PXE boot", "Loading ephemeral", "Gathering information", "Running commissioning scripts"}
	case phaseDeploying:
		return []string{"Powering on", "Performing PXE boot", "Loading ephemeral", "Configuring storage", "Installing OS", "Configuring OS", "Rebooting"}
	case phaseErasing:
		return []string{"Powering on", "Performing PXE boot", "Loading ephemeral", "Erasing disks"}
	case phaseReleasing:
		return []string{"Powering off"}
	}
	return nil
}

// phase is a transitional state in progress.
type phase struct {
	kind     string
	start    time.Time
	dur      time.Duration
	steps    []string
	emitted  int
	stuck    bool
	failure  string
	scripted bool // commissioning: custom scripts have run
	timer    stopper
}

// stopper is the part of *time.Timer a phase needs.
type stopper interface{ Stop() bool }

func (p *phase) stepAt(i int) time.Time {
	return p.start.Add(time.Duration(int64(p.dur) * int64(i) / int64(len(p.steps))))
}

// scriptsAt is when custom commissioning scripts run: near the end of
// commissioning, after the built-in scripts.
func (p *phase) scriptsAt() time.Time { return p.start.Add(p.dur * 4 / 5) }

func (p *phase) end() time.Time { return p.start.Add(p.dur) }

// next is the next time the phase has something to do; zero for never.
func (p *phase) next() time.Time {
	var t time.Time
	if p.emitted < len(p.steps) {
		t = p.stepAt(p.emitted)
	}
	if p.kind == phaseCommissioning && !p.scripted && !p.stuck {
		if st := p.scriptsAt(); t.IsZero() || st.Before(t) {
			t = st
		}
	}
	if !p.stuck {
		if e := p.end(); t.IsZero() || e.Before(t) {
			t = e
		}
	}
	return t
}

// scriptResult is one script's result in a script set.
type scriptResult struct {
	id       int
	name     string
	scriptID int
	revision int
	status   int // 2 passed, 3 failed
	exit     int
	stdout   []byte
	stderr   []byte
	started  time.Time
	ended    time.Time
	hwType   int
}

// scriptSet is one run of commissioning (or testing, installation).
type scriptSet struct {
	id         int
	resultType int // 0 commissioning, 1 installation, 2 testing
	status     int
	started    time.Time
	ended      time.Time
	results    []*scriptResult
}

// machine is one simulated machine. Fields are guarded by Server.mu.
type machine struct {
	spec        MachineSpec
	status      Status
	owner       string
	agentName   string
	annotations map[string]string
	osystem     string
	distro      string
	powerState  string
	message     string
	errorDesc   string
	failure     Failure
	phase       *phase
	commission  *scriptSet // current commissioning script set
	install     *scriptSet
	scriptSets  []*scriptSet
	locked      bool
	hweKernel   string
	updated     time.Time
	deployCount int
}

func (m *machine) id() string { return m.spec.SystemID }

// event is one entry of the MAAS event log.
type event struct {
	id          int
	node        string
	hostname    string
	username    string
	typ         string
	level       string
	description string
	created     time.Time
}

// Event levels as MAAS numbers them (Python logging levels; AUDIT is 0).
func levelNumber(l string) int {
	switch strings.ToUpper(l) {
	case "AUDIT":
		return 0
	case "DEBUG":
		return 10
	case "INFO":
		return 20
	case "WARNING":
		return 30
	case "ERROR":
		return 40
	case "CRITICAL":
		return 50
	}
	return -1
}

// emitLocked appends an event for m; status-bearing levels update the
// machine's status_message.
func (s *Server) emitLocked(m *machine, at time.Time, user, typ, level, description string) {
	s.nextEventID++
	s.events = append(s.events, &event{
		id: s.nextEventID, node: m.id(), hostname: m.spec.Hostname, username: user,
		typ: typ, level: level, description: description, created: at,
	})
	switch {
	case description != "" && levelNumber(level) >= levelNumber("INFO"):
		m.message = description
	case typ == "Node status event" || typ == "Node changed status":
		m.message = description
	}
}

// setStatusLocked moves m to status and records the transition event.
func (s *Server) setStatusLocked(m *machine, at time.Time, to Status) {
	from := m.status
	m.status = to
	m.updated = at
	desc := fmt.Sprintf("From '%s' to '%s'", from, to)
	if to == StatusAllocated && m.owner != "" {
		desc += fmt.Sprintf(" (to %s)", m.owner)
	}
	s.emitLocked(m, at, "", "Node changed status", "DEBUG", desc)
}

// startPhaseLocked begins a transitional phase on m.
func (s *Server) startPhaseLocked(m *machine, at time.Time, kind string, dur time.Duration) {
	s.stopPhaseLocked(m)
	p := &phase{kind: kind, start: at, dur: dur, steps: phaseSteps(kind)}
	if m.failure.Stuck == kind {
		p.stuck = true
	}
	switch kind {
	case phaseCommissioning:
		p.failure = m.failure.Commission
	case phaseDeploying:
		p.failure = m.failure.Deploy
	case phaseErasing:
		p.failure = m.failure.Erase
	}
	m.phase = p
	m.errorDesc = ""
	s.advanceLocked(m, at)
}

func (s *Server) stopPhaseLocked(m *machine) {
	if m.phase != nil && m.phase.timer != nil {
		m.phase.timer.Stop()
	}
	m.phase = nil
}

// advanceLocked moves m's phase forward to now: step messages, custom
// commissioning scripts, and the end of the phase (which may start the
// next one). It then arms a timer for the next thing to happen.
func (s *Server) advanceLocked(m *machine, now time.Time) {
	for m.phase != nil {
		p := m.phase
		for p.emitted < len(p.steps) && !now.Before(p.stepAt(p.emitted)) {
			s.emitLocked(m, p.stepAt(p.emitted), "", "Node status event", "DEBUG", p.steps[p.emitted])
			p.emitted++
		}
		if p.kind == phaseCommissioning && !p.scripted && !p.stuck && !now.Before(p.scriptsAt()) {
			p.scripted = true
			if p.failure == "" {
				s.runCommissioningScriptsLocked(m, p.scriptsAt())
			}
		}
		if p.stuck || now.Before(p.end()) {
			s.armLocked(m, now)
			return
		}
		s.finishPhaseLocked(m, p, p.end())
	}
}

// armLocked sets a timer for the next step of m's phase.
func (s *Server) armLocked(m *machine, now time.Time) {
	p := m.phase
	if p.timer != nil {
		p.timer.Stop()
		p.timer = nil
	}
	next := p.next()
	if next.IsZero() || s.closed {
		return
	}
	p.timer = time.AfterFunc(next.Sub(now), func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.closed || m.phase != p {
			return
		}
		s.advanceLocked(m, s.now())
	})
}

// finishPhaseLocked ends p at time at.
func (s *Server) finishPhaseLocked(m *machine, p *phase, at time.Time) {
	m.phase = nil
	if p.timer != nil {
		p.timer.Stop()
	}
	switch p.kind {
	case phaseCommissioning:
		if p.failure != "" {
			s.failLocked(m, at, StatusFailedCommissioning, p.failure)
			if m.commission != nil {
				m.commission.status, m.commission.ended = 3, at
			}
			return
		}
		if !p.scripted {
			p.scripted = true
			s.runCommissioningScriptsLocked(m, at)
		}
		if m.commission != nil {
			m.commission.status, m.commission.ended = 2, at
		}
		m.powerState = "off"
		s.setStatusLocked(m, at, StatusReady)
		s.emitLocked(m, at, "", "Ready", "INFO", "")
		m.message = "Ready"
	case phaseDeploying:
		if p.failure != "" {
			if m.install != nil {
				m.install.status, m.install.ended = 3, at
			}
			s.failLocked(m, at, StatusFailedDeployment, p.failure)
			return
		}
		if m.install != nil {
			m.install.status, m.install.ended = 2, at
		}
		s.setStatusLocked(m, at, StatusDeployed)
		s.emitLocked(m, at, "", "Deployed", "INFO", "")
		m.message = "Deployed"
	case phaseErasing:
		if p.failure != "" {
			s.failLocked(m, at, StatusFailedDiskErasing, p.failure)
			return
		}
		s.setStatusLocked(m, at, StatusReleasing)
		s.emitLocked(m, at, "", "Releasing", "INFO", "")
		s.startPhaseLocked(m, at, phaseReleasing, s.timing.Release)
	case phaseReleasing:
		m.owner, m.agentName = "", ""
		m.osystem, m.distro, m.hweKernel = "", "", ""
		m.powerState = "off"
		m.install = nil
		next := StatusReady
		if m.commission == nil || m.commission.status != 2 {
			next = StatusNew
		}
		s.setStatusLocked(m, at, next)
		s.emitLocked(m, at, "", "Released", "INFO", "")
		m.message = "Released"
		m.annotations = map[string]string{}
	}
}

// failLocked marks m failed the way MAAS's mark_failed does.
func (s *Server) failLocked(m *machine, at time.Time, to Status, reason string) {
	s.setStatusLocked(m, at, to)
	m.errorDesc = reason
	s.emitLocked(m, at, "", "Marking node failed", "ERROR", reason)
}

// sortedMachinesLocked returns the machines in hostname order.
func (s *Server) sortedMachinesLocked() []*machine {
	out := make([]*machine, 0, len(s.machines))
	for _, m := range s.machines {
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].spec.Hostname < out[j].spec.Hostname })
	return out
}
