// Package nomadsim is a double of the Nomad HTTP API: exactly the job
// endpoints the manual driver uses, with Nomad's JSON shapes, status codes
// and error texts, and state that behaves like a small cluster's.
//
//	PUT|POST /v1/jobs                 register (or update) a job
//	PUT|POST /v1/job/{id}             the same, the id must match
//	GET      /v1/job/{id}             read a job; 404 "job not found"
//	GET      /v1/job/{id}/allocations the job's allocations (?all=true: also
//	                                  those of an earlier job with the id)
//	DELETE   /v1/job/{id}             deregister (?purge=true: forget it)
//
// A registered job whose spec changed gets a new version and evaluation, and
// its allocation is replaced; re-registering an unchanged spec only creates
// an evaluation. An allocation is placed when a client node satisfies the
// job's ${node.unique.name} constraint and datacenters; it is "pending" for
// the start delay, then "running". Job validation errors are Nomad's: a 500
// whose body is a go-multierror list. With a token set, ACLs are on: no
// X-Nomad-Token is the anonymous token ("Permission denied", 403), an
// unknown one "ACL token not found" (403). A region other than the
// server's is "No path to region" (500).
//
// Controls (Go methods): faults, latency, failing an allocation, the call
// log, the jobs and allocations as Nomad would report them.
package nomadsim

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	nomad "github.com/hashicorp/nomad/api"
)

// Node is a client node of the simulated cluster.
type Node struct {
	Name       string
	Datacenter string
}

// Call is one request the double received.
type Call struct {
	Method    string
	Path      string
	Namespace string
	Region    string
	// Token says whether the request carried an ACL token the double knows.
	Token bool
	// Status is the HTTP status answered.
	Status int
}

// Fault makes matching requests fail.
type Fault struct {
	// Method and Path (a prefix of the URL path) select requests; empty
	// matches any.
	Method string
	Path   string
	// Status and Body are the answer; Body is Nomad's plain-text error.
	Status int
	Body   string
	// Times is how many requests fail; 0 means one.
	Times int
}

// Server is the Nomad API double. It implements http.Handler.
type Server struct {
	mu         sync.Mutex
	now        func() time.Time
	token      string
	region     string
	namespaces []string
	nodes      []Node // nil: every node name exists, in the job's first datacenter
	startDelay time.Duration
	latency    time.Duration
	index      uint64
	jobs       map[jobKey]*jobState
	allocs     []*alloc
	faults     []*Fault
	calls      []Call
}

var _ http.Handler = (*Server)(nil)

type jobKey struct{ namespace, id string }

type jobState struct {
	job  *nomad.Job
	spec []byte // the canonical submitted spec, to tell an update
}

type alloc struct {
	stub      nomad.AllocationListStub
	jobCreate uint64 // CreateIndex of the job instance it belongs to
	task      string
	created   time.Time
	stopped   *time.Time
	failed    string
	failedAt  time.Time
}

// Option configures a Server.
type Option func(*Server)

// WithToken turns ACLs on: requests must carry token as X-Nomad-Token.
func WithToken(token string) Option { return func(s *Server) { s.token = token } }

// WithRegion sets the server's region (default "global").
func WithRegion(r string) Option { return func(s *Server) { s.region = r } }

// WithNamespaces sets the namespaces that exist (default "default").
func WithNamespaces(ns ...string) Option { return func(s *Server) { s.namespaces = ns } }

// WithNodes sets the cluster's client nodes. Without it every node name a
// constraint asks for exists.
func WithNodes(nodes ...Node) Option { return func(s *Server) { s.nodes = nodes } }

// WithStartDelay sets how long an allocation is pending before it runs
// (default 100ms).
func WithStartDelay(d time.Duration) Option { return func(s *Server) { s.startDelay = d } }

// WithClock sets the clock allocations age by.
func WithClock(now func() time.Time) Option { return func(s *Server) { s.now = now } }

