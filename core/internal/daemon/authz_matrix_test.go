package daemon_test

import (
	"fmt"
	"net/http"
	"sort"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
)

// ok means any success (2xx, or a 3xx redirect).
const ok = 2

// expect is the status per role, in the order of roles.
type expect [7]int

var (
	public         = expect{ok, ok, ok, ok, ok, ok, ok}
	everyone401    = expect{401, 401, 401, 401, 401, 401, 401}
	adminOnly      = expect{401, 403, 403, 403, 403, 403, ok}
	self           = expect{401, ok, ok, ok, ok, ok, ok}
	usersOnly      = expect{401, ok, ok, ok, ok, 403, ok}
	orgRead        = expect{401, 404, ok, ok, ok, ok, ok}
	orgMembersRead = expect{401, 404, ok, ok, ok, 403, ok}
	orgManage      = expect{401, 404, 403, 403, ok, 403, ok}
	projectRead    = expect{401, 404, ok, ok, ok, 404, ok}
	saRead         = expect{401, 404, 403, ok, ok, 404, ok}
	projectManage  = expect{401, 404, 403, 403, ok, 404, ok}
	billingRead    = expect{401, 404, 403, 403, ok, 403, ok}
	projectWrite   = expect{401, 404, 403, ok, ok, 404, ok}
)

type matrixCase struct {
	expect expect
	body   func(w *world) any
	query  string
}

