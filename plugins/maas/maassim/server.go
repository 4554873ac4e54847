// Package maassim is a MAAS 2.0 API simulator: the region controller
// endpoints the gpuaas MAAS driver uses, answering with MAAS's JSON shapes,
// error bodies and status codes, behind OAuth 1.0 PLAINTEXT signatures.
//
// Machines move through MAAS's states with configurable timing: New →
// Commissioning → Ready → Allocated → Deploying → Deployed → (Disk erasing
// →) Releasing → Ready. Failures are injectable per machine (failed
// deployment, failed disk erasing, failed commissioning, a phase that never
// ends) and for the API (5xx answers on the next calls, latency). Custom
// commissioning scripts uploaded through the API are stored with their
// revisions and "run" when a machine commissions; the gpuaas commissioning
// script's logic is carried out in Go: its report goes to the script's
// webhook URL with the script's HMAC signature, as a real machine would send
// it, and becomes the script's stored result.
//
// Every API call, every deploy (with the user_data it carried) and every
// webhook delivery is recorded for tests. Controls are methods on Server and
// the same operations over HTTP under /_sim/ (unauthenticated: bind the
// simulator to loopback).
package maassim

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// APIPrefix is where the MAAS 2.0 API lives on the server.
const APIPrefix = "/MAAS/api/2.0/"

// Version is the MAAS version the simulator reports.
const Version = "3.5.4"

// Call is one recorded API call.
type Call struct {
	At       time.Time `json:"at"`
	Method   string    `json:"method"`
	Path     string    `json:"path"`
	Op       string    `json:"op,omitempty"`
	SystemID string    `json:"system_id,omitempty"`
	User     string    `json:"user,omitempty"`
	Status   int       `json:"status"`
}

// Deploy is one accepted op=deploy call.
type Deploy struct {
	At           time.Time `json:"at"`
	SystemID     string    `json:"system_id"`
	User         string    `json:"user"`
	DistroSeries string    `json:"distro_series"`
	UserData     string    `json:"user_data"`
	AgentName    string    `json:"agent_name,omitempty"`
	Comment      string    `json:"comment,omitempty"`
}

// Fault makes the next Count API calls that match answer Status instead of
// their result.
type Fault struct {
	Count  int `json:"count"`
	Status int `json:"status"`
	// Path, if set, must occur in the call's path below /MAAS/api/2.0/.
	Path string `json:"path,omitempty"`
	// Op, if set, must be the call's op (deploy, release, allocate, ...).
	Op string `json:"op,omitempty"`
	// After carries the call out before answering with Status: the effect
	// happens but the caller never learns it (a lost response).
	After bool `json:"after,omitempty"`
	// RetryAfter > 0 adds a Retry-After header (seconds).
	RetryAfter int `json:"retry_after,omitempty"`
}

// Server is a simulated MAAS region controller. It is safe for concurrent
// use; its state lives in memory.
type Server struct {
	logger        hclog.Logger
	now           func() time.Time
	timing        Timing
	webhookClient *http.Client
	random        io.Reader

	mu           sync.Mutex
	closed       bool
	done         chan struct{}
	wg           sync.WaitGroup
	creds        []Credential
	machines     map[string]*machine
	pools        map[string]int
	zones        map[string]int
	scripts      map[string]*script
	events       []*event
	calls        []Call
	deploys      []Deploy
	webhooks     []WebhookDelivery
	faults       []Fault
	latency      time.Duration
	latencyPaths []string
	nonces       map[string]time.Time
	nextEventID  int
	nextScriptID int
	nextVerID    int
	nextSetID    int
	nextResultID int
}

// Option configures a Server.
type Option func(*Server) error

// WithTiming sets how long phases take (default FastTiming).
func WithTiming(t Timing) Option { return func(s *Server) error { s.timing = t; return nil } }

// WithMachines sets the machines (default DefaultMachines).
func WithMachines(specs ...MachineSpec) Option {
	return func(s *Server) error {
		s.machines = map[string]*machine{}
		for _, sp := range specs {
			if err := s.addMachineLocked(sp); err != nil {
				return err
			}
		}
		return nil
	}
}

// WithCredential adds an API user. Without any, New makes one for "admin".
func WithCredential(c Credential) Option {
	return func(s *Server) error {
		if c.Username == "" || c.ConsumerKey == "" || c.TokenKey == "" || c.TokenSecret == "" ||
			strings.Contains(c.APIKey(), "::") || strings.Count(c.APIKey(), ":") != 2 {
			return fmt.Errorf("maassim: credential needs a user name and three non-empty parts without ':'")
		}
		s.creds = append(s.creds, c)
		return nil
	}
}

// WithClock sets the clock (default time.Now).
func WithClock(now func() time.Time) Option { return func(s *Server) error { s.now = now; return nil } }

