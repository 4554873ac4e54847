package maas

import (
	"testing"

	"github.com/canonical/gomaasclient/entity/node"
)

func TestBrokenStatuses(t *testing.T) {
	t.Parallel()
	want := map[node.Status]bool{
		node.StatusBroken: true, node.StatusFailedCommissioning: true, node.StatusFailedTesting: true,
		node.StatusFailedDeployment: true, node.StatusFailedReleasing: true, node.StatusFailedDiskErasing: true,
		node.StatusFailedEnteringRescueMode: true, node.StatusFailedExitingRescueMode: true,
	}
	for st := node.StatusNew; st <= node.StatusFailedTesting; st++ {
		if got := broken(st); got != want[st] {
			t.Errorf("broken(%d) = %v, want %v", st, got, want[st])
		}
	}
}