// New returns a double with no jobs.
func New(opts ...Option) *Server {
	s := &Server{
		now:        time.Now,
		region:     "global",
		namespaces: []string{"default"},
		startDelay: 100 * time.Millisecond,
		index:      10,
		jobs:       map[jobKey]*jobState{},
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

// SetStartDelay changes how long new allocations stay pending.
func (s *Server) SetStartDelay(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.startDelay = d
}

// SetLatency delays every answer by d (or until the request is abandoned).
func (s *Server) SetLatency(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.latency = d
}

// InjectFault makes the next matching requests fail.
func (s *Server) InjectFault(f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f.Times <= 0 {
		f.Times = 1
	}
	s.faults = append(s.faults, &f)
}

// Calls returns the requests received so far.
func (s *Server) Calls() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.calls)
}

// Job returns a job as GET /v1/job/{id} would.
func (s *Server) Job(namespace, id string) (*nomad.Job, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	js, ok := s.jobs[jobKey{namespace, id}]
	if !ok {
		return nil, false
	}
	return s.jobView(js), true
}

// Jobs returns every job, as GET /v1/job/{id} would.
func (s *Server) Jobs() []*nomad.Job {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*nomad.Job, 0, len(s.jobs))
	for _, js := range s.jobs {
		out = append(out, s.jobView(js))
	}
	slices.SortFunc(out, func(a, b *nomad.Job) int { return strings.Compare(*a.ID, *b.ID) })
	return out
}

// Allocations returns a job's allocations (all of them, oldest first), as
// GET /v1/job/{id}/allocations?all=true would.
func (s *Server) Allocations(namespace, jobID string) []*nomad.AllocationListStub {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*nomad.AllocationListStub
	for _, a := range s.allocs {
		if a.stub.Namespace == namespace && a.stub.JobID == jobID {
			out = append(out, s.allocView(a))
		}
	}
	return out
}

// FailAllocation makes the job's current allocation fail as a task driver
// failure with message (say, the agent binary is missing). It reports
// whether there was one.
func (s *Server) FailAllocation(namespace, jobID, message string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := len(s.allocs) - 1; i >= 0; i-- {
		a := s.allocs[i]
		if a.stub.Namespace == namespace && a.stub.JobID == jobID && a.stopped == nil && a.failed == "" {
			s.index++
			a.failed, a.failedAt = message, s.now()
			a.stub.ModifyIndex = s.index
			return true
		}
	}
	return false
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	latency := s.latency
	s.mu.Unlock()
	if latency > 0 {
		t := time.NewTimer(latency)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	rec := &recorder{ResponseWriter: w, status: http.StatusOK}
	call := Call{Method: r.Method, Path: r.URL.Path, Namespace: r.URL.Query().Get("namespace"), Region: r.URL.Query().Get("region")}
	s.serve(rec, r, &call)
	call.Status = rec.status
	s.mu.Lock()
	s.calls = append(s.calls, call)
	s.mu.Unlock()
}

type recorder struct {
	http.ResponseWriter
	status int
}

func (r *recorder) WriteHeader(code int) {
	r.status = code
	r.ResponseWriter.WriteHeader(code)
}

// httpError is an answer with Nomad's plain-text error body.
type httpError struct {
	code int
	msg  string
}

// Nomad's error texts.
const (
	errPermissionDenied = "Permission denied"
	errTokenNotFound    = "ACL token not found"
	errJobNotFound      = "job not found"
	errInvalidMethod    = "Invalid method"
	errNoRegionPath     = "No path to region"
)

func (s *Server) serve(w http.ResponseWriter, r *http.Request, call *Call) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f := s.fault(r); f != nil {
		s.writeError(w, &httpError{f.Status, f.Body})
		return
	}
	call.Token = s.token == "" || s.tokenOf(r) == s.token
	if herr := s.authorize(r); herr != nil {
		s.writeError(w, herr)
		return
	}
	if region := r.URL.Query().Get("region"); region != "" && region != s.region && region != nomad.GlobalRegion {
		s.writeError(w, &httpError{http.StatusInternalServerError, errNoRegionPath})
		return
	}
	parts, ok := splitPath(r.URL.EscapedPath())
	var out any
	var herr *httpError
	switch {
	case !ok:
		herr = &httpError{http.StatusNotFound, ""}
	case len(parts) == 2 && parts[1] == "jobs":
		switch r.Method {
		case http.MethodPut, http.MethodPost:
			out, herr = s.register(r, "")
		default:
			herr = &httpError{http.StatusMethodNotAllowed, errInvalidMethod}
		}
	case len(parts) == 3 && parts[1] == "job":
		switch r.Method {
		case http.MethodGet:
			out, herr = s.getJob(r, parts[2])
		case http.MethodPut, http.MethodPost:
			out, herr = s.register(r, parts[2])
		case http.MethodDelete:
			out, herr = s.deregister(r, parts[2])
		default:
			herr = &httpError{http.StatusMethodNotAllowed, errInvalidMethod}
		}
	case len(parts) == 4 && parts[1] == "job" && parts[3] == "allocations":
		if r.Method != http.MethodGet {
			herr = &httpError{http.StatusMethodNotAllowed, errInvalidMethod}
			break
		}
		out, herr = s.jobAllocations(r, parts[2])
	default:
		herr = &httpError{http.StatusNotFound, ""}
	}
	if herr != nil {
		s.writeError(w, herr)
		return
	}
	s.setMeta(w)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_ = json.NewEncoder(w).Encode(out)
}