// matrix has one entry per operation of api/openapi.yaml. A route added to the
// contract without an entry here fails TestAuthorizationMatrix.
var matrix = map[string]matrixCase{
	"getHealthz":     {expect: public},
	"getReadyz":      {expect: public},
	"getMetrics":     {expect: public},
	"listPolicyKeys": {expect: public},
	"oidcAuthorize":  {expect: public},
	"oidcExchange":   {expect: everyone401, body: func(*world) any { return map[string]string{"code": "bogus", "state": "bogus"} }},
	"localLogin": {expect: everyone401, body: func(*world) any {
		return map[string]string{"login": "nobody@example.test", "password": "not-the-password"}
	}},
	"refreshToken": {expect: everyone401, body: func(*world) any { return map[string]string{"refresh_token": "gpr_bogus"} }},
	"logout":       {expect: expect{401, 400, 400, 400, 400, 400, 400}},

	"getMe":          {expect: self},
	"listMyAPIKeys":  {expect: usersOnly},
	"createMyAPIKey": {expect: usersOnly, body: func(*world) any { return map[string]string{"name": "laptop"} }},
	"revokeMyAPIKey": {expect: usersOnly},

	"listOrgs":        {expect: self},
	"createOrg":       {expect: usersOnly, body: func(*world) any { return map[string]string{"slug": "o-" + uuid.NewString()[:8], "name": "New"} }},
	"getOrg":          {expect: orgRead},
	"updateOrg":       {expect: orgManage, body: func(*world) any { return map[string]string{"name": "Renamed"} }},
	"listOrgMembers":  {expect: orgMembersRead},
	"addOrgMember":    {expect: orgManage, body: func(w *world) any { return map[string]string{"email": w.strangerMail, "role": "member"} }},
	"updateOrgMember": {expect: orgManage, body: func(*world) any { return map[string]string{"role": "billing"} }},
	"removeOrgMember": {expect: orgManage},
	"listProjects":    {expect: orgMembersRead},
	"createProject":   {expect: orgManage, body: func(*world) any { return map[string]string{"slug": "p-" + uuid.NewString()[:8], "name": "New"} }},

	"getProject":          {expect: projectRead},
	"updateProject":       {expect: projectManage, body: func(*world) any { return map[string]string{"name": "Renamed"} }},
	"listProjectMembers":  {expect: projectRead},
	"addProjectMember":    {expect: projectManage, body: func(w *world) any { return map[string]string{"user_id": w.spare.String(), "role": "viewer"} }},
	"updateProjectMember": {expect: projectManage, body: func(*world) any { return map[string]string{"role": "viewer"} }},
	"removeProjectMember": {expect: projectManage},

	"listServiceAccounts":     {expect: saRead},
	"createServiceAccount":    {expect: projectManage, body: func(*world) any { return map[string]string{"name": "sa-" + uuid.NewString()[:8], "role": "viewer"} }},
	"getServiceAccount":       {expect: saRead},
	"deleteServiceAccount":    {expect: projectManage},
	"listServiceAccountKeys":  {expect: saRead},
	"createServiceAccountKey": {expect: projectManage, body: func(*world) any { return map[string]string{"name": "ci-2"} }},
	"revokeServiceAccountKey": {expect: projectManage},

	"listAuditLogs":       {expect: adminOnly},
	"exportAuditLogs":     {expect: adminOnly},
	"adminListUsers":      {expect: adminOnly},
	"adminUpdateUser":     {expect: adminOnly, body: func(*world) any { return map[string]string{"status": "disabled"} }},
	"listPolicyOverrides": {expect: adminOnly},
	"setPolicyOverride":   {expect: adminOnly, body: func(*world) any { return map[string]any{"scope": "global", "value": 5} }},
	"clearPolicyOverride": {expect: adminOnly, query: "?scope=global"},

	"listSKUs":      {expect: public},
	"adminListSKUs": {expect: adminOnly},
	"adminCreateSKU": {expect: adminOnly, body: func(*world) any {
		return map[string]any{"id": "h100-" + uuid.NewString()[:8], "gpu_model": "NVIDIA H100 80GB", "gpus_per_node": 8, "cpu_cores": 96,
			"memory_gib": 1024, "disk_gib": 7680, "price_per_gpu_hour_minor": 249, "currency": "USD"}
	}},
	"adminUpdateSKU": {expect: expect{401, 403, 403, 403, 403, 403, 404}, body: func(*world) any { return map[string]any{"active": false} }},

	"listSSHKeys":  {expect: usersOnly},
	"addSSHKey":    {expect: usersOnly, body: func(w *world) any { return map[string]string{"name": "laptop", "public_key": w.sshKey} }},
	"deleteSSHKey": {expect: expect{401, 404, 404, 404, 404, 403, 404}},

	"getBalance":  {expect: billingRead, query: "?org_id={org_id}"},
	"listLedger":  {expect: billingRead, query: "?org_id={org_id}"},
	"listUsage":   {expect: billingRead, query: "?org_id={org_id}"},
	"exportUsage": {expect: billingRead, query: "?org_id={org_id}"},
	// No payments provider is configured here: allowed callers reach the provider
	// lookup (503) or the missing customer (409), refused ones never do.
	"createCheckoutSession": {expect: expect{401, 404, 403, 403, 503, 403, 503}, body: func(w *world) any {
		return map[string]any{"org_id": w.orgA, "amount_minor": 2000, "success_url": "https://app.test/ok", "cancel_url": "https://app.test/cancel"}
	}},
	"createPortalSession": {expect: expect{401, 404, 403, 403, 409, 403, 409}, body: func(w *world) any {
		return map[string]any{"org_id": w.orgA, "return_url": "https://app.test/billing"}
	}},
	"paymentsWebhook":          {expect: expect{503, 503, 503, 503, 503, 503, 503}, body: func(*world) any { return map[string]any{} }},
	"adminListPaymentSessions": {expect: adminOnly},
	"adminRefundPayment": {expect: expect{401, 403, 403, 403, 403, 403, 404}, body: func(*world) any {
		return map[string]any{"amount_minor": 100, "reason": "goodwill"}
	}},
	"adminListPlugins":         {expect: adminOnly},
	"adminListPluginInstances": {expect: adminOnly},
	"adminInstallPlugin": {expect: expect{401, 403, 403, 403, 403, 403, 400}, body: func(*world) any {
		return map[string]any{"path": "/nonexistent/gpuaas-plugin-x"}
	}},
	"adminUpdatePlugin":            {expect: expect{401, 403, 403, 403, 403, 403, 404}, body: func(*world) any { return map[string]any{"enabled": false} }},
	"adminUpdatePluginInstance":    {expect: expect{401, 403, 403, 403, 403, 403, 404}, body: func(*world) any { return map[string]any{"enabled": false} }},
	"adminConfigurePluginInstance": {expect: expect{401, 403, 403, 403, 403, 403, 404}, body: func(*world) any { return map[string]any{"plugin": "nope", "config": map[string]any{}} }},
	"getCapacity":                  {expect: public},
	"listAllocations":              {expect: projectRead, query: "?project_id={project_id}"},
	"getAllocation":                {expect: projectRead},
	"releaseAllocation":            {expect: projectWrite},
	"createTerminalToken":          {expect: projectWrite},
	"createAllocation": {expect: projectWrite, body: func(w *world) any {
		return map[string]any{"project_id": w.p1, "sku_id": w.sku, "ssh_public_keys": []string{w.sshKey}}
	}},
	"adminListAllocations":        {expect: adminOnly},
	"adminForceReleaseAllocation": {expect: adminOnly, body: func(*world) any { return map[string]any{"reason": "maintenance"} }},
	"adminListNodes":              {expect: adminOnly},
	"adminGetNode":                {expect: adminOnly},
	"adminUpdateNode":             {expect: adminOnly, body: func(w *world) any { return map[string]any{"sku_id": w.sku} }},
	"adminRetireNode":             {expect: adminOnly, body: func(*world) any { return map[string]any{"reason": "decommissioned"} }},
	// The fixture's provisioner instances are not configured: allowed callers
	// reach the driver lookup (404), refused ones never do.
	"adminProbeNode":         {expect: expect{401, 403, 403, 403, 403, 403, 404}},
	"adminSyncInstanceNodes": {expect: expect{401, 403, 403, 403, 403, 403, 404}},
	"adminRegisterNode": {expect: expect{401, 403, 403, 403, 403, 403, 404}, body: func(*world) any {
		return map[string]any{"provisioner_instance": "no-such-instance", "external_id": "abc123"}
	}},
	"adminMintEnrollmentToken": {expect: adminOnly, body: func(*world) any { return map[string]any{"ttl_seconds": 600} }},
	"adminGetTaskKey":          {expect: adminOnly},
	"adminRotateTaskKey":       {expect: adminOnly},
	// The driver task API by instance: {name} names no instance here.
	"adminGetInstanceNode": {expect: expect{401, 403, 403, 403, 403, 403, 404}},
	"adminGetNodeTask":     {expect: expect{401, 403, 403, 403, 403, 403, 404}},
	"adminEnqueueNodeTask": {expect: expect{401, 403, 403, 403, 403, 403, 404}, body: func(*world) any {
		return map[string]any{"external_id": "free", "type": "node.inventory", "operation_id": "op-1"}
	}},
	"maasWebhook": {expect: expect{404, 404, 404, 404, 404, 404, 404}, body: func(*world) any { return map[string]any{} }},
	// Project storage: P1 holds fixture/report.txt and a presigned upload
	// waiting for confirmation (see storable).
	"listStorage":           {expect: projectRead, query: "?project_id={project_id}&prefix=fixture/"},
	"getStorageUsage":       {expect: projectRead, query: "?project_id={project_id}"},
	"downloadStorageObject": {expect: projectRead, query: "?project_id={project_id}&path=fixture/report.txt"},
	"uploadStorageObject":   {expect: projectWrite, query: "?project_id={project_id}&path=new.txt", body: func(*world) any { return "hello" }},
	"mkdirStorage": {expect: projectWrite, body: func(w *world) any {
		return map[string]any{"project_id": w.p1, "path": "made/"}
	}},
	"renameStorage": {expect: projectWrite, body: func(w *world) any {
		return map[string]any{"project_id": w.p1, "from": w.storedPath, "to": "moved.txt"}
	}},
	"deleteStorage": {expect: projectWrite, query: "?project_id={project_id}&path=fixture/report.txt"},
	"presignStorageDownload": {expect: projectRead, body: func(w *world) any {
		return map[string]any{"project_id": w.p1, "path": w.storedPath}
	}},
	"presignStorageUpload": {expect: projectWrite, body: func(w *world) any {
		return map[string]any{"project_id": w.p1, "path": "big.bin", "size": 10}
	}},
	"completeStorageUpload": {expect: projectWrite},
	"adminAdjustBalance": {expect: adminOnly, body: func(w *world) any {
		return map[string]any{"org_id": w.orgA, "amount_minor": 500, "type": "promotional_credit", "reason": "welcome credit"}
	}},
}

