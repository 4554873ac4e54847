package daemon_test

import (
	"encoding/json"
	"testing"

	"github.com/google/uuid"
)

// PATCH /admin/nodes/{id} changes a node's SKU, the port the core reaches its
// sshd on (the browser terminal), or both in one transaction, with one audit
// row; bad input is refused with the field named and changes nothing.
func TestAdminUpdateNode(t *testing.T) {
	p := newProvEnv(t, provOptions{timing: fastTiming(), h100: 1})
	var node uuid.UUID
	var sku string
	for sys, id := range p.registerAll() {
		node, sku = id, p.machines[sys]
	}
	path := "/api/v1/admin/nodes/" + node.String()
	type view struct {
		SSHPort int    `json:"ssh_port"`
		SKU     string `json:"sku_id"`
	}
	get := func() view {
		t.Helper()
		var v view
		p.call("GET", path, p.admin, nil).json(t, &v)
		return v
	}
	if v := get(); v.SSHPort != 22 || v.SKU != sku {
		t.Fatalf("a registered node: %+v; want port 22 and SKU %s", v, sku)
	}

	r := p.call("PATCH", path, p.admin, map[string]any{"ssh_port": 2222})
	var v view
	r.json(t, &v)
	if r.status != 200 || v.SSHPort != 2222 || v.SKU != sku {
		t.Fatalf("PATCH ssh_port: %d %s", r.status, r.body)
	}
	var port int
	if err := p.pool.QueryRow(t.Context(), `SELECT ssh_port FROM nodes WHERE id = $1`, node).Scan(&port); err != nil || port != 2222 {
		t.Fatalf("nodes.ssh_port %d (%v); want 2222", port, err)
	}

	for name, c := range map[string]struct {
		body        any
		status      int
		code, field string
	}{
		"empty":         {map[string]any{}, 400, "validation_failed", ""},
		"port zero":     {map[string]any{"ssh_port": 0}, 400, "validation_failed", "ssh_port"},
		"port too big":  {map[string]any{"ssh_port": 65536}, 400, "validation_failed", "ssh_port"},
		"port a string": {map[string]any{"ssh_port": "22"}, 400, "validation_failed", "ssh_port"},
		"unknown field": {map[string]any{"ssh_port": 22, "hostname": "x"}, 400, "unknown_field", "hostname"},
		"unknown sku":   {map[string]any{"ssh_port": 22, "sku_id": "no-such-sku"}, 404, "sku_not_found", ""},
	} {
		r := p.call("PATCH", path, p.admin, c.body)
		var e struct {
			Error struct {
				Details map[string]any `json:"details"`
			} `json:"error"`
		}
		_ = json.Unmarshal(r.body, &e)
		if r.status != c.status || r.code() != c.code || (c.field != "" && e.Error.Details["field"] != c.field) {
			t.Errorf("%s: %d %s; want %d %s naming %q", name, r.status, r.body, c.status, c.code, c.field)
		}
	}
	if v := get(); v.SSHPort != 2222 || v.SKU != sku {
		t.Fatalf("after refused changes: %+v; want them to change nothing", v)
	}
	if r := p.call("PATCH", "/api/v1/admin/nodes/"+uuid.NewString(), p.admin, map[string]any{"ssh_port": 22}); r.status != 404 || r.code() != "node_not_found" {
		t.Fatalf("an unknown node: %d %s", r.status, r.body)
	}

	// Both at once: one transaction, one audit row naming both.
	if r := p.call("PATCH", path, p.admin, map[string]any{"ssh_port": 22, "sku_id": sku}); r.status != 200 {
		t.Fatalf("PATCH both: %d %s", r.status, r.body)
	}
	rows, err := p.pool.Query(t.Context(), `SELECT details FROM audit_log WHERE action = 'node.update' AND target LIKE '%' || $1 ORDER BY id`, node.String())
	if err != nil {
		t.Fatal(err)
	}
	var audits []map[string]any
	for rows.Next() {
		var d map[string]any
		if err := rows.Scan(&d); err != nil {
			t.Fatal(err)
		}
		audits = append(audits, d)
	}
	if rows.Err() != nil || len(audits) != 2 {
		t.Fatalf("%d node.update audit rows (%v); want 2", len(audits), rows.Err())
	}
	if a := audits[0]; a["ssh_port_from"] != float64(22) || a["ssh_port_to"] != float64(2222) || a["sku_to"] != nil {
		t.Fatalf("first audit row %v", a)
	}
	if a := audits[1]; a["ssh_port_from"] != float64(2222) || a["ssh_port_to"] != float64(22) || a["sku_to"] != sku {
		t.Fatalf("second audit row %v", a)
	}
}