// splitPath splits "/v1/job/<escaped id>/allocations" into unescaped parts.
func splitPath(p string) ([]string, bool) {
	raw := strings.Split(strings.TrimPrefix(p, "/"), "/")
	if len(raw) < 2 || raw[0] != "v1" {
		return nil, false
	}
	out := make([]string, len(raw))
	for i, part := range raw {
		u, err := url.PathUnescape(part)
		if err != nil || u == "" {
			return nil, false
		}
		out[i] = u
	}
	return out, true
}

func (s *Server) fault(r *http.Request) *Fault {
	for i, f := range s.faults {
		if (f.Method == "" || f.Method == r.Method) && strings.HasPrefix(r.URL.Path, f.Path) {
			f.Times--
			if f.Times <= 0 {
				s.faults = append(s.faults[:i], s.faults[i+1:]...)
			}
			return f
		}
	}
	return nil
}

// tokenOf is the ACL token a request carries: X-Nomad-Token, else a bearer
// token, as Nomad reads them.
func (s *Server) tokenOf(r *http.Request) string {
	if t := r.Header.Get("X-Nomad-Token"); t != "" {
		return t
	}
	if t, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
		return strings.TrimSpace(t)
	}
	return ""
}

func (s *Server) authorize(r *http.Request) *httpError {
	if s.token == "" {
		return nil
	}
	switch t := s.tokenOf(r); {
	case t == "":
		// The anonymous token, which has no policy here.
		return &httpError{http.StatusForbidden, errPermissionDenied}
	case t != s.token:
		return &httpError{http.StatusForbidden, errTokenNotFound}
	}
	return nil
}

func (s *Server) setMeta(w http.ResponseWriter) {
	w.Header().Set("X-Nomad-Index", strconv.FormatUint(s.index, 10))
	w.Header().Set("X-Nomad-KnownLeader", "true")
	w.Header().Set("X-Nomad-LastContact", "0")
}

func (s *Server) writeError(w http.ResponseWriter, e *httpError) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(e.code)
	_, _ = io.WriteString(w, e.msg)
}

// namespaceOf is the namespace of a request: the query's, else def, else
// "default".
func namespaceOf(r *http.Request, def string) string {
	if ns := r.URL.Query().Get("namespace"); ns != "" {
		return ns
	}
	if def != "" {
		return def
	}
	return "default"
}

func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// registerResponse is Nomad's JobRegisterResponse.
type registerResponse struct {
	EvalID          string
	EvalCreateIndex uint64
	JobModifyIndex  uint64
	Warnings        string
	Index           uint64
	LastContact     int64
	KnownLeader     bool
	NextToken       string
}

// deregisterResponse is Nomad's JobDeregisterResponse.
type deregisterResponse struct {
	EvalID          string
	EvalCreateIndex uint64
	JobModifyIndex  uint64
	VolumeEvalID    string
	VolumeEvalIndex uint64
	Index           uint64
	LastContact     int64
	KnownLeader     bool
	NextToken       string
}

