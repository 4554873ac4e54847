// Package runtime is the node agent's loop: enroll once with a single-use
// token and a CSR (the private key is made here and never leaves the node),
// then, over mTLS, heartbeat with the node's facts, renew the certificate at
// two thirds of its lifetime, long-poll for tasks, verify each task's
// signature before running its compiled handler, and report the result until
// the core accepts it.
package runtime

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/agent/protocol"
	"github.com/gpuaas/gpuaas/agent/tasks"
)

// Config is what the agent needs.
type Config struct {
	// CoreURL is the core's agent endpoint (https://core:8443).
	CoreURL string
	// CoreCA is the PEM bundle the agent trusts for the core's server
	// certificate; empty uses the system roots.
	CoreCA []byte
	// StateDir keeps the key and certificate (0700; files 0600).
	StateDir string
	// Token is the single-use enrollment token (needed only until enrolled).
	Token string
	// PollWait is how long one task poll waits on the core (default 30s).
	PollWait time.Duration
	// System is where the task handlers act.
	System *tasks.System
	Log    hclog.Logger
	// Now is the clock (tests).
	Now func() time.Time
}

// Agent is a running node agent.
type Agent struct {
	cfg      Config
	log      hclog.Logger
	cert     atomic.Pointer[tls.Certificate]
	notAfter atomic.Pointer[time.Time]
	nodeID   string
	client   *http.Client // mTLS with the agent's certificate
	// enrollClient enrolls, without a certificate (protocol.EnrollALPN).
	enrollClient *http.Client
	handlers     map[string]tasks.Handler

	mu       sync.Mutex
	verifier *protocol.Verifier
	interval time.Duration
}

// New returns an agent; Run enrolls it if it has no certificate yet.
func New(cfg Config) (*Agent, error) {
	if cfg.Log == nil {
		cfg.Log = hclog.NewNullLogger()
	}
	if cfg.PollWait == 0 {
		cfg.PollWait = 30 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.System == nil {
		cfg.System = &tasks.System{}
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("agent: state dir: %w", err)
	}
	if err := os.Chmod(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("agent: state dir: %w", err)
	}
	a := &Agent{cfg: cfg, log: cfg.Log, handlers: tasks.Handlers(cfg.System), interval: 15 * time.Second,
		verifier: &protocol.Verifier{Now: cfg.Now, Nonces: &protocol.NonceCache{}}}
	roots, err := x509.SystemCertPool()
	if err != nil || len(cfg.CoreCA) > 0 {
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(cfg.CoreCA) {
			return nil, errors.New("agent: the core CA bundle holds no certificate")
		}
	}
	a.enrollClient = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs:    roots,
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{protocol.EnrollALPN, "http/1.1"},
	}}}
	a.client = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs:    roots,
		MinVersion: tls.VersionTLS13,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			if c := a.cert.Load(); c != nil {
				return c, nil
			}
			return &tls.Certificate{}, nil
		},
	}}}
	return a, nil
}

func (a *Agent) path(name string) string { return filepath.Join(a.cfg.StateDir, name) }

// StateDir is where the agent keeps its key and certificate.
func (a *Agent) StateDir() string { return a.cfg.StateDir }

// NodeID is the node the agent's certificate names ("" before enrollment).
func (a *Agent) NodeID() string { return a.nodeID }

// newCSR makes a fresh P-256 key and a CSR for it.
func newCSR() (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, nil, err
	}
	return key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// install keeps a new certificate with its key, on disk (0600) and in use.
func (a *Agent) install(key *ecdsa.PrivateKey, c *protocol.Certificate) error {
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	pair, err := tls.X509KeyPair([]byte(c.CertPEM), keyPEM)
	if err != nil {
		return fmt.Errorf("agent: the certificate does not match the key: %w", err)
	}
	for name, data := range map[string][]byte{"agent.key": keyPEM, "agent.crt": []byte(c.CertPEM), "ca.crt": []byte(c.CAChainPEM)} {
		tmp := a.path(name + ".tmp")
		if err := os.WriteFile(tmp, data, 0o600); err != nil {
			return err
		}
		if err := os.Rename(tmp, a.path(name)); err != nil {
			return err
		}
	}
	a.nodeID = c.NodeID
	na := c.NotAfter
	a.notAfter.Store(&na)
	a.cert.Store(&pair)
	a.setKeys(c.TaskKeys, c.MinTaskKeyVersion)
	// TLS presents a client certificate per connection: later calls must
	// open connections with this one.
	a.client.CloseIdleConnections()
	return nil
}

// setKeys takes the core's task keys and its minimum version, which only
// grows: a retired version stays retired.
func (a *Agent) setKeys(keys map[int]ed25519.PublicKey, minVersion int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.verifier.MinKeyVersion = max(a.verifier.MinKeyVersion, minVersion)
	if len(keys) == 0 {
		return
	}
	a.verifier.NodeID = a.nodeID
	a.verifier.Keys = keys
}

