package daemon_test

import (
	"testing"
)

// A POST with Idempotency-Key through the real core: the replay is the first
// response byte for byte and creates nothing; another body under the same key is
// 422; the key is the caller's own.
func TestIdempotencyThroughTheCore(t *testing.T) {
	e := newEnv(t)
	w := e.newWorld()
	tok := w.tokens[orgAdmin]
	path := "/api/v1/orgs/" + w.orgA.String() + "/projects"
	if r := e.send("POST", path, tok, map[string]string{"slug": "idem-proj", "name": "Idem"}); r.status != 201 {
		t.Fatalf("plain create: %d %s", r.status, r.body)
	}
	first := e.call("POST", path, tok, map[string]string{"slug": "idem-proj-2", "name": "Idem"}, "Idempotency-Key", "k-123")
	if first.status != 201 {
		t.Fatalf("first: %d %s", first.status, first.body)
	}
	before := e.auditCount("success")
	again := e.call("POST", path, tok, map[string]string{"slug": "idem-proj-2", "name": "Idem"}, "Idempotency-Key", "k-123")
	if again.status != 201 || string(again.body) != string(first.body) || again.header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("replay: %d %s (replayed=%q); want the first response byte for byte", again.status, again.body, again.header.Get("Idempotent-Replayed"))
	}
	if e.auditCount("success") != before {
		t.Fatal("the replay ran the handler again")
	}
	other := e.call("POST", path, tok, map[string]string{"slug": "idem-proj-3", "name": "Other"}, "Idempotency-Key", "k-123")
	if other.status != 422 || other.code() != "idempotency_key_reused" {
		t.Fatalf("same key, other body: %d %s", other.status, other.body)
	}
	// Another principal's identical key is another key.
	adm := e.call("POST", path, w.tokens[platAdmin], map[string]string{"slug": "idem-proj-4", "name": "Admin"}, "Idempotency-Key", "k-123")
	if adm.status != 201 {
		t.Fatalf("other principal: %d %s", adm.status, adm.body)
	}
	var n int
	_ = e.pool.QueryRow(t.Context(), `SELECT count(*) FROM projects WHERE org_id = $1 AND slug LIKE 'idem-proj%'`, w.orgA).Scan(&n)
	if n != 3 {
		t.Fatalf("%d projects, want 3", n)
	}
}