func (s *Server) register(r *http.Request, pathID string) (any, *httpError) {
	var req nomad.JobRegisterRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 8<<20)).Decode(&req); err != nil {
		return nil, &httpError{http.StatusBadRequest, err.Error()}
	}
	switch {
	case req.Job == nil:
		return nil, &httpError{http.StatusBadRequest, "Job must be specified"}
	case req.Job.ID == nil:
		return nil, &httpError{http.StatusBadRequest, "Job ID hasn't been provided"}
	case pathID != "" && *req.Job.ID != pathID:
		return nil, &httpError{http.StatusBadRequest, "Job ID does not match name"}
	}
	job := req.Job
	ns := r.URL.Query().Get("namespace")
	if ns == "" {
		ns = req.Namespace
	}
	if ns == "" && job.Namespace != nil {
		ns = *job.Namespace
	}
	if ns == "" {
		ns = "default"
	}
	region := r.URL.Query().Get("region")
	if region == "" {
		region = req.Region
	}
	if region == "" && job.Region != nil {
		region = *job.Region
	}
	if region != "" && region != nomad.GlobalRegion && region != s.region {
		return nil, &httpError{http.StatusInternalServerError, errNoRegionPath}
	}
	job.Canonicalize()
	job.Namespace, job.Region = &ns, &s.region
	if errs := validate(job, s.namespaces); len(errs) > 0 {
		return nil, &httpError{http.StatusInternalServerError, multiError(errs)}
	}
	spec, err := json.Marshal(job)
	if err != nil {
		return nil, &httpError{http.StatusInternalServerError, err.Error()}
	}
	key := jobKey{ns, *job.ID}
	existing := s.jobs[key]
	if req.EnforceIndex {
		switch {
		case existing != nil && req.JobModifyIndex == 0:
			return nil, &httpError{http.StatusInternalServerError, "Enforcing job modify index 0: job already exists"}
		case existing != nil && req.JobModifyIndex != *existing.job.JobModifyIndex:
			return nil, &httpError{http.StatusInternalServerError, fmt.Sprintf("Enforcing job modify index %d: job exists with conflicting job modify index: %d",
				req.JobModifyIndex, *existing.job.JobModifyIndex)}
		case existing == nil && req.JobModifyIndex != 0:
			return nil, &httpError{http.StatusInternalServerError, fmt.Sprintf("Enforcing job modify index %d: job does not exist", req.JobModifyIndex)}
		}
	}
	now := s.now()
	resp := &registerResponse{EvalID: newUUID(), KnownLeader: true}
	if existing != nil && string(existing.spec) == string(spec) {
		// Unchanged: only a new evaluation, which places nothing new.
		s.index++
		resp.JobModifyIndex = *existing.job.JobModifyIndex
		resp.EvalCreateIndex, resp.Index = s.index, s.index
		return resp, nil
	}
	s.index++
	version, create := uint64(0), s.index
	if existing != nil {
		version = *existing.job.Version + 1
		create = *existing.job.CreateIndex
	}
	job.Status, job.StatusDescription = new("pending"), new("")
	job.Version, job.SubmitTime = new(version), new(now.UnixNano())
	job.CreateIndex, job.ModifyIndex, job.JobModifyIndex = new(create), new(s.index), new(s.index)
	job.Stable = new(false)
	s.jobs[key] = &jobState{job: job, spec: spec}
	resp.JobModifyIndex, resp.EvalCreateIndex, resp.Index = s.index, s.index, s.index
	s.place(job, resp.EvalID, now)
	return resp, nil
}