// load reads a certificate kept by an earlier run.
func (a *Agent) load() (bool, error) {
	pair, err := tls.LoadX509KeyPair(a.path("agent.crt"), a.path("agent.key"))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return false, err
	}
	id, err := protocol.NodeIDOf(leaf)
	if err != nil {
		return false, err
	}
	a.nodeID = id
	na := leaf.NotAfter
	a.notAfter.Store(&na)
	a.cert.Store(&pair)
	a.mu.Lock()
	a.verifier.NodeID = id
	a.mu.Unlock()
	return true, nil
}

func (a *Agent) post(ctx context.Context, path string, body, out any) error {
	return a.postWith(ctx, a.client, path, body, out)
}

func (a *Agent) postWith(ctx context.Context, c *http.Client, path string, body, out any) error {
	b, err := json.Marshal(body)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, a.cfg.CoreURL+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	return a.doWith(c, req, out)
}

// StatusError is a refusal by the core.
type StatusError struct {
	Status int
	Body   string
}

func (e *StatusError) Error() string { return fmt.Sprintf("core answered %d: %s", e.Status, e.Body) }

func (a *Agent) do(req *http.Request, out any) error { return a.doWith(a.client, req, out) }

func (a *Agent) doWith(c *http.Client, req *http.Request, out any) error {
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		return &StatusError{Status: resp.StatusCode, Body: string(body)}
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(body, out)
}

// Enroll trades the token and a fresh CSR for a certificate.
func (a *Agent) Enroll(ctx context.Context) error {
	if a.cfg.Token == "" {
		return errors.New("agent: not enrolled and no enrollment token given")
	}
	key, csr, err := newCSR()
	if err != nil {
		return err
	}
	var c protocol.Certificate
	if err := a.postWith(ctx, a.enrollClient, "/agent/v1/enroll", protocol.Enrollment{Token: a.cfg.Token, CSRPEM: string(csr)}, &c); err != nil {
		return fmt.Errorf("agent: enroll: %w", err)
	}
	if err := a.install(key, &c); err != nil {
		return err
	}
	a.log.Info("enrolled", "node", c.NodeID, "not_after", c.NotAfter)
	a.trustSSH(ctx, c.SSHUserCAKeys)
	return nil
}

// Renew gets a new certificate for a new key over the current mTLS session.
func (a *Agent) Renew(ctx context.Context) error {
	key, csr, err := newCSR()
	if err != nil {
		return err
	}
	var c protocol.Certificate
	if err := a.post(ctx, "/agent/v1/renew", protocol.Renewal{CSRPEM: string(csr)}, &c); err != nil {
		return fmt.Errorf("agent: renew: %w", err)
	}
	if err := a.install(key, &c); err != nil {
		return err
	}
	a.log.Info("certificate renewed", "not_after", c.NotAfter)
	a.trustSSH(ctx, c.SSHUserCAKeys)
	return nil
}

// renewAt is two thirds into the certificate's lifetime.
func (a *Agent) renewAt() time.Time {
	c := a.cert.Load()
	if c == nil || c.Leaf == nil {
		if c != nil && len(c.Certificate) > 0 {
			if leaf, err := x509.ParseCertificate(c.Certificate[0]); err == nil {
				return leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) * 2 / 3)
			}
		}
		return a.cfg.Now()
	}
	return c.Leaf.NotBefore.Add(c.Leaf.NotAfter.Sub(c.Leaf.NotBefore) * 2 / 3)
}

// trustSSH has the node's sshd accept the core's tenant certificates. A
// failure is logged and retried with the next heartbeat: the agent's own
// work does not depend on it.
func (a *Agent) trustSSH(ctx context.Context, caKeys []string) {
	changed, err := a.cfg.System.InstallSSHTrust(ctx, caKeys)
	switch {
	case err != nil:
		a.log.Warn("installing the SSH CA trust", "error", err)
	case changed:
		a.log.Info("sshd trusts the SSH CA", "keys", len(caKeys))
	}
}

// Heartbeat reports the node's facts and takes the task keys and the
// interval the core wants.
func (a *Agent) Heartbeat(ctx context.Context) error {
	f, err := tasks.CollectFacts(ctx, "")
	if err != nil {
		a.log.Warn("collecting facts", "error", err)
	}
	var reply protocol.HeartbeatReply
	if err := a.post(ctx, "/agent/v1/heartbeat", protocol.Heartbeat{Facts: f}, &reply); err != nil {
		return fmt.Errorf("agent: heartbeat: %w", err)
	}
	a.setKeys(reply.TaskKeys, reply.MinTaskKeyVersion)
	a.trustSSH(ctx, reply.SSHUserCAKeys)
	if reply.Interval > 0 {
		a.mu.Lock()
		a.interval = reply.Interval
		a.mu.Unlock()
	}
	return nil
}

// Poll waits for tasks and runs them, reporting each result.
func (a *Agent) Poll(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s/agent/v1/tasks?wait=%s", a.cfg.CoreURL, a.cfg.PollWait), nil)
	if err != nil {
		return err
	}
	var p protocol.Poll
	if err := a.do(req, &p); err != nil {
		return fmt.Errorf("agent: poll: %w", err)
	}
	for _, st := range p.Tasks {
		a.runTask(ctx, st)
	}
	return nil
}

