package inventory

import "testing"

func TestNodeLifecycle(t *testing.T) {
	edges := map[[2]State]bool{
		{Enrolling, Available}: true,
		{Available, Allocated}: true,
		{Allocated, Cleaning}:  true,
		{Allocated, Available}: true,
		{Cleaning, Available}:  true,
	}
	for _, from := range States() {
		for _, to := range States() {
			want := edges[[2]State{from, to}]
			switch {
			case from == Retired:
				want = false
			case to == Retired:
				want = true
			case to == Offline:
				want = from != Offline
			case from == Offline:
				want = to != Offline // by Recover only; Move refuses it
			}
			if got := CanMove(from, to); got != want {
				t.Errorf("CanMove(%s, %s) = %v; want %v", from, to, got, want)
			}
		}
	}
}

func TestModelMatches(t *testing.T) {
	cases := []struct {
		node, sku string
		want      bool
	}{
		{"NVIDIA H100 80GB HBM3", "H100 80GB", true},
		{"NVIDIA Corporation GH100 [H100 SXM5 80GB]", "H100 80GB", true},
		{"NVIDIA Corporation GH100 [H100 SXM5 80GB]", "H100 94GB", false},
		{"NVIDIA Corporation AD102GL [L40S]", "L40S", true},
		{"NVIDIA L40", "L40S", false},
		{"NVIDIA A100-SXM4-80GB", "a100 80gb", true},
		{"anything", "", false},
		{"anything", "---", false},
	}
	for _, c := range cases {
		if got := modelMatches(squash(c.node), c.sku); got != c.want {
			t.Errorf("modelMatches(%q, %q) = %v; want %v", c.node, c.sku, got, c.want)
		}
	}
}