// WithLogger sets the logger (default: none).
func WithLogger(l hclog.Logger) Option { return func(s *Server) error { s.logger = l; return nil } }

// WithWebhookClient sets the HTTP client machines post webhooks with.
func WithWebhookClient(c *http.Client) Option {
	return func(s *Server) error { s.webhookClient = c; return nil }
}

// WithRandom sets the source of generated API keys.
func WithRandom(r io.Reader) Option { return func(s *Server) error { s.random = r; return nil } }

// New returns a simulator; call Close when done with it.
func New(opts ...Option) (*Server, error) {
	s := &Server{
		logger:        hclog.NewNullLogger(),
		now:           time.Now,
		timing:        FastTiming(),
		webhookClient: &http.Client{Timeout: 30 * time.Second},
		random:        rand.Reader,
		done:          make(chan struct{}),
		pools:         map[string]int{"default": 0},
		zones:         map[string]int{"default": 1},
		scripts:       map[string]*script{},
		nonces:        map[string]time.Time{},
	}
	setDefault := true
	for _, o := range opts {
		if err := o(s); err != nil {
			return nil, err
		}
		if s.machines != nil {
			setDefault = false
		}
	}
	if setDefault {
		s.machines = map[string]*machine{}
		for _, sp := range DefaultMachines() {
			if err := s.addMachineLocked(sp); err != nil {
				return nil, err
			}
		}
	}
	if len(s.creds) == 0 {
		c, err := s.newCredential("admin")
		if err != nil {
			return nil, err
		}
		s.creds = append(s.creds, c)
	}
	return s, nil
}

func (s *Server) newCredential(user string) (Credential, error) {
	const alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghjkmnpqrstuvwxyz23456789"
	gen := func(n int) (string, error) {
		b := make([]byte, n)
		if _, err := io.ReadFull(s.random, b); err != nil {
			return "", fmt.Errorf("maassim: api key: %w", err)
		}
		for i := range b {
			b[i] = alphabet[int(b[i])%len(alphabet)]
		}
		return string(b), nil
	}
	var c Credential
	var err error
	c.Username = user
	if c.ConsumerKey, err = gen(18); err != nil {
		return c, err
	}
	if c.TokenKey, err = gen(18); err != nil {
		return c, err
	}
	c.TokenSecret, err = gen(32)
	return c, err
}

// APIKey is the first user's MAAS API key.
func (s *Server) APIKey() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.creds[0].APIKey()
}

// Close stops timers and waits for webhook deliveries in flight.
func (s *Server) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	close(s.done)
	for _, m := range s.machines {
		if m.phase != nil && m.phase.timer != nil {
			m.phase.timer.Stop()
		}
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// addMachineLocked adds a validated machine in its initial state.
func (s *Server) addMachineLocked(sp MachineSpec) error {
	if err := sp.Validate(); err != nil {
		return fmt.Errorf("maassim: %w", err)
	}
	if _, dup := s.machines[sp.SystemID]; dup {
		return fmt.Errorf("maassim: machine %s: system_id %s already exists", sp.Hostname, sp.SystemID)
	}
	for _, o := range s.machines {
		if o.spec.Hostname == sp.Hostname {
			return fmt.Errorf("maassim: hostname %s already exists", sp.Hostname)
		}
	}
	now := s.now()
	m := &machine{spec: sp, status: StatusNew, annotations: map[string]string{}, powerState: "off", updated: now, message: "New"}
	if _, ok := s.pools[sp.Pool]; !ok {
		s.pools[sp.Pool] = len(s.pools)
	}
	if _, ok := s.zones[sp.Zone]; !ok {
		s.zones[sp.Zone] = len(s.zones) + 1
	}
	if sp.Status == "ready" {
		set := s.newScriptSetLocked(m, 0, now)
		s.builtinResultsLocked(set, now)
		set.status, set.ended = 2, now
		m.commission = set
		m.status = StatusReady
		m.message = "Ready"
	}
	s.machines[sp.SystemID] = m
	return nil
}

func (s *Server) newScriptSetLocked(m *machine, resultType int, at time.Time) *scriptSet {
	s.nextSetID++
	set := &scriptSet{id: s.nextSetID, resultType: resultType, status: 1, started: at}
	m.scriptSets = append(m.scriptSets, set)
	return set
}

// builtinResultsLocked adds the results of MAAS's own commissioning
// scripts.
func (s *Server) builtinResultsLocked(set *scriptSet, at time.Time) {
	for i, name := range []string{
		"00-maas-00-support-info", "00-maas-01-cpuinfo", "00-maas-02-virtuality",
		"20-maas-01-install-lldpd", "40-maas-01-network-interfaces", "50-maas-01-commissioning", "maas-lshw",
	} {
		s.nextResultID++
		set.results = append(set.results, &scriptResult{
			id: s.nextResultID, name: name, scriptID: i + 1, revision: i + 1, status: 2,
			started: at, ended: at, stdout: []byte{},
		})
	}
}

// ServeHTTP implements http.Handler: the MAAS API under /MAAS/api/2.0/
// and the controls under /_sim/.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case strings.HasPrefix(r.URL.Path, "/_sim/"):
		s.serveControl(w, r)
	case strings.HasPrefix(r.URL.Path, APIPrefix):
		s.serveAPI(w, r)
	case r.URL.Path == "/MAAS/" || r.URL.Path == "/MAAS":
		writeText(w, http.StatusOK, "MAAS simulator "+Version)
	default:
		writeText(w, http.StatusNotFound, "Not Found")
	}
}

