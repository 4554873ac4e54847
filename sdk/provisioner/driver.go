// Package provisioner is the contract of a provisioner driver: it brings GPU
// nodes in (Enroll), hands a node to a tenant user (Provision), takes it
// back (Release) and reports progress and health.
package provisioner

import (
	"context"
	"net/http"
	"time"

	"github.com/gpuaas/gpuaas/sdk/base"
)

// Driver is what a provisioner driver implements. Errors wrap the base
// sentinels. Enroll, Provision and Release carry an OperationID: a call
// repeated with the same OperationID has one effect and returns the same
// result (the same enrollment secret, the same operation); reusing an
// OperationID with different arguments returns base.ErrConflict.
type Driver interface {
	base.BasePlugin

	// Capabilities describes what the driver's backend can do.
	Capabilities(ctx context.Context) (*Capabilities, error)
	// Enroll brings a node in and reports its facts and a fresh secret the
	// node uses to enroll its agent.
	Enroll(ctx context.Context, req *EnrollRequest) (*Enrollment, error)
	// Provision starts handing the node to the tenant user. It returns
	// promptly; Status follows the operation.
	Provision(ctx context.Context, req *ProvisionRequest) (*Operation, error)
	// Release starts revoking the user's access and cleaning the node.
	Release(ctx context.Context, req *ReleaseRequest) (*Operation, error)
	// Status reports an operation started by Provision or Release, by the
	// OperationID it was started with. An unknown id is base.ErrNotFound.
	Status(ctx context.Context, operationID string) (*Operation, error)
	// Probe checks a node's health, or the backend's when nodeID is empty.
	// An unknown node is base.ErrNotFound.
	Probe(ctx context.Context, nodeID string) (*Health, error)
}

// WebhookHandler is the optional capability to verify and translate a
// webhook the backend sends (base.CapabilityWebhook), for example MAAS
// commissioning results. A webhook that fails verification is
// base.ErrUnauthenticated; one that cannot be parsed base.ErrInvalidArgument.
type WebhookHandler interface {
	HandleWebhook(ctx context.Context, hook *Webhook) ([]NodeEvent, error)
}

// Discoverer is the optional capability (base.CapabilityDiscover) to list
// the nodes the backend has, so the core can reconcile its inventory by
// polling: nodes Ready to enroll that it does not know yet, nodes that
// broke, nodes that vanished (for example when a commissioning webhook was
// lost). A listing is paged: pass the NextCursor of one page as the Cursor
// of the next, until it is empty. Every node appears once in a listing;
// nodes added or removed while it runs may or may not appear. A cursor the
// driver cannot read is base.ErrInvalidArgument.
type Discoverer interface {
	Discover(ctx context.Context, req *DiscoverRequest) (*DiscoverPage, error)
}

// Unenroller is the optional capability (base.CapabilityUnenroll) to undo
// what Enroll set up in the backend when the core retires a node: for
// example stop and remove the job that runs the node's agent. It does not
// release or wipe the node (the core retires only idle nodes) and does not
// touch the node's credentials at the core, which the core revokes itself.
// Unenroll is idempotent: a call retried with the same OperationID, a
// repeated call and a call for a node the backend does not know (any more)
// all succeed.
type Unenroller interface {
	Unenroll(ctx context.Context, req *UnenrollRequest) error
}

// ReleaseMode says how thoroughly Release cleans a node.
type ReleaseMode string

// Release modes.
const (
	// ReleaseRevoke removes the tenant user and its keys only.
	ReleaseRevoke ReleaseMode = "revoke"
	// ReleaseWipe also wipes local disks.
	ReleaseWipe ReleaseMode = "wipe"
	// ReleaseReimage reinstalls the node from scratch.
	ReleaseReimage ReleaseMode = "reimage"
)

// Capabilities describes a provisioner backend.
type Capabilities struct {
	// ReleaseModes the driver supports; at least one.
	ReleaseModes []ReleaseMode
	// Images the driver can install; empty when Provision ignores Image.
	Images []string
}

// EnrollRequest names the node to bring in.
type EnrollRequest struct {
	OperationID string
	NodeID      string
	// Address is how the backend reaches the node (host name, IP, BMC
	// address or backend system id; driver specific).
	Address string
	Pool    string
	Tags    []string
	// Params are driver-specific enrollment parameters.
	Params map[string]string
}

// Enrollment is the result of Enroll.
type Enrollment struct {
	Facts NodeFacts
	// Secret is handed to the node's agent for its first enrollment. The
	// core stores only a hash of it.
	Secret string
	// AgentRequired says the node serves tenants only through its agent: the
	// core keeps it enrolling until the agent has enrolled.
	AgentRequired bool
}