// fill puts the world's ids into a path template for the caller r.
func (w *world) fill(tmpl string, r role) string {
	key := w.keyIDs[r]
	if strings.Contains(tmpl, "/service-accounts/") {
		key = w.saKey
	}
	return strings.NewReplacer(
		"{org_id}", w.orgA.String(),
		"{project_id}", w.p1.String(),
		"{user_id}", w.target.String(),
		"{service_account_id}", w.sa.String(),
		"{key_id}", key.String(),
		"{key}", "outbox.max_attempts",
		"{instance}", "stripe",
		"{name}", "no-such-plugin",
		"{session_id}", uuid.NewString(),
		"{sku_id}", "no-such-sku",
		"{allocation_id}", w.alloc.String(),
		"{node_id}", w.nodeFree.String(),
		"{upload_id}", w.storageUpload.String(),
		"{external_id}", "free",
		"{operation_id}", "op-1",
	).Replace(tmpl)
}

// TestAuthorizationMatrix drives every route of the contract as every kind of
// principal against a fresh fixture and checks the status class; every successful
// mutation must leave exactly one audit row (see env.send).
func TestAuthorizationMatrix(t *testing.T) {
	e := newEnv(t)
	spec, err := apigen.GetSpec()
	if err != nil {
		t.Fatal(err)
	}
	type op struct{ id, method, path string }
	var ops []op
	for path, item := range spec.Paths.Map() {
		for method, o := range item.Operations() {
			// The embedded spec carries oapi-codegen's capitalised ids.
			id := strings.ToLower(o.OperationID[:1]) + o.OperationID[1:]
			ops = append(ops, op{id, method, path})
		}
	}
	sort.Slice(ops, func(i, j int) bool { return ops[i].id < ops[j].id })
	seen := map[string]bool{}
	for _, o := range ops {
		seen[o.id] = true
		c, found := matrix[o.id]
		if !found {
			t.Errorf("operation %s (%s %s) has no authorization matrix entry", o.id, o.method, o.path)
			continue
		}
		t.Run(o.id, func(t *testing.T) {
			e.t = t
			for i, r := range roles {
				w := e.newWorld()
				e.rentable(w)
				var body any
				if c.body != nil {
					body = c.body(w)
				}
				got := e.send(o.method, w.fill(o.path+c.query, r), w.tokens[r], body)
				want := c.expect[i]
				pass := got.status == want || (want == ok && got.status >= 200 && got.status < 400)
				if !pass {
					t.Errorf("%s as %s: %d %s; want %s", o.id, r, got.status, got.body, statusName(want))
				}
				if (got.status == 404 || got.status == 403) && !strings.Contains(string(got.body), `"error"`) {
					t.Errorf("%s as %s: refusal is not the error envelope: %s", o.id, r, got.body)
				}
				if got.status == 404 && strings.Contains(string(got.body), w.orgA.String()) {
					t.Errorf("%s as %s: a 404 leaks data: %s", o.id, r, got.body)
				}
			}
		})
	}
	e.t = t
	// The core's own guard agrees: no successful mutation went unaudited.
	if m := e.call("GET", "/metrics", "", nil); !strings.Contains(string(m.body), "gpuaas_audit_missing_total 0") {
		t.Errorf("gpuaas_audit_missing_total is not 0 after the matrix")
	}
	for id := range matrix {
		if !seen[id] {
			t.Errorf("matrix entry %s names no operation of the contract", id)
		}
	}
}

