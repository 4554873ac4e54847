package maas

import (
	"testing"

	"github.com/hashicorp/go-hclog"
)

// A provision's fingerprint leaves out the SSH CA keys (a retry after the
// core rotated its CA is the same request), and a record an earlier driver
// wrote, whose fingerprint covered them, is still recognized; another
// tenant's request is not.
func TestFingerprintLeavesOutCAKeys(t *testing.T) {
	a := tenant{Username: "alice", Keys: []string{"ssh-ed25519 AAAA alice"}, CAKeys: []string{"ssh-ed25519 AAAA ca-1"}, Image: "ubuntu/jammy", NodeID: "n1"}
	b := a
	b.CAKeys = []string{"ssh-ed25519 AAAA ca-2"}
	if a.fingerprint() != b.fingerprint() {
		t.Fatal("the fingerprint changed with the CA keys")
	}
	if a.legacyFingerprint() == b.legacyFingerprint() || a.legacyFingerprint() == a.fingerprint() {
		t.Fatal("the legacy fingerprint does not cover the CA keys")
	}
	mallory := a
	mallory.Keys = []string{"ssh-ed25519 AAAA mallory"}
	d := New(hclog.NewNullLogger())
	old := &opRecord{kind: kindProvision, fingerprint: a.legacyFingerprint()}
	if !d.sameRequest(old, a.fingerprint(), a.legacyFingerprint()) {
		t.Fatal("a record with the legacy fingerprint of the same request was not recognized")
	}
	if d.sameRequest(old, mallory.fingerprint(), mallory.legacyFingerprint()) {
		t.Fatal("another tenant's request matched the record")
	}
	fresh := &opRecord{kind: kindProvision, fingerprint: a.fingerprint()}
	if !d.sameRequest(fresh, b.fingerprint(), b.legacyFingerprint()) || d.sameRequest(fresh, mallory.fingerprint()) {
		t.Fatal("a current record: the CA keys mattered or another tenant matched")
	}
}
