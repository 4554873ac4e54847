package sdktest

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// ProvisionerSuite is the conformance suite of a provisioner driver.
type ProvisionerSuite struct {
	// Config returns a valid configuration (JSON-shaped values) for one
	// plugin instance, under which operations succeed.
	Config func(t testing.TB) map[string]any
	// Node returns the enroll request of the i-th node the driver can
	// bring in (the kit fills OperationID). The kit uses nodes 0 and 1;
	// it enrolls node 1 when the driver has the discover capability, and
	// unenrolls node 0 near the end when it has the unenroll capability.
	Node func(t testing.TB, i int) provisioner.EnrollRequest
	// Provision is the template of a provision request; the kit fills
	// OperationID and NodeID. User.Username is required.
	Provision provisioner.ProvisionRequest
	// OperationTimeout bounds the wait for an operation (default 30s).
	OperationTimeout time.Duration
	// SlowConfig, if set, returns a configuration under which Probe and
	// Status block for seconds unless their context ends; the kit uses it
	// to check cancellation in the middle of a call. Without it that check
	// runs in process only.
	SlowConfig func(t testing.TB) map[string]any
	// Webhook returns a valid, signed webhook reporting facts or health of
	// the enrolled node nodeID, as the backend would send it. Required when
	// the driver has the webhook capability.
	Webhook func(t testing.TB, nodeID string) provisioner.Webhook
}