// place stops the job's running allocations and places a new one on the
// node its constraints allow, if there is one (otherwise the evaluation is
// blocked and nothing runs).
func (s *Server) place(job *nomad.Job, evalID string, now time.Time) {
	for _, a := range s.allocs {
		if a.stub.Namespace == *job.Namespace && a.stub.JobID == *job.ID && a.stopped == nil {
			a.stopped = &now
			a.stub.ModifyIndex = s.index
		}
	}
	if *job.Stop {
		return
	}
	for _, tg := range job.TaskGroups {
		node, ok := s.nodeFor(job, tg)
		if !ok {
			continue
		}
		for i := 0; i < *tg.Count; i++ {
			task := ""
			if len(tg.Tasks) > 0 {
				task = tg.Tasks[0].Name
			}
			s.allocs = append(s.allocs, &alloc{
				stub: nomad.AllocationListStub{
					ID: newUUID(), EvalID: evalID, Name: fmt.Sprintf("%s.%s[%d]", *job.ID, *tg.Name, i),
					Namespace: *job.Namespace, NodeID: nodeUUID(node.Name), NodeName: node.Name,
					JobID: *job.ID, JobType: *job.Type, JobVersion: *job.Version, TaskGroup: *tg.Name,
					DesiredStatus: nomad.AllocDesiredStatusRun, CreateIndex: s.index, ModifyIndex: s.index,
					CreateTime: now.UnixNano(), ModifyTime: now.UnixNano(),
				},
				jobCreate: *job.CreateIndex,
				task:      task,
				created:   now,
			})
		}
	}
}

// nodeFor finds a node that satisfies the job's and group's constraints
// on ${node.unique.name} and the job's datacenters.
func (s *Server) nodeFor(job *nomad.Job, tg *nomad.TaskGroup) (Node, bool) {
	want := ""
	for _, c := range append(slices.Clone(job.Constraints), tg.Constraints...) {
		if c.LTarget == "${node.unique.name}" && (c.Operand == "=" || c.Operand == "==" || c.Operand == "is") {
			want = c.RTarget
		}
	}
	dcOK := func(dc string) bool {
		for _, pattern := range job.Datacenters {
			if pattern == "*" || pattern == dc || (strings.HasSuffix(pattern, "*") && strings.HasPrefix(dc, strings.TrimSuffix(pattern, "*"))) {
				return true
			}
		}
		return len(job.Datacenters) == 0
	}
	if s.nodes == nil {
		if want == "" {
			want = "nomad-client-1"
		}
		dc := "dc1"
		if len(job.Datacenters) > 0 && !strings.Contains(job.Datacenters[0], "*") {
			dc = job.Datacenters[0]
		}
		return Node{Name: want, Datacenter: dc}, true
	}
	for _, n := range s.nodes {
		if (want == "" || n.Name == want) && dcOK(n.Datacenter) {
			return n, true
		}
	}
	return Node{}, false
}

// nodeUUID is a stable node id for a node name.
func nodeUUID(name string) string {
	var b [16]byte
	copy(b[:], name)
	for i := 16; i < len(name); i++ {
		b[i%16] ^= name[i]
	}
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

func (s *Server) getJob(r *http.Request, id string) (any, *httpError) {
	js, ok := s.jobs[jobKey{namespaceOf(r, ""), id}]
	if !ok {
		return nil, &httpError{http.StatusNotFound, errJobNotFound}
	}
	return s.jobView(js), nil
}

func (s *Server) jobAllocations(r *http.Request, id string) (any, *httpError) {
	ns := namespaceOf(r, "")
	all, _ := strconv.ParseBool(r.URL.Query().Get("all"))
	js := s.jobs[jobKey{ns, id}]
	out := []*nomad.AllocationListStub{}
	for _, a := range s.allocs {
		if a.stub.Namespace != ns || a.stub.JobID != id {
			continue
		}
		if !all && js != nil && a.jobCreate != *js.job.CreateIndex {
			continue
		}
		out = append(out, s.allocView(a))
	}
	return out, nil
}

func (s *Server) deregister(r *http.Request, id string) (any, *httpError) {
	purge, herr := parseBool(r, "purge")
	if herr != nil {
		return nil, herr
	}
	ns := namespaceOf(r, "")
	key := jobKey{ns, id}
	now := s.now()
	s.index++
	resp := &deregisterResponse{EvalID: newUUID(), EvalCreateIndex: s.index, Index: s.index, KnownLeader: true}
	js, ok := s.jobs[key]
	if !ok {
		return resp, nil
	}
	for _, a := range s.allocs {
		if a.stub.Namespace == ns && a.stub.JobID == id && a.stopped == nil {
			a.stopped = &now
			a.stub.ModifyIndex = s.index
		}
	}
	if purge {
		delete(s.jobs, key)
		return resp, nil
	}
	job := js.job
	job.Stop = new(true)
	job.Version = new(*job.Version + 1)
	job.ModifyIndex, job.JobModifyIndex = new(s.index), new(s.index)
	resp.JobModifyIndex = s.index
	return resp, nil
}

// parseBool reads a boolean query parameter; Nomad answers a bad one with
// a 500 and this text.
func parseBool(r *http.Request, name string) (bool, *httpError) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, &httpError{http.StatusInternalServerError, fmt.Sprintf("Failed to parse value of %q (%v) as a bool: %v", name, v, err)}
	}
	return b, nil
}

