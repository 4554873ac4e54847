package provisioner

import (
	"maps"
	"net/http"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	provisionerpb "github.com/gpuaas/gpuaas/sdk/provisioner/proto"
)

// This file is the only place provisioner types meet their protobuf form.

func timeToProto(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func timeFromProto(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime()
}

func cloneStrings(s []string) []string {
	if len(s) == 0 {
		return nil
	}
	return append([]string(nil), s...)
}

func releaseModeToProto(m ReleaseMode) provisionerpb.ReleaseMode {
	switch m {
	case ReleaseRevoke:
		return provisionerpb.ReleaseMode_RELEASE_MODE_REVOKE
	case ReleaseWipe:
		return provisionerpb.ReleaseMode_RELEASE_MODE_WIPE
	case ReleaseReimage:
		return provisionerpb.ReleaseMode_RELEASE_MODE_REIMAGE
	}
	return provisionerpb.ReleaseMode_RELEASE_MODE_UNSPECIFIED
}

func releaseModeFromProto(m provisionerpb.ReleaseMode) ReleaseMode {
	switch m {
	case provisionerpb.ReleaseMode_RELEASE_MODE_REVOKE:
		return ReleaseRevoke
	case provisionerpb.ReleaseMode_RELEASE_MODE_WIPE:
		return ReleaseWipe
	case provisionerpb.ReleaseMode_RELEASE_MODE_REIMAGE:
		return ReleaseReimage
	}
	return ""
}

func capabilitiesToProto(c *Capabilities) *provisionerpb.CapabilitiesResponse {
	out := &provisionerpb.CapabilitiesResponse{Images: cloneStrings(c.Images)}
	for _, m := range c.ReleaseModes {
		out.ReleaseModes = append(out.ReleaseModes, releaseModeToProto(m))
	}
	return out
}

func capabilitiesFromProto(p *provisionerpb.CapabilitiesResponse) *Capabilities {
	out := &Capabilities{Images: cloneStrings(p.GetImages())}
	for _, m := range p.GetReleaseModes() {
		out.ReleaseModes = append(out.ReleaseModes, releaseModeFromProto(m))
	}
	return out
}

func enrollToProto(r *EnrollRequest) *provisionerpb.EnrollRequest {
	return &provisionerpb.EnrollRequest{
		OperationId: r.OperationID,
		NodeId:      r.NodeID,
		Address:     r.Address,
		Pool:        r.Pool,
		Tags:        cloneStrings(r.Tags),
		Params:      maps.Clone(r.Params),
	}
}

func enrollFromProto(p *provisionerpb.EnrollRequest) *EnrollRequest {
	return &EnrollRequest{
		OperationID: p.GetOperationId(),
		NodeID:      p.GetNodeId(),
		Address:     p.GetAddress(),
		Pool:        p.GetPool(),
		Tags:        cloneStrings(p.GetTags()),
		Params:      maps.Clone(p.GetParams()),
	}
}

func factsToProto(f *NodeFacts) *provisionerpb.NodeFacts {
	out := &provisionerpb.NodeFacts{
		NodeId:      f.NodeID,
		Hostname:    f.Hostname,
		Cpu:         &provisionerpb.CPU{Model: f.CPU.Model, Cores: uint32(max(f.CPU.Cores, 0))},
		MemoryBytes: f.MemoryBytes,
		DiskBytes:   f.DiskBytes,
		Tags:        cloneStrings(f.Tags),
		Pool:        f.Pool,
	}
	for _, g := range f.GPUs {
		out.Gpus = append(out.Gpus, &provisionerpb.GPU{Model: g.Model, Count: uint32(max(g.Count, 0)), MemoryBytes: g.MemoryBytes})
	}
	return out
}

func factsFromProto(p *provisionerpb.NodeFacts) *NodeFacts {
	out := &NodeFacts{
		NodeID:      p.GetNodeId(),
		Hostname:    p.GetHostname(),
		CPU:         CPU{Model: p.GetCpu().GetModel(), Cores: int(p.GetCpu().GetCores())},
		MemoryBytes: p.GetMemoryBytes(),
		DiskBytes:   p.GetDiskBytes(),
		Tags:        cloneStrings(p.GetTags()),
		Pool:        p.GetPool(),
	}
	for _, g := range p.GetGpus() {
		out.GPUs = append(out.GPUs, GPU{Model: g.GetModel(), Count: int(g.GetCount()), MemoryBytes: g.GetMemoryBytes()})
	}
	return out
}

func enrollmentToProto(e *Enrollment) *provisionerpb.EnrollResponse {
	return &provisionerpb.EnrollResponse{Facts: factsToProto(&e.Facts), EnrollmentSecret: e.Secret, AgentRequired: e.AgentRequired}
}

func enrollmentFromProto(p *provisionerpb.EnrollResponse) *Enrollment {
	return &Enrollment{Facts: *factsFromProto(p.GetFacts()), Secret: p.GetEnrollmentSecret(), AgentRequired: p.GetAgentRequired()}
}

func provisionToProto(r *ProvisionRequest) *provisionerpb.ProvisionRequest {
	return &provisionerpb.ProvisionRequest{
		OperationId:  r.OperationID,
		NodeId:       r.NodeID,
		AllocationId: r.AllocationID,
		User: &provisionerpb.TenantUser{
			Username:  r.User.Username,
			Uid:       uint32(max(r.User.UID, 0)),
			OrgId:     r.User.OrgID,
			ProjectId: r.User.ProjectID,
		},
		SshPublicKeys: cloneStrings(r.SSHPublicKeys),
		Image:         r.Image,
		SshUserCaKeys: cloneStrings(r.SSHUserCAKeys),
	}
}

func provisionFromProto(p *provisionerpb.ProvisionRequest) *ProvisionRequest {
	return &ProvisionRequest{
		OperationID:  p.GetOperationId(),
		NodeID:       p.GetNodeId(),
		AllocationID: p.GetAllocationId(),
		User: TenantUser{
			Username:  p.GetUser().GetUsername(),
			UID:       int(p.GetUser().GetUid()),
			OrgID:     p.GetUser().GetOrgId(),
			ProjectID: p.GetUser().GetProjectId(),
		},
		SSHPublicKeys: cloneStrings(p.GetSshPublicKeys()),
		Image:         p.GetImage(),
		SSHUserCAKeys: cloneStrings(p.GetSshUserCaKeys()),
	}
}

func releaseToProto(r *ReleaseRequest) *provisionerpb.ReleaseRequest {
	return &provisionerpb.ReleaseRequest{
		OperationId:  r.OperationID,
		NodeId:       r.NodeID,
		AllocationId: r.AllocationID,
		Username:     r.Username,
		Mode:         releaseModeToProto(r.Mode),
	}
}

func releaseFromProto(p *provisionerpb.ReleaseRequest) *ReleaseRequest {
	return &ReleaseRequest{
		OperationID:  p.GetOperationId(),
		NodeID:       p.GetNodeId(),
		AllocationID: p.GetAllocationId(),
		Username:     p.GetUsername(),
		Mode:         releaseModeFromProto(p.GetMode()),
	}
}

func stateToProto(s OperationState) provisionerpb.OperationState {
	switch s {
	case StatePending:
		return provisionerpb.OperationState_OPERATION_STATE_PENDING
	case StateRunning:
		return provisionerpb.OperationState_OPERATION_STATE_RUNNING
	case StateSucceeded:
		return provisionerpb.OperationState_OPERATION_STATE_SUCCEEDED
	case StateFailed:
		return provisionerpb.OperationState_OPERATION_STATE_FAILED
	}
	return provisionerpb.OperationState_OPERATION_STATE_UNSPECIFIED
}

func stateFromProto(s provisionerpb.OperationState) OperationState {
	switch s {
	case provisionerpb.OperationState_OPERATION_STATE_PENDING:
		return StatePending
	case provisionerpb.OperationState_OPERATION_STATE_RUNNING:
		return StateRunning
	case provisionerpb.OperationState_OPERATION_STATE_SUCCEEDED:
		return StateSucceeded
	case provisionerpb.OperationState_OPERATION_STATE_FAILED:
		return StateFailed
	}
	return ""
}

func operationToProto(o *Operation) *provisionerpb.Operation {
	return &provisionerpb.Operation{
		OperationId: o.OperationID,
		NodeId:      o.NodeID,
		State:       stateToProto(o.State),
		Message:     o.Message,
		Percent:     uint32(min(max(o.Percent, 0), 100)),
		UpdatedAt:   timeToProto(o.UpdatedAt),
	}
}

func operationFromProto(p *provisionerpb.Operation) *Operation {
	return &Operation{
		OperationID: p.GetOperationId(),
		NodeID:      p.GetNodeId(),
		State:       stateFromProto(p.GetState()),
		Message:     p.GetMessage(),
		Percent:     int(p.GetPercent()),
		UpdatedAt:   timeFromProto(p.GetUpdatedAt()),
	}
}

func healthToProto(h *Health) *provisionerpb.ProbeResponse {
	return &provisionerpb.ProbeResponse{Healthy: h.Healthy, Message: h.Message}
}

func healthFromProto(p *provisionerpb.ProbeResponse) *Health {
	return &Health{Healthy: p.GetHealthy(), Message: p.GetMessage()}
}

func webhookToProto(w *Webhook) *provisionerpb.WebhookRequest {
	out := &provisionerpb.WebhookRequest{Body: w.Body, Headers: make(map[string]*provisionerpb.Header, len(w.Header))}
	for k, v := range w.Header {
		out.Headers[k] = &provisionerpb.Header{Values: cloneStrings(v)}
	}
	return out
}

func webhookFromProto(p *provisionerpb.WebhookRequest) *Webhook {
	out := &Webhook{Body: p.GetBody(), Header: make(http.Header, len(p.GetHeaders()))}
	for k, v := range p.GetHeaders() {
		out.Header[k] = cloneStrings(v.GetValues())
	}
	return out
}

func eventTypeToProto(t NodeEventType) provisionerpb.NodeEventType {
	switch t {
	case EventFacts:
		return provisionerpb.NodeEventType_NODE_EVENT_TYPE_FACTS
	case EventOperation:
		return provisionerpb.NodeEventType_NODE_EVENT_TYPE_OPERATION
	case EventHealth:
		return provisionerpb.NodeEventType_NODE_EVENT_TYPE_HEALTH
	}
	return provisionerpb.NodeEventType_NODE_EVENT_TYPE_UNSPECIFIED
}

func eventTypeFromProto(t provisionerpb.NodeEventType) NodeEventType {
	switch t {
	case provisionerpb.NodeEventType_NODE_EVENT_TYPE_FACTS:
		return EventFacts
	case provisionerpb.NodeEventType_NODE_EVENT_TYPE_OPERATION:
		return EventOperation
	case provisionerpb.NodeEventType_NODE_EVENT_TYPE_HEALTH:
		return EventHealth
	}
	return ""
}

func eventsToProto(events []NodeEvent) *provisionerpb.WebhookResponse {
	out := &provisionerpb.WebhookResponse{Events: make([]*provisionerpb.NodeEvent, 0, len(events))}
	for i := range events {
		e := &events[i]
		pe := &provisionerpb.NodeEvent{
			EventId:    e.ID,
			Type:       eventTypeToProto(e.Type),
			NodeId:     e.NodeID,
			OccurredAt: timeToProto(e.OccurredAt),
		}
		if e.Facts != nil {
			pe.Facts = factsToProto(e.Facts)
		}
		if e.Operation != nil {
			pe.Operation = operationToProto(e.Operation)
		}
		if e.Health != nil {
			pe.Health = healthToProto(e.Health)
		}
		out.Events = append(out.Events, pe)
	}
	return out
}

func eventsFromProto(p *provisionerpb.WebhookResponse) []NodeEvent {
	out := make([]NodeEvent, 0, len(p.GetEvents()))
	for _, pe := range p.GetEvents() {
		e := NodeEvent{
			ID:         pe.GetEventId(),
			Type:       eventTypeFromProto(pe.GetType()),
			NodeID:     pe.GetNodeId(),
			OccurredAt: timeFromProto(pe.GetOccurredAt()),
		}
		if pe.GetFacts() != nil {
			e.Facts = factsFromProto(pe.GetFacts())
		}
		if pe.GetOperation() != nil {
			e.Operation = operationFromProto(pe.GetOperation())
		}
		if pe.GetHealth() != nil {
			e.Health = healthFromProto(pe.GetHealth())
		}
		out = append(out, e)
	}
	return out
}

func discoverToProto(r *DiscoverRequest) *provisionerpb.DiscoverRequest {
	return &provisionerpb.DiscoverRequest{Cursor: r.Cursor, Limit: int32(min(max(r.Limit, -1), 1<<30))}
}

func discoverFromProto(p *provisionerpb.DiscoverRequest) *DiscoverRequest {
	return &DiscoverRequest{Cursor: p.GetCursor(), Limit: int(p.GetLimit())}
}

func discoverPageToProto(p *DiscoverPage) *provisionerpb.DiscoverResponse {
	out := &provisionerpb.DiscoverResponse{NextCursor: p.NextCursor, Nodes: make([]*provisionerpb.DiscoveredNode, 0, len(p.Nodes))}
	for i := range p.Nodes {
		n := &p.Nodes[i]
		pn := &provisionerpb.DiscoveredNode{NodeId: n.NodeID, Ready: n.Ready, Broken: n.Broken, State: n.State}
		if n.Facts != nil {
			pn.Facts = factsToProto(n.Facts)
		}
		out.Nodes = append(out.Nodes, pn)
	}
	return out
}

func discoverPageFromProto(p *provisionerpb.DiscoverResponse) *DiscoverPage {
	out := &DiscoverPage{NextCursor: p.GetNextCursor(), Nodes: make([]DiscoveredNode, 0, len(p.GetNodes()))}
	for _, pn := range p.GetNodes() {
		n := DiscoveredNode{NodeID: pn.GetNodeId(), Ready: pn.GetReady(), Broken: pn.GetBroken(), State: pn.GetState()}
		if pn.GetFacts() != nil {
			n.Facts = factsFromProto(pn.GetFacts())
		}
		out.Nodes = append(out.Nodes, n)
	}
	return out
}

func unenrollToProto(r *UnenrollRequest) *provisionerpb.UnenrollRequest {
	return &provisionerpb.UnenrollRequest{OperationId: r.OperationID, NodeId: r.NodeID}
}

func unenrollFromProto(p *provisionerpb.UnenrollRequest) *UnenrollRequest {
	return &UnenrollRequest{OperationID: p.GetOperationId(), NodeID: p.GetNodeId()}
}