// Run runs the suite against target.
func (s ProvisionerSuite) Run(t *testing.T, target Target) {
	t.Helper()
	if s.Config == nil || s.Node == nil {
		t.Fatal("ProvisionerSuite.Config and Node are required")
	}
	if s.Provision.User.Username == "" {
		t.Fatal("ProvisionerSuite.Provision.User.Username is required")
	}
	timeout := s.OperationTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	d := ConnectProvisioner(t, target)
	info := runBaseChecks(t, d, base.KindProvisioner, provisioner.SupportedAPIVersions(),
		[]string{base.CapabilityWebhook, base.CapabilityDiscover, base.CapabilityUnenroll}, s.Config(t))
	if t.Failed() {
		t.FailNow()
	}
	ids := newOpIDs(t)
	ctx := testContext(t)

	var caps *provisioner.Capabilities
	t.Run("capabilities", func(t *testing.T) {
		var err error
		caps, err = d.Capabilities(ctx)
		wantOK(t, "Capabilities", err)
		if len(caps.ReleaseModes) == 0 {
			t.Fatal("Capabilities lists no release mode")
		}
		for _, m := range caps.ReleaseModes {
			if !slices.Contains([]provisioner.ReleaseMode{provisioner.ReleaseRevoke, provisioner.ReleaseWipe, provisioner.ReleaseReimage}, m) {
				t.Errorf("Capabilities lists unknown release mode %q", m)
			}
		}
	})
	if caps == nil {
		t.FailNow()
	}

	node0, node1 := s.Node(t, 0), s.Node(t, 1)
	var enrolled *provisioner.Enrollment
	ok := t.Run("enroll", func(t *testing.T) {
		req := node0
		req.OperationID = ids.next("enroll")
		var err error
		enrolled, err = d.Enroll(ctx, &req)
		wantOK(t, "Enroll", err)
		checkFacts(t, &enrolled.Facts, req.NodeID)
		if len(enrolled.Secret) < 16 {
			t.Errorf("Enroll: enrollment secret of %d characters, want at least 16", len(enrolled.Secret))
		}
		again, err := d.Enroll(ctx, &req)
		wantOK(t, "Enroll retried", err)
		if again.Secret != enrolled.Secret || again.Facts.NodeID != enrolled.Facts.NodeID {
			t.Error("Enroll retried with the same operation id minted another secret (a retry must have one effect)")
		}
		other := node1
		other.OperationID = req.OperationID
		_, err = d.Enroll(ctx, &other)
		wantErr(t, "Enroll reusing the operation id for another node", err, base.ErrConflict)
		_, err = d.Enroll(ctx, &provisioner.EnrollRequest{NodeID: node1.NodeID, Address: node1.Address})
		wantErr(t, "Enroll without operation id", err, base.ErrInvalidArgument)
	})
	if !ok {
		t.FailNow()
	}
	nodeID := node0.NodeID

	wait := func(t *testing.T, opID string) *provisioner.Operation {
		t.Helper()
		deadline := time.Now().Add(timeout)
		for {
			op, err := d.Status(ctx, opID)
			wantOK(t, "Status", err)
			checkOperation(t, op, opID, nodeID)
			if op.State.Terminal() {
				return op
			}
			if time.Now().After(deadline) {
				t.Fatalf("operation %s still %s after %s", opID, op.State, timeout)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	t.Run("provision and release", func(t *testing.T) {
		req := s.Provision
		req.OperationID = ids.next("provision")
		req.NodeID = nodeID
		op, err := d.Provision(ctx, &req)
		wantOK(t, "Provision", err)
		checkOperation(t, op, req.OperationID, nodeID)
		again, err := d.Provision(ctx, &req)
		wantOK(t, "Provision retried", err)
		checkOperation(t, again, req.OperationID, nodeID)
		if done := wait(t, req.OperationID); done.State != provisioner.StateSucceeded {
			t.Fatalf("Provision ended %s: %s", done.State, done.Message)
		}
		other := req
		other.User.Username = req.User.Username + "x"
		_, err = d.Provision(ctx, &other)
		wantErr(t, "Provision reusing the operation id for another user", err, base.ErrConflict)

		rel := &provisioner.ReleaseRequest{OperationID: ids.next("release"), NodeID: nodeID, Username: req.User.Username, Mode: caps.ReleaseModes[0]}
		op, err = d.Release(ctx, rel)
		wantOK(t, "Release", err)
		checkOperation(t, op, rel.OperationID, nodeID)
		again, err = d.Release(ctx, rel)
		wantOK(t, "Release retried", err)
		checkOperation(t, again, rel.OperationID, nodeID)
		if done := wait(t, rel.OperationID); done.State != provisioner.StateSucceeded {
			t.Fatalf("Release ended %s: %s", done.State, done.Message)
		}
	})

	t.Run("invalid arguments and not found", func(t *testing.T) {
		req := s.Provision
		req.NodeID = nodeID
		req.OperationID = ""
		_, err := d.Provision(ctx, &req)
		wantErr(t, "Provision without operation id", err, base.ErrInvalidArgument)
		_, err = d.Release(ctx, &provisioner.ReleaseRequest{NodeID: nodeID, Mode: caps.ReleaseModes[0]})
		wantErr(t, "Release without operation id", err, base.ErrInvalidArgument)
		_, err = d.Status(ctx, ids.next("never-started"))
		wantErr(t, "Status of an unknown operation", err, base.ErrNotFound)
		_, err = d.Probe(ctx, "sdktest-no-such-node")
		wantErr(t, "Probe of an unknown node", err, base.ErrNotFound)
	})

	t.Run("probe", func(t *testing.T) {
		for _, n := range []string{"", nodeID} {
			h, err := d.Probe(ctx, n)
			wantOK(t, fmt.Sprintf("Probe(%q)", n), err)
			if !h.Healthy {
				t.Errorf("Probe(%q) reports unhealthy: %s", n, h.Message)
			}
		}
	})

	t.Run("optional webhook", func(t *testing.T) {
		if !info.HasCapability(base.CapabilityWebhook) {
			_, err := d.HandleWebhook(ctx, &provisioner.Webhook{Body: []byte("{}"), Header: http.Header{}})
			wantErr(t, "HandleWebhook without the webhook capability", err, base.ErrUnimplemented)
			return
		}
		if s.Webhook == nil {
			t.Fatal("the driver takes webhooks: ProvisionerSuite.Webhook is required")
		}
		hook := s.Webhook(t, nodeID)
		events, err := d.HandleWebhook(ctx, &hook)
		wantOK(t, "HandleWebhook", err)
		if len(events) == 0 {
			t.Fatal("HandleWebhook of the suite's webhook returned no event")
		}
		for _, e := range events {
			if e.ID == "" || e.NodeID != nodeID {
				t.Errorf("event %+v: want an id and node %q", e, nodeID)
			}
			switch e.Type {
			case provisioner.EventFacts:
				if e.Facts == nil {
					t.Errorf("facts event %q without facts", e.ID)
				}
			case provisioner.EventOperation:
				if e.Operation == nil {
					t.Errorf("operation event %q without operation", e.ID)
				}
			case provisioner.EventHealth:
				if e.Health == nil {
					t.Errorf("health event %q without health", e.ID)
				}
			default:
				t.Errorf("event %q of unknown type %q", e.ID, e.Type)
			}
		}
		again, err := d.HandleWebhook(ctx, &hook)
		wantOK(t, "HandleWebhook redelivered", err)
		if len(again) != len(events) || (len(again) > 0 && again[0].ID != events[0].ID) {
			t.Error("a redelivered webhook yields other event ids; the core could not drop the duplicate")
		}
		checkTamperedWebhook(t, hook.Body, hook.Header, func(body []byte, h http.Header) error {
			_, err := d.HandleWebhook(ctx, &provisioner.Webhook{Body: body, Header: h})
			return err
		})
	})

	t.Run("optional discover", func(t *testing.T) {
		if !info.HasCapability(base.CapabilityDiscover) {
			_, err := d.Discover(ctx, &provisioner.DiscoverRequest{})
			wantErr(t, "Discover without the discover capability", err, base.ErrUnimplemented)
			return
		}
		_, err := d.Discover(ctx, &provisioner.DiscoverRequest{Limit: -1})
		wantErr(t, "Discover with a negative limit", err, base.ErrInvalidArgument)
		req := node1
		req.OperationID = ids.next("enroll")
		_, err = d.Enroll(ctx, &req)
		wantOK(t, "Enroll of the second node", err)
		nodes := discoverAll(t, d)
		for _, id := range []string{nodeID, node1.NodeID} {
			n, ok := nodes[id]
			switch {
			case !ok:
				t.Errorf("Discover did not list node %q, which the kit enrolled (%d nodes listed)", id, len(nodes))
			case !n.Ready || n.Broken:
				t.Errorf("Discover lists node %q, enrolled, idle and healthy, as ready=%v broken=%v (state %q)", id, n.Ready, n.Broken, n.State)
			}
		}
	})

	t.Run("optional unenroll", func(t *testing.T) {
		if !info.HasCapability(base.CapabilityUnenroll) {
			err := d.Unenroll(ctx, &provisioner.UnenrollRequest{OperationID: ids.next("unenroll"), NodeID: nodeID})
			wantErr(t, "Unenroll without the unenroll capability", err, base.ErrUnimplemented)
			return
		}
		err := d.Unenroll(ctx, &provisioner.UnenrollRequest{NodeID: nodeID})
		wantErr(t, "Unenroll without operation id", err, base.ErrInvalidArgument)
		err = d.Unenroll(ctx, &provisioner.UnenrollRequest{OperationID: ids.next("unenroll")})
		wantErr(t, "Unenroll without node id", err, base.ErrInvalidArgument)
		req := &provisioner.UnenrollRequest{OperationID: ids.next("unenroll"), NodeID: nodeID}
		wantOK(t, "Unenroll", d.Unenroll(ctx, req))
		wantOK(t, "Unenroll retried with the same operation id (a retry must succeed)", d.Unenroll(ctx, req))
		again := &provisioner.UnenrollRequest{OperationID: ids.next("unenroll"), NodeID: nodeID}
		wantOK(t, "Unenroll of a node already unenrolled (it must succeed)", d.Unenroll(ctx, again))
		unknown := &provisioner.UnenrollRequest{OperationID: ids.next("unenroll"), NodeID: "sdktest-no-such-node"}
		wantOK(t, "Unenroll of a node the driver does not know (it must succeed)", d.Unenroll(ctx, unknown))
	})

	t.Run("cancellation", func(t *testing.T) {
		preCancelled(t, "Status", func(ctx context.Context) error {
			_, err := d.Status(ctx, "sdktest-anything")
			return err
		})
		if s.SlowConfig == nil {
			return
		}
		slow := ConnectProvisioner(t, target)
		Configure(t, slow, provisioner.SupportedAPIVersions(), s.SlowConfig(t))
		cancelMidCall(t, "Probe under SlowConfig", func(ctx context.Context) error {
			_, err := slow.Probe(ctx, "")
			return err
		})
		dctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		_, err := slow.Status(dctx, "sdktest-anything")
		wantErr(t, "Status under SlowConfig past its deadline", err, context.DeadlineExceeded)
	})

	if target.InProcessTarget() {
		t.Run("error mapping", func(t *testing.T) {
			inj := newInjector()
			d := must[*provisioner.Client](t, connectInProcess(t, &injectedProvisioner{Driver: target.factory(t).(provisioner.Driver), inj: inj}, base.KindProvisioner))
			checkErrorMapping(t, inj, func(ctx context.Context) error {
				_, err := d.Status(ctx, "sdktest-injected")
				return err
			})
		})
	}
}

// injectedProvisioner fails or blocks Status as its injector says.
type injectedProvisioner struct {
	provisioner.Driver
	inj *injector
}

var _ provisioner.Driver = (*injectedProvisioner)(nil)

func (i *injectedProvisioner) Status(ctx context.Context, operationID string) (*provisioner.Operation, error) {
	if err := i.inj.hit(ctx); err != nil {
		return nil, err
	}
	return i.Driver.Status(ctx, operationID)
}

// discoverAll walks a whole discovery: its first pages one node at a time,
// so the cursor is exercised whatever the backend's size, the rest at the
// driver's default page size. It checks every page and node and returns
// the nodes by id.
func discoverAll(t testing.TB, d provisioner.Discoverer) map[string]provisioner.DiscoveredNode {
	t.Helper()
	const smallPages, maxPages = 3, 10000
	ctx := testContext(t)
	nodes := map[string]provisioner.DiscoveredNode{}
	cursors := map[string]bool{"": true}
	cursor := ""
	for pages := 0; ; pages++ {
		if pages == maxPages {
			t.Fatalf("Discover did not finish after %d pages (%d nodes)", maxPages, len(nodes))
		}
		limit := 0
		if pages < smallPages {
			limit = 1
		}
		page, err := d.Discover(ctx, &provisioner.DiscoverRequest{Cursor: cursor, Limit: limit})
		wantOK(t, fmt.Sprintf("Discover page %d (limit %d)", pages+1, limit), err)
		if limit > 0 && len(page.Nodes) > limit {
			t.Errorf("Discover with limit %d returned %d nodes", limit, len(page.Nodes))
		}
		for _, n := range page.Nodes {
			if _, dup := nodes[n.NodeID]; dup {
				t.Fatalf("Discover listed node %q twice (page %d, cursor %q): the cursor must continue after the previous page", n.NodeID, pages+1, cursor)
			}
			checkDiscovered(t, &n)
			nodes[n.NodeID] = n
		}
		if page.NextCursor == "" {
			return nodes
		}
		if cursors[page.NextCursor] {
			t.Fatalf("Discover page %d returned cursor %q again: the listing would never end", pages+1, page.NextCursor)
		}
		cursors[page.NextCursor] = true
		cursor = page.NextCursor
	}
}

func checkDiscovered(t testing.TB, n *provisioner.DiscoveredNode) {
	t.Helper()
	if n.NodeID == "" {
		t.Errorf("Discover: node %+v without id", n)
	}
	if n.State == "" {
		t.Errorf("Discover: node %q without the backend's state", n.NodeID)
	}
	if n.Ready && n.Broken {
		t.Errorf("Discover: node %q is both ready and broken (state %q)", n.NodeID, n.State)
	}
	if n.Facts != nil && n.Facts.NodeID != n.NodeID {
		t.Errorf("Discover: node %q has the facts of node %q", n.NodeID, n.Facts.NodeID)
	}
}

func checkFacts(t testing.TB, f *provisioner.NodeFacts, nodeID string) {
	t.Helper()
	if f.NodeID != nodeID {
		t.Errorf("facts: node id %q, want %q", f.NodeID, nodeID)
	}
	if len(f.GPUs) == 0 {
		t.Error("facts: no GPUs")
	}
	for _, g := range f.GPUs {
		if g.Model == "" || g.Count <= 0 {
			t.Errorf("facts: GPU %+v needs a model and a positive count", g)
		}
	}
	if f.CPU.Cores <= 0 || f.MemoryBytes == 0 {
		t.Errorf("facts: CPU %+v and memory %d must be known", f.CPU, f.MemoryBytes)
	}
}

func checkOperation(t testing.TB, op *provisioner.Operation, opID, nodeID string) {
	t.Helper()
	if op.OperationID != opID || op.NodeID != nodeID {
		t.Errorf("operation %+v: want operation id %q and node %q", op, opID, nodeID)
	}
	if !slices.Contains([]provisioner.OperationState{provisioner.StatePending, provisioner.StateRunning,
		provisioner.StateSucceeded, provisioner.StateFailed}, op.State) {
		t.Errorf("operation %s: unknown state %q", opID, op.State)
	}
	if op.Percent < 0 || op.Percent > 100 {
		t.Errorf("operation %s: percent %d", opID, op.Percent)
	}
}

// checkTamperedWebhook checks that a webhook with one body byte changed,
// and one without its headers, fail verification.
func checkTamperedWebhook(t testing.TB, body []byte, header http.Header, handle func([]byte, http.Header) error) {
	t.Helper()
	if len(body) == 0 {
		t.Fatal("the suite's webhook has an empty body")
	}
	tampered := append([]byte(nil), body...)
	tampered[len(tampered)/2] ^= 0x01
	err := handle(tampered, header.Clone())
	if !errors.Is(err, base.ErrUnauthenticated) {
		t.Errorf("a webhook with one body byte changed: got %v, want base.ErrUnauthenticated (verify before parsing)", err)
	}
	err = handle(body, http.Header{})
	if !errors.Is(err, base.ErrUnauthenticated) {
		t.Errorf("a webhook without its headers: got %v, want base.ErrUnauthenticated", err)
	}
}