// jobView is a copy of a job with its status as of now.
func (s *Server) jobView(js *jobState) *nomad.Job {
	var j nomad.Job
	b, _ := json.Marshal(js.job)
	_ = json.Unmarshal(b, &j)
	status := "pending"
	switch {
	case *j.Stop:
		status = "dead"
	default:
		for _, a := range s.allocs {
			if a.stub.Namespace == *j.Namespace && a.stub.JobID == *j.ID && a.jobCreate == *j.CreateIndex && a.stopped == nil && a.failed == "" {
				status = "running"
			}
		}
	}
	j.Status = &status
	return &j
}

// allocView is an allocation's list stub as of now.
func (s *Server) allocView(a *alloc) *nomad.AllocationListStub {
	out := a.stub
	now := s.now()
	started := a.created.Add(s.startDelay)
	events := []*nomad.TaskEvent{
		{Type: nomad.TaskReceived, Time: a.created.UnixNano(), DisplayMessage: "Task received by client"},
		{Type: nomad.TaskSetup, Time: a.created.UnixNano(), DisplayMessage: "Building Task Directory"},
	}
	ts := &nomad.TaskState{State: "pending", Events: events}
	switch {
	case a.failed != "":
		ts.State, ts.Failed, ts.FinishedAt = "dead", true, a.failedAt
		ts.Events = append(ts.Events,
			&nomad.TaskEvent{Type: nomad.TaskDriverFailure, Time: a.failedAt.UnixNano(), DisplayMessage: a.failed},
			&nomad.TaskEvent{Type: nomad.TaskNotRestarting, Time: a.failedAt.UnixNano(), DisplayMessage: "Error was unrecoverable"})
		out.ClientStatus, out.ClientDescription = nomad.AllocClientStatusFailed, "Failed tasks"
		if a.stopped != nil {
			out.DesiredStatus, out.DesiredDescription = nomad.AllocDesiredStatusStop, "alloc not needed due to job update"
		}
	case a.stopped != nil:
		ts.State, ts.FinishedAt = "dead", *a.stopped
		ts.Events = append(ts.Events,
			&nomad.TaskEvent{Type: nomad.TaskKilling, Time: a.stopped.UnixNano(), DisplayMessage: "Sent interrupt. Waiting 30s before force killing"},
			&nomad.TaskEvent{Type: nomad.TaskKilled, Time: a.stopped.UnixNano(), DisplayMessage: "Task successfully killed"})
		out.DesiredStatus, out.DesiredDescription = nomad.AllocDesiredStatusStop, "alloc not needed due to job update"
		out.ClientStatus, out.ClientDescription = nomad.AllocClientStatusComplete, "All tasks have completed"
	case now.Before(started):
		out.ClientStatus, out.ClientDescription = nomad.AllocClientStatusPending, "No tasks have started"
	default:
		ts.State, ts.StartedAt = "running", started
		ts.Events = append(ts.Events, &nomad.TaskEvent{Type: nomad.TaskStarted, Time: started.UnixNano(), DisplayMessage: "Task started by client"})
		out.ClientStatus, out.ClientDescription = nomad.AllocClientStatusRunning, "Tasks are running"
		out.ModifyTime = started.UnixNano()
	}
	if a.task != "" {
		out.TaskStates = map[string]*nomad.TaskState{a.task: ts}
	}
	return &out
}