// runTask verifies and runs one task and reports its result until the core
// accepts it (or ctx ends).
func (a *Agent) runTask(ctx context.Context, st protocol.SignedTask) {
	verify := func() error {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.verifier.Verify(st)
	}
	err := verify()
	if errors.Is(err, protocol.ErrUnknownKey) {
		// The task key rotated since the last heartbeat: a heartbeat now
		// brings the new version's public key.
		if herr := a.Heartbeat(ctx); herr != nil {
			a.log.Warn("fetching the task keys", "error", herr)
		} else {
			err = verify()
		}
	}
	res := protocol.Result{Outcome: protocol.ResultSucceeded}
	if err != nil {
		a.log.Warn("task refused", "task", st.Task.ID, "type", st.Task.Type, "error", err)
		res = protocol.Result{Outcome: protocol.ResultFailed, Error: "refused: " + err.Error()}
	} else if out, err := a.handlers[st.Task.Type].Run(ctx, st.Task.Params); err != nil {
		a.log.Warn("task failed", "task", st.Task.ID, "type", st.Task.Type, "error", err)
		res = protocol.Result{Outcome: protocol.ResultFailed, Error: err.Error()}
	} else {
		res.Output = out
		a.log.Info("task done", "task", st.Task.ID, "type", st.Task.Type)
	}
	pause := 100 * time.Millisecond
	for {
		err := a.post(ctx, "/agent/v1/tasks/"+st.Task.ID+"/result", res, nil)
		var se *StatusError
		if err == nil || (errors.As(err, &se) && se.Status < 500 && se.Status != http.StatusTooManyRequests) {
			if err != nil {
				a.log.Warn("result refused", "task", st.Task.ID, "error", err)
			}
			return
		}
		a.log.Warn("reporting a result failed; retrying", "task", st.Task.ID, "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(pause):
		}
		pause = min(pause*2, 30*time.Second)
	}
}

// ErrRevoked ends Run when the core refuses the agent's certificate (401):
// the node was retired, or enrolled again with another agent. Retrying
// cannot help, so the agent stops, and sets its certificate aside so that
// its next start enrolls with the token it is given.
var ErrRevoked = errors.New("agent: the core no longer accepts this agent's certificate (the node was retired, or enrolled again); " +
	"the certificate was set aside (agent.crt.revoked): start the agent with a new enrollment token")

// refused reports whether err is the core's 401 to the agent's certificate.
func refused(err error) bool {
	var se *StatusError
	return errors.As(err, &se) && se.Status == http.StatusUnauthorized
}

// setAside renames the kept certificate and key to *.revoked.
func (a *Agent) setAside() error {
	for _, name := range []string{"agent.crt", "agent.key"} {
		if err := os.Rename(a.path(name), a.path(name+".revoked")); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("agent: set aside the revoked %s: %w", name, err)
		}
	}
	return nil
}

// Run enrolls when needed, then heartbeats, renews and polls until ctx ends,
// or until the core refuses the certificate (ErrRevoked).
func (a *Agent) Run(parent context.Context) error {
	ok, err := a.load()
	if err != nil {
		return fmt.Errorf("agent: kept certificate: %w", err)
	}
	if !ok {
		if err := a.Enroll(parent); err != nil {
			return err
		}
	}
	ctx, stop := context.WithCancelCause(parent)
	defer stop(nil)
	// check stops everything on a 401 and reports whether err is one.
	check := func(what string, err error) bool {
		if !refused(err) {
			return false
		}
		a.log.Error("the core refused this agent's certificate; stopping", "call", what, "error", err)
		stop(ErrRevoked)
		return true
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for ctx.Err() == nil {
			if err := a.Heartbeat(ctx); err != nil && ctx.Err() == nil && !check("heartbeat", err) {
				a.log.Warn("heartbeat", "error", err)
			}
			a.mu.Lock()
			d := a.interval
			a.mu.Unlock()
			sleep(ctx, d)
		}
	})
	wg.Go(func() {
		for ctx.Err() == nil {
			if d := time.Until(a.renewAt()); d > 0 {
				sleep(ctx, d)
				continue
			}
			if err := a.Renew(ctx); err != nil && ctx.Err() == nil && !check("renewal", err) {
				a.log.Warn("renewal", "error", err)
				sleep(ctx, 5*time.Second)
			}
		}
	})
	backoff := time.Second
	for ctx.Err() == nil {
		if err := a.Poll(ctx); err != nil && ctx.Err() == nil {
			if check("task poll", err) {
				break
			}
			a.log.Warn("task poll", "error", err)
			sleep(ctx, backoff)
			backoff = min(backoff*2, 30*time.Second)
			continue
		}
		backoff = time.Second
	}
	wg.Wait()
	if errors.Is(context.Cause(ctx), ErrRevoked) {
		if err := a.setAside(); err != nil {
			return errors.Join(ErrRevoked, err)
		}
		return ErrRevoked
	}
	return nil
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