var _ http.Handler = (*Server)(nil)

// apiRequest is one API call being served.
type apiRequest struct {
	w        http.ResponseWriter
	r        *http.Request
	now      time.Time
	user     string
	segments []string
	op       string
	call     *Call
}

func (s *Server) serveAPI(w http.ResponseWriter, r *http.Request) {
	rel := strings.TrimPrefix(r.URL.Path, APIPrefix)
	if err := s.delay(r, rel); err != nil {
		return
	}
	if strings.HasPrefix(r.Header.Get("Content-Type"), "multipart/form-data") {
		_ = r.ParseMultipartForm(32 << 20)
	} else {
		_ = r.ParseForm()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	req := &apiRequest{w: w, r: r, now: s.now(), op: r.Form.Get("op")}
	for _, seg := range strings.Split(strings.Trim(rel, "/"), "/") {
		if seg != "" {
			req.segments = append(req.segments, seg)
		}
	}
	call := Call{At: req.now, Method: r.Method, Path: r.URL.Path, Op: req.op}
	if len(req.segments) >= 2 && (req.segments[0] == "machines" || req.segments[0] == "nodes") {
		call.SystemID = req.segments[1]
	}
	rec := &statusRecorder{ResponseWriter: w}
	req.w = rec
	req.call = &call
	defer func() {
		call.Status = rec.status
		s.calls = append(s.calls, call)
	}()

	anonymous := r.Method == http.MethodGet && len(req.segments) == 1 && req.segments[0] == "version"
	if !anonymous {
		user, err := s.authenticate(r, req.now)
		if err != nil {
			ae := err.(*authError)
			if ae.status == http.StatusUnauthorized {
				rec.Header().Set("WWW-Authenticate", `OAuth realm="OAuth"`)
			}
			writeText(rec, ae.status, ae.msg)
			return
		}
		req.user = user
		call.User = user
	}
	for i := range s.faults {
		f := &s.faults[i]
		if f.Count <= 0 || !strings.Contains(rel, f.Path) || (f.Op != "" && f.Op != req.op) {
			continue
		}
		f.Count--
		if f.RetryAfter > 0 {
			rec.Header().Set("Retry-After", strconv.Itoa(f.RetryAfter))
		}
		if f.After {
			s.route(&apiRequest{w: &discardWriter{header: http.Header{}}, r: r, now: req.now, user: req.user, segments: req.segments, op: req.op, call: req.call})
		}
		writeText(rec, f.Status, http.StatusText(f.Status))
		return
	}
	s.route(req)
}

// discardWriter swallows a response nobody will read.
type discardWriter struct {
	header http.Header
}

func (w *discardWriter) Header() http.Header         { return w.header }
func (w *discardWriter) Write(b []byte) (int, error) { return len(b), nil }
func (w *discardWriter) WriteHeader(int)             {}

// delay applies the configured latency, unless the caller goes away.
func (s *Server) delay(r *http.Request, rel string) error {
	s.mu.Lock()
	d, paths := s.latency, s.latencyPaths
	s.mu.Unlock()
	if d <= 0 {
		return nil
	}
	match := len(paths) == 0
	for _, p := range paths {
		if strings.HasPrefix(rel, p) {
			match = true
		}
	}
	if !match {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-r.Context().Done():
		return r.Context().Err()
	}
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(b)
	if err != nil {
		return n, fmt.Errorf("maassim: write response: %w", err)
	}
	return n, nil
}

func writeText(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, msg)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		writeText(w, http.StatusInternalServerError, err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func writeFormErrors(w http.ResponseWriter, errs formErrors) {
	writeJSON(w, http.StatusBadRequest, errs)
}

func (req *apiRequest) methodNotAllowed() {
	writeText(req.w, http.StatusMethodNotAllowed, "Method Not Allowed")
}

func (req *apiRequest) badOp() {
	writeText(req.w, http.StatusBadRequest, fmt.Sprintf("Unrecognised signature: method=%s op=%s", req.r.Method, req.op))
}

// route dispatches an authenticated API call.
func (s *Server) route(req *apiRequest) {
	seg := req.segments
	if len(seg) == 0 {
		writeText(req.w, http.StatusNotFound, "Unknown API endpoint")
		return
	}
	method := req.r.Method
	switch {
	case seg[0] == "version" && len(seg) == 1:
		if method != http.MethodGet {
			req.methodNotAllowed()
			return
		}
		writeJSON(req.w, http.StatusOK, map[string]any{
			"capabilities": []string{"networks-management", "static-ipaddresses", "ipv6-deployment-ubuntu",
				"devices-management", "storage-deployment-ubuntu", "network-deployment-ubuntu",
				"bridging-interface-ubuntu", "bridging-automatic-ubuntu", "authenticate-api"},
			"version":    Version,
			"subversion": "maassim",
		})
	case seg[0] == "users" && len(seg) == 1:
		if method != http.MethodGet || req.op != "whoami" {
			req.badOp()
			return
		}
		writeJSON(req.w, http.StatusOK, map[string]any{
			"username": req.user, "email": req.user + "@maas.local", "is_superuser": true, "is_local": true,
			"sshkeys_count": 0, "resource_uri": "/MAAS/api/2.0/users/" + req.user + "/",
		})
	case seg[0] == "machines" && len(seg) == 1:
		s.machinesCollection(req)
	case seg[0] == "machines" && len(seg) == 2:
		s.machineResource(req, seg[1])
	case seg[0] == "nodes" && len(seg) == 3 && seg[2] == "devices":
		s.nodeDevices(req, seg[1])
	case seg[0] == "nodes" && len(seg) == 3 && seg[2] == "results":
		s.nodeResults(req, seg[1])
	case seg[0] == "scripts" && len(seg) == 1:
		s.scriptsCollection(req)
	case seg[0] == "scripts" && len(seg) == 2:
		s.scriptResource(req, seg[1])
	case seg[0] == "events" && len(seg) == 1:
		if method != http.MethodGet || req.op != "query" {
			req.badOp()
			return
		}
		s.eventsQuery(req)
	default:
		writeText(req.w, http.StatusNotFound, "Unknown API endpoint: "+req.r.URL.Path)
	}
}

// machineOr404 finds a machine and brings its state up to date.
func (s *Server) machineOr404(req *apiRequest, id string) *machine {
	m, ok := s.machines[id]
	if !ok {
		writeText(req.w, http.StatusNotFound, "No Machine matches the given query.")
		return nil
	}
	s.advanceLocked(m, req.now)
	return m
}

func (s *Server) machinesCollection(req *apiRequest) {
	switch {
	case req.r.Method == http.MethodGet && req.op == "":
		f := req.r.Form
		match := func(m *machine) bool {
			if ids := f["id"]; len(ids) > 0 && !contains(ids, m.id()) {
				return false
			}
			if hs := f["hostname"]; len(hs) > 0 && !contains(hs, m.spec.Hostname) {
				return false
			}
			if as := f["agent_name"]; len(as) > 0 && !contains(as, m.agentName) {
				return false
			}
			if ps := f["pool"]; len(ps) > 0 && !contains(ps, m.spec.Pool) {
				return false
			}
			if zs := f["zone"]; len(zs) > 0 && !contains(zs, m.spec.Zone) {
				return false
			}
			if ss := f["status"]; len(ss) > 0 && !contains(ss, statusFilterName(m.status)) {
				return false
			}
			for _, t := range f["tags"] {
				if !contains(m.spec.Tags, t) {
					return false
				}
			}
			return true
		}
		out := []map[string]any{}
		for _, m := range s.sortedMachinesLocked() {
			s.advanceLocked(m, req.now)
			if match(m) {
				out = append(out, s.renderMachineLocked(m))
			}
		}
		writeJSON(req.w, http.StatusOK, out)
	case req.r.Method == http.MethodPost && req.op == "allocate":
		s.allocate(req)
	default:
		req.badOp()
	}
}

// statusFilterName is the status name the machines list filter takes.
func statusFilterName(st Status) string {
	return strings.ReplaceAll(strings.ToLower(st.String()), " ", "_")
}

func contains(list []string, v string) bool {
	for _, e := range list {
		if e == v {
			return true
		}
	}
	return false
}

// allocate is POST machines/?op=allocate.
func (s *Server) allocate(req *apiRequest) {
	f := req.r.Form
	var constraints []string
	for _, k := range []string{"system_id", "name", "pool", "zone", "tags"} {
		for _, v := range f[k] {
			constraints = append(constraints, fmt.Sprintf("('%s', ['%s'])", k, v))
		}
	}
	var found *machine
	for _, m := range s.sortedMachinesLocked() {
		s.advanceLocked(m, req.now)
		if m.status != StatusReady || m.owner != "" || m.locked {
			continue
		}
		if v := f.Get("system_id"); v != "" && v != m.id() {
			continue
		}
		if v := f.Get("name"); v != "" && v != m.spec.Hostname && v != m.spec.Hostname+".maas" {
			continue
		}
		if v := f.Get("pool"); v != "" && v != m.spec.Pool {
			continue
		}
		if v := f.Get("zone"); v != "" && v != m.spec.Zone {
			continue
		}
		ok := true
		for _, t := range f["tags"] {
			for _, tt := range strings.Split(t, ",") {
				if tt = strings.TrimSpace(tt); tt != "" && !contains(m.spec.Tags, tt) {
					ok = false
				}
			}
		}
		if ok {
			found = m
			break
		}
	}
	if found == nil {
		msg := "No machine available."
		switch {
		case f.Get("system_id") != "":
			msg = fmt.Sprintf("No machine with system ID %s available.", f.Get("system_id"))
		case len(constraints) > 0:
			msg = fmt.Sprintf("No available machine matches constraints: [%s] (resolved to \"%s\")",
				strings.Join(constraints, ", "), strings.Join(constraints, " "))
		}
		writeText(req.w, http.StatusConflict, msg)
		return
	}
	req.call.SystemID = found.id()
	if parseBool(f.Get("dry_run")) {
		writeJSON(req.w, http.StatusOK, s.renderMachineLocked(found))
		return
	}
	s.acquireLocked(found, req.now, req.user, f.Get("agent_name"), f.Get("comment"))
	out := s.renderMachineLocked(found)
	out["constraints_by_type"] = map[string]any{}
	writeJSON(req.w, http.StatusOK, out)
}

func (s *Server) acquireLocked(m *machine, at time.Time, user, agent, comment string) {
	s.emitLocked(m, at, user, "User acquiring node", "DEBUG", requestDescription(user, comment))
	m.owner = user
	m.agentName = agent
	s.setStatusLocked(m, at, StatusAllocated)
}

// requestDescription is how MAAS describes a user's request event.
func requestDescription(user, comment string) string {
	if comment == "" {
		return "(" + user + ")"
	}
	return "(" + user + ") - " + comment
}

func (s *Server) machineResource(req *apiRequest, id string) {
	m := s.machineOr404(req, id)
	if m == nil {
		return
	}
	if m.owner != "" && m.owner != req.user && !s.isSuperuserLocked(req.user) {
		writeText(req.w, http.StatusForbidden, "You do not have permission to view this machine.")
		return
	}
	switch req.r.Method {
	case http.MethodGet:
		switch req.op {
		case "":
			writeJSON(req.w, http.StatusOK, s.renderMachineLocked(m))
		case "query_power_state":
			writeJSON(req.w, http.StatusOK, map[string]string{"state": m.powerState})
		default:
			req.badOp()
		}
	case http.MethodPost:
		switch req.op {
		case "deploy":
			s.deploy(req, m)
		case "release":
			s.release(req, m)
		case "commission":
			s.commission(req, m)
		case "set_workload_annotations", "set_owner_data":
			if m.owner != req.user {
				writeText(req.w, http.StatusConflict, "Cannot set workload annotation: it hasn't been acquired.")
				return
			}
			for k, vs := range req.r.PostForm {
				if k == "op" || len(vs) == 0 {
					continue
				}
				if vs[len(vs)-1] == "" {
					delete(m.annotations, k)
				} else {
					m.annotations[k] = vs[len(vs)-1]
				}
			}
			writeJSON(req.w, http.StatusOK, s.renderMachineLocked(m))
		case "mark_broken":
			s.emitLocked(m, req.now, req.user, "User marking node broken", "DEBUG", requestDescription(req.user, req.r.Form.Get("comment")))
			s.stopPhaseLocked(m)
			m.errorDesc = req.r.Form.Get("comment")
			s.setStatusLocked(m, req.now, StatusBroken)
			writeJSON(req.w, http.StatusOK, s.renderMachineLocked(m))
		case "mark_fixed":
			if m.status != StatusBroken {
				writeText(req.w, http.StatusConflict, fmt.Sprintf("Unable to be fixed because the machine is in the '%s' state.", m.status))
				return
			}
			m.errorDesc = ""
			s.setStatusLocked(m, req.now, StatusReady)
			writeJSON(req.w, http.StatusOK, s.renderMachineLocked(m))
		default:
			req.badOp()
		}
	case http.MethodDelete:
		if !s.isSuperuserLocked(req.user) {
			writeText(req.w, http.StatusForbidden, "You do not have permission to delete this machine.")
			return
		}
		s.stopPhaseLocked(m)
		delete(s.machines, m.id())
		req.w.WriteHeader(http.StatusNoContent)
	default:
		req.methodNotAllowed()
	}
}

func (s *Server) isSuperuserLocked(user string) bool {
	return user == s.creds[0].Username
}

// knownSeries are the boot images the simulated region has.
func knownSeries(v string) (string, bool) {
	switch strings.TrimPrefix(v, "ubuntu/") {
	case "focal", "20.04":
		return "focal", true
	case "jammy", "22.04":
		return "jammy", true
	case "noble", "24.04":
		return "noble", true
	}
	return "", false
}

// deploy is POST machines/{id}/?op=deploy.
func (s *Server) deploy(req *apiRequest, m *machine) {
	f := req.r.PostForm
	if m.status == StatusReady {
		if m.owner != "" && m.owner != req.user {
			writeText(req.w, http.StatusConflict, "Can't allocate a machine belonging to another user.")
			return
		}
		s.acquireLocked(m, req.now, req.user, f.Get("agent_name"), f.Get("comment"))
	}
	if m.status != StatusAllocated {
		writeText(req.w, http.StatusConflict, fmt.Sprintf("Can't deploy a machine that is in the '%s' state", m.status))
		return
	}
	errs := formErrors{}
	series := f.Get("distro_series")
	if series == "" {
		series = "jammy"
	}
	distro, ok := knownSeries(series)
	if !ok {
		errs.add("distro_series", fmt.Sprintf("'%s' is not a valid distro_series.  It should be one of: '', 'ubuntu/focal', 'ubuntu/jammy', 'ubuntu/noble'.", series))
	}
	userData, err := decodeBase64(f.Get("user_data"))
	if err != nil {
		errs.add("user_data", "Enter valid base64-encoded data.")
	}
	if len(errs) > 0 {
		writeFormErrors(req.w, errs)
		return
	}
	if v := f.Get("agent_name"); v != "" {
		m.agentName = v
	}
	s.deploys = append(s.deploys, Deploy{
		At: req.now, SystemID: m.id(), User: req.user, DistroSeries: "ubuntu/" + distro,
		UserData: string(userData), AgentName: f.Get("agent_name"), Comment: f.Get("comment"),
	})
	m.deployCount++
	s.emitLocked(m, req.now, req.user, "User starting deployment", "DEBUG", requestDescription(req.user, f.Get("comment")))
	m.osystem, m.distro = "ubuntu", distro
	m.hweKernel = f.Get("hwe_kernel")
	m.install = s.newScriptSetLocked(m, 1, req.now)
	m.powerState = "on"
	s.setStatusLocked(m, req.now, StatusDeploying)
	s.emitLocked(m, req.now, "", "Deploying", "INFO", "")
	m.message = "Deploying"
	s.startPhaseLocked(m, req.now, phaseDeploying, s.timing.Deploy)
	writeJSON(req.w, http.StatusOK, s.renderMachineLocked(m))
}

// release is POST machines/{id}/?op=release.
func (s *Server) release(req *apiRequest, m *machine) {
	f := req.r.PostForm
	switch {
	case m.status == StatusReleasing || m.status == StatusReady:
		// Already releasing or released: the postcondition holds.
	case m.status.releasable():
		comment := f.Get("comment")
		if parseBool(f.Get("erase")) {
			dur := s.timing.EraseFull
			switch secure, quick := parseBool(f.Get("secure_erase")), parseBool(f.Get("quick_erase")); {
			case secure:
				dur = s.timing.EraseSecure
			case quick:
				dur = s.timing.EraseQuick
			}
			s.emitLocked(m, req.now, req.user, "User erasing disk", "DEBUG", requestDescription(req.user, comment))
			s.stopPhaseLocked(m)
			s.setStatusLocked(m, req.now, StatusDiskErasing)
			s.emitLocked(m, req.now, "", "Erasing disk", "INFO", "")
			m.message = "Erasing disk"
			m.powerState = "on"
			s.startPhaseLocked(m, req.now, phaseErasing, dur)
		} else {
			s.emitLocked(m, req.now, req.user, "User releasing node", "DEBUG", requestDescription(req.user, comment))
			s.stopPhaseLocked(m)
			s.setStatusLocked(m, req.now, StatusReleasing)
			s.emitLocked(m, req.now, "", "Releasing", "INFO", "")
			m.message = "Releasing"
			s.startPhaseLocked(m, req.now, phaseReleasing, s.timing.Release)
		}
	default:
		writeText(req.w, http.StatusConflict, fmt.Sprintf("Machine cannot be released in its current state ('%s').", m.status))
		return
	}
	writeJSON(req.w, http.StatusOK, s.renderMachineLocked(m))
}

// commission is POST machines/{id}/?op=commission.
func (s *Server) commission(req *apiRequest, m *machine) {
	if !m.status.commissionable() {
		writeText(req.w, http.StatusConflict, fmt.Sprintf("Commission is not available because the machine is in the '%s' state.", m.status))
		return
	}
	s.startCommissioningLocked(m, req.now, req.user, req.r.PostForm.Get("comment"))
	writeJSON(req.w, http.StatusOK, s.renderMachineLocked(m))
}

func (s *Server) startCommissioningLocked(m *machine, at time.Time, user, comment string) {
	s.emitLocked(m, at, user, "User starting node commissioning", "DEBUG", requestDescription(user, comment))
	m.owner, m.agentName = "", ""
	m.annotations = map[string]string{}
	m.errorDesc = ""
	m.powerState = "on"
	set := s.newScriptSetLocked(m, 0, at)
	s.builtinResultsLocked(set, at)
	m.commission = set
	s.setStatusLocked(m, at, StatusCommissioning)
	s.emitLocked(m, at, "", "Commissioning", "INFO", "")
	m.message = "Commissioning"
	s.startPhaseLocked(m, at, phaseCommissioning, s.timing.Commission)
}

// nodeDevices is GET nodes/{id}/devices/.
func (s *Server) nodeDevices(req *apiRequest, id string) {
	if req.r.Method != http.MethodGet || req.op != "" {
		req.badOp()
		return
	}
	m := s.machineOr404(req, id)
	if m == nil {
		return
	}
	want := -1
	if v := req.r.Form.Get("hardware_type"); v != "" {
		t, ok := translateHardwareType(v)
		if !ok {
			writeText(req.w, http.StatusBadRequest, "Unknown hardware type "+v)
			return
		}
		want = t
	}
	out := []map[string]any{}
	if !m.commissioned() {
		writeJSON(req.w, http.StatusOK, out)
		return
	}
	n := 0
	bus := 0x18
	for _, g := range m.spec.GPUs {
		for i := 0; i < g.Count; i++ {
			n++
			dev := map[string]any{
				"id": n, "bus": 1, "bus_name": "PCIE", "hardware_type": 5, "hardware_type_name": "GPU",
				"system_id": m.id(), "numa_node": i * 2 / max(g.Count, 1), "physical_blockdevice": nil, "physical_interface": nil,
				"vendor_id": g.VendorID, "product_id": g.ProductID, "vendor_name": "NVIDIA Corporation",
				"product_name": g.PCIName, "commissioning_driver": "", "bus_number": bus, "device_number": 0,
				"pci_address":  fmt.Sprintf("0000:%02x:00.0", bus),
				"resource_uri": fmt.Sprintf("/MAAS/api/2.0/nodes/%s/devices/%d/", m.id(), n),
			}
			if g.NvidiaSMI {
				dev["commissioning_driver"] = "nvidia"
			}
			bus += 0x10
			if want == -1 || want == 5 {
				out = append(out, dev)
			}
		}
	}
	for i, d := range m.spec.Disks {
		n++
		if want != -1 && want != 3 {
			continue
		}
		out = append(out, map[string]any{
			"id": n, "bus": 1, "bus_name": "PCIE", "hardware_type": 3, "hardware_type_name": "Storage",
			"system_id": m.id(), "numa_node": 0, "physical_interface": nil,
			"physical_blockdevice": s.blockDeviceJSON(m, i, d),
			"vendor_id":            "144d", "product_id": "a80a", "vendor_name": "Samsung Electronics Co Ltd",
			"product_name": d.Model, "commissioning_driver": "nvme", "bus_number": 0x80 + i, "device_number": 0,
			"pci_address":  fmt.Sprintf("0000:%02x:00.0", 0x80+i),
			"resource_uri": fmt.Sprintf("/MAAS/api/2.0/nodes/%s/devices/%d/", m.id(), n),
		})
	}
	writeJSON(req.w, http.StatusOK, out)
}

func (m *machine) commissioned() bool { return m.commission != nil && m.commission.status == 2 }

// nodeResults is GET nodes/{id}/results/.
func (s *Server) nodeResults(req *apiRequest, id string) {
	if req.r.Method != http.MethodGet || req.op != "" {
		req.badOp()
		return
	}
	m := s.machineOr404(req, id)
	if m == nil {
		return
	}
	f := req.r.Form
	wantType := -1
	if v := f.Get("type"); v != "" {
		switch strings.ToLower(v) {
		case "0", "commissioning", "commission":
			wantType = 0
		case "1", "installation", "install":
			wantType = 1
		case "2", "testing", "test":
			wantType = 2
		default:
			writeFormErrors(req.w, formErrors{"result_type": {"Result type must be commissioning, testing, or installation."}})
			return
		}
	}
	includeOutput := f.Has("include_output") && parseBool(f.Get("include_output"))
	var filters []string
	if v := f.Get("filters"); v != "" {
		filters = strings.Split(v, ",")
	}
	out := []map[string]any{}
	for _, set := range m.scriptSets {
		if wantType != -1 && set.resultType != wantType {
			continue
		}
		results := []map[string]any{}
		for _, r := range set.results {
			if len(filters) > 0 && !contains(filters, r.name) && !contains(filters, strconv.Itoa(r.id)) {
				continue
			}
			item := map[string]any{
				"id": r.id, "created": fmtTime(r.started), "updated": fmtTime(r.ended), "name": r.name,
				"status": r.status, "status_name": resultStatusName(r.status), "exit_status": r.exit,
				"started": fmtTime(r.started), "ended": fmtTime(r.ended), "runtime": "0:00:01",
				"starttime": float64(r.started.UnixNano()) / 1e9, "endtime": float64(r.ended.UnixNano()) / 1e9,
				"estimated_runtime": "0:00:01", "parameters": map[string]any{}, "script_id": r.scriptID,
				"script_revision_id": r.revision, "suppressed": false,
			}
			if includeOutput {
				combined := append(append([]byte(nil), r.stdout...), r.stderr...)
				item["output"] = encodeBase64(combined)
				item["stdout"] = encodeBase64(r.stdout)
				item["stderr"] = encodeBase64(r.stderr)
				item["result"] = encodeBase64(nil)
			}
			results = append(results, item)
		}
		sort.Slice(results, func(i, j int) bool { return results[i]["name"].(string) < results[j]["name"].(string) })
		out = append(out, map[string]any{
			"id": set.id, "system_id": m.id(), "type": set.resultType, "type_name": resultTypeName(set.resultType),
			"last_ping": fmtTime(set.ended), "status": set.status, "status_name": resultStatusName(set.status),
			"started": fmtTime(set.started), "ended": fmtTime(set.ended), "runtime": "0:00:05",
			"results": results, "suppressed": false,
			"resource_uri": fmt.Sprintf("/MAAS/api/2.0/nodes/%s/results/%d/", m.id(), set.id),
		})
	}
	writeJSON(req.w, http.StatusOK, out)
}

func resultTypeName(t int) string {
	return [...]string{"Commissioning", "Installation", "Testing", "Release"}[t]
}

func resultStatusName(st int) string {
	switch st {
	case 0:
		return "Pending"
	case 1:
		return "Running"
	case 2:
		return "Passed"
	case 3:
		return "Failed"
	}
	return "Unknown"
}

// fmtTime is MAAS's API time format.
func fmtTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format("Mon, 02 Jan. 2006 15:04:05")
}

// eventsQuery is GET events/?op=query.
func (s *Server) eventsQuery(req *apiRequest) {
	f := req.r.Form
	limit := 100
	if v := f.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			writeText(req.w, http.StatusBadRequest, "Invalid limit: "+v)
			return
		}
		limit = min(n, 1000)
	}
	level := "INFO"
	if v := f.Get("level"); v != "" {
		if levelNumber(v) < 0 {
			writeText(req.w, http.StatusBadRequest, "Unrecognised log level: "+v)
			return
		}
		level = strings.ToUpper(v)
	}
	after, before := -1, -1
	if v := f.Get("after"); v != "" {
		after, _ = strconv.Atoi(v)
	}
	if v := f.Get("before"); v != "" {
		before, _ = strconv.Atoi(v)
	}
	for _, id := range f["id"] {
		if m, ok := s.machines[id]; ok {
			s.advanceLocked(m, req.now)
		}
	}
	var picked []*event
	ascending := after >= 0
	iter := func(e *event) bool {
		if ids := f["id"]; len(ids) > 0 && !contains(ids, e.node) {
			return true
		}
		if hs := f["hostname"]; len(hs) > 0 && !contains(hs, e.hostname) {
			return true
		}
		if levelNumber(e.level) < levelNumber(level) {
			return true
		}
		if after >= 0 && e.id <= after || before >= 0 && e.id >= before {
			return true
		}
		picked = append(picked, e)
		return len(picked) < limit
	}
	if ascending {
		for _, e := range s.events {
			if !iter(e) {
				break
			}
		}
		for i, j := 0, len(picked)-1; i < j; i, j = i+1, j-1 {
			picked[i], picked[j] = picked[j], picked[i]
		}
	} else {
		for i := len(s.events) - 1; i >= 0; i-- {
			if !iter(s.events[i]) {
				break
			}
		}
	}
	events := make([]map[string]any, 0, len(picked))
	for _, e := range picked {
		user := e.username
		if user == "" {
			user = "unknown"
		}
		events = append(events, map[string]any{
			"username": user, "node": e.node, "hostname": e.hostname, "id": e.id, "level": e.level,
			"created": fmtTime(e.created), "type": e.typ, "description": e.description,
		})
	}
	out := map[string]any{"count": len(events), "events": events, "next_uri": "", "prev_uri": ""}
	if len(picked) > 0 {
		q := req.r.URL.Query()
		q.Del("after")
		q.Del("before")
		q.Set("op", "query")
		q.Set("limit", strconv.Itoa(limit))
		q.Set("after", strconv.Itoa(picked[0].id))
		out["next_uri"] = APIPrefix + "events/?" + q.Encode()
		q.Del("after")
		q.Set("before", strconv.Itoa(picked[len(picked)-1].id))
		out["prev_uri"] = APIPrefix + "events/?" + q.Encode()
	}
	writeJSON(req.w, http.StatusOK, out)
}