// GPU is one kind of GPU in a node.
type GPU struct {
	Model       string
	Count       int
	MemoryBytes uint64
}

// CPU describes a node's processors.
type CPU struct {
	Model string
	Cores int
}

// NodeFacts is what a node has.
type NodeFacts struct {
	NodeID      string
	Hostname    string
	GPUs        []GPU
	CPU         CPU
	MemoryBytes uint64
	DiskBytes   uint64
	Tags        []string
	Pool        string
}

// TenantUser is the account Provision creates on the node.
type TenantUser struct {
	Username  string
	UID       int
	OrgID     string
	ProjectID string
}

// ProvisionRequest hands NodeID to User.
type ProvisionRequest struct {
	OperationID  string
	NodeID       string
	AllocationID string
	User         TenantUser
	// SSHPublicKeys are authorized for User (authorized_keys lines).
	SSHPublicKeys []string
	// Image to install; empty means the node's current image.
	Image string
	// SSHUserCAKeys are CA keys (authorized_keys lines) whose short-lived
	// user certificates, for User only, the node's sshd should accept (the
	// browser terminal logs in with them). A driver that prepares the node
	// itself writes them as agent/tasks.SSHDTrustConfig describes; with a
	// node agent, the agent installs them and the driver may ignore them.
	SSHUserCAKeys []string
}

// ReleaseRequest takes NodeID back from Username.
type ReleaseRequest struct {
	OperationID  string
	NodeID       string
	AllocationID string
	Username     string
	Mode         ReleaseMode
}

// OperationState is where an operation stands.
type OperationState string

// Operation states; succeeded and failed are terminal.
const (
	StatePending   OperationState = "pending"
	StateRunning   OperationState = "running"
	StateSucceeded OperationState = "succeeded"
	StateFailed    OperationState = "failed"
)

// Terminal reports whether the state is final.
func (s OperationState) Terminal() bool { return s == StateSucceeded || s == StateFailed }

// Operation is the progress of a Provision or Release.
type Operation struct {
	OperationID string
	NodeID      string
	State       OperationState
	// Message explains the state, e.g. why it failed.
	Message string
	// Percent done, 0 to 100.
	Percent   int
	UpdatedAt time.Time
}

// Health is the result of Probe.
type Health struct {
	Healthy bool
	Message string
}

// Webhook is an inbound webhook exactly as received.
type Webhook struct {
	Body   []byte
	Header http.Header
}

// NodeEventType says what a NodeEvent carries.
type NodeEventType string

// Node event types.
const (
	// EventFacts carries new or updated facts of a node (Facts).
	EventFacts NodeEventType = "node.facts"
	// EventOperation carries progress of an operation (Operation).
	EventOperation NodeEventType = "node.operation"
	// EventHealth carries a node's health (Health).
	EventHealth NodeEventType = "node.health"
)

// NodeEvent is one verified, normalised event from a webhook. ID is stable
// for the same backend event, so the core can drop redeliveries.
type NodeEvent struct {
	ID         string
	Type       NodeEventType
	NodeID     string
	OccurredAt time.Time
	Facts      *NodeFacts
	Operation  *Operation
	Health     *Health
}

// UnenrollRequest undoes the enrollment of NodeID (the id Enroll took).
type UnenrollRequest struct {
	OperationID string
	NodeID      string
}

// DiscoverRequest asks for one page of the backend's nodes.
type DiscoverRequest struct {
	// Cursor is the NextCursor of the previous page; empty for the first.
	Cursor string
	// Limit caps the nodes of the page; 0 means the driver's default (for
	// example 500). Negative is base.ErrInvalidArgument.
	Limit int
}

// DiscoveredNode is one node as the backend sees it.
type DiscoveredNode struct {
	// NodeID is the backend's id of the node: the NodeID Enroll takes and
	// NodeFacts.NodeID reports (the MAAS system id).
	NodeID string
	// Ready means the node can be enrolled, or is idle and healthy.
	Ready bool
	// Broken means the backend marks the node broken or failed.
	Broken bool
	// State is the backend's own name of the node's state, for messages.
	State string
	// Facts are the node's facts when the backend lists them cheaply; nil
	// otherwise. They may lack what needs a per-node query (GPUs on MAAS).
	Facts *NodeFacts
}

// DiscoverPage is one page of a discovery.
type DiscoverPage struct {
	Nodes []DiscoveredNode
	// NextCursor continues the listing; empty on the last page.
	NextCursor string
}