func statusName(s int) string {
	if s == ok {
		return "success"
	}
	return fmt.Sprint(s)
}

// Ids of another tenant nested under ids the caller may use still answer 404.
func TestForeignNestedIDs(t *testing.T) {
	e := newEnv(t)
	w := e.newWorld()
	tok := w.tokens[orgAdmin]
	p1 := w.p1.String()
	cases := []struct{ method, path string }{
		{"GET", "/api/v1/projects/" + p1 + "/service-accounts/" + w.foreignSA.String()},
		{"DELETE", "/api/v1/projects/" + p1 + "/service-accounts/" + w.foreignSA.String()},
		{"GET", "/api/v1/projects/" + p1 + "/service-accounts/" + w.foreignSA.String() + "/api-keys"},
		{"DELETE", "/api/v1/projects/" + p1 + "/service-accounts/" + w.sa.String() + "/api-keys/" + w.foreignKey.String()},
		{"DELETE", "/api/v1/users/me/api-keys/" + w.foreignKey.String()},
		{"PATCH", "/api/v1/orgs/" + w.orgA.String() + "/members/" + w.foreignUser.String()},
		{"DELETE", "/api/v1/orgs/" + w.orgA.String() + "/members/" + w.foreignUser.String()},
		{"PATCH", "/api/v1/projects/" + p1 + "/members/" + w.foreignUser.String()},
		{"DELETE", "/api/v1/projects/" + p1 + "/members/" + w.foreignUser.String()},
		{"GET", "/api/v1/projects/" + w.pb.String()},
		{"GET", "/api/v1/orgs/" + w.orgB.String() + "/projects"},
		{"GET", "/api/v1/projects/" + uuid.NewString()},
	}
	for _, c := range cases {
		var body any
		if c.method == "PATCH" {
			body = map[string]string{"role": "viewer"}
			if strings.Contains(c.path, "/orgs/") {
				body = map[string]string{"role": "member"}
			}
		}
		r := e.send(c.method, c.path, tok, body)
		if r.status != http.StatusNotFound {
			t.Errorf("%s %s: %d %s; want 404", c.method, c.path, r.status, r.body)
		}
		if strings.Contains(string(r.body), w.orgB.String()) || strings.Contains(string(r.body), "foreign") {
			t.Errorf("%s %s: 404 leaks data: %s", c.method, c.path, r.body)
		}
	}
	// The foreign key survived every attempt.
	var revoked bool
	_ = e.pool.QueryRow(t.Context(), `SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = $1`, w.foreignKey).Scan(&revoked)
	if revoked {
		t.Fatal("a foreign API key was revoked")
	}
}
