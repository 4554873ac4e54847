package allocations

import (
	"testing"
)

// The state machine is exactly DESIGN.md §5: every pair of states is either
// an edge listed here or refused.
func TestStateMachine(t *testing.T) {
	edges := map[[2]State]bool{
		{Requested, Provisioning}:  true,
		{Provisioning, Active}:     true,
		{Provisioning, Failed}:     true,
		{Active, Releasing}:        true,
		{Releasing, Released}:      true,
		{Releasing, ReleaseFailed}: true,
		{ReleaseFailed, Releasing}: true,
	}
	for _, from := range States() {
		for _, to := range States() {
			if got, want := CanMove(from, to), edges[[2]State{from, to}]; got != want {
				t.Errorf("CanMove(%s, %s) = %v; want %v", from, to, got, want)
			}
		}
	}
	for _, s := range States() {
		if s.Terminal() != (s == Released || s == Failed) {
			t.Errorf("%s.Terminal() = %v", s, s.Terminal())
		}
	}
}

func TestCreateRequestValidation(t *testing.T) {
	const key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop"
	ok := func() CreateRequest {
		return CreateRequest{SKU: "h100", Count: 1, Username: "alice", SSHPublicKeys: []string{key}}
	}
	cases := map[string]func(*CreateRequest){
		"no sku":           func(r *CreateRequest) { r.SKU = "" },
		"zero count":       func(r *CreateRequest) { r.Count = 0 },
		"count over max":   func(r *CreateRequest) { r.Count = 9 },
		"control in name":  func(r *CreateRequest) { r.Name = "a\nb" },
		"root":             func(r *CreateRequest) { r.Username = "root" },
		"ubuntu":           func(r *CreateRequest) { r.Username = "ubuntu" },
		"upper user":       func(r *CreateRequest) { r.Username = "Alice" },
		"shell in user":    func(r *CreateRequest) { r.Username = "a$(id)" },
		"long user":        func(r *CreateRequest) { r.Username = "a23456789012345678901234567890123" },
		"bad image":        func(r *CreateRequest) { r.Image = "../../etc" },
		"no keys":          func(r *CreateRequest) { r.SSHPublicKeys = nil },
		"key with options": func(r *CreateRequest) { r.SSHPublicKeys = []string{`command="id" ` + key} },
	}
	for name, mutate := range cases {
		r := ok()
		mutate(&r)
		if err := r.validate(8); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	r := ok()
	r.Image = "ubuntu/noble"
	if err := r.validate(8); err != nil {
		t.Fatalf("valid request refused: %v", err)
	}
	if r.SSHPublicKeys[0] == key {
		t.Fatal("keys are not normalised (comment kept)")
	}
}
