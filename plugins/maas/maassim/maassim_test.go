package maassim_test

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	gomaas "github.com/canonical/gomaasclient/client"
	"github.com/canonical/gomaasclient/entity"
	"github.com/canonical/gomaasclient/entity/event"
	"github.com/canonical/gomaasclient/entity/node"
	gomaasapi "github.com/juju/gomaasapi/v2"

	"github.com/gpuaas/gpuaas/plugins/maas/maassim"
)

type bundle struct {
	sim *maassim.Server
	srv *httptest.Server
	cl  *gomaas.Client
	h   maassim.MachineSpec // an H100 machine, Ready
	n   maassim.MachineSpec // an L40S machine, New
}

func setup(t *testing.T, opts ...maassim.Option) *bundle {
	t.Helper()
	h, err := maassim.NewMachine(maassim.SKUH100, 0, "ready")
	if err != nil {
		t.Fatal(err)
	}
	n, err := maassim.NewMachine(maassim.SKUL40S, 0, "new")
	if err != nil {
		t.Fatal(err)
	}
	sim, err := maassim.New(append([]maassim.Option{maassim.WithTiming(maassim.InstantTiming()), maassim.WithMachines(h, n)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(sim)
	t.Cleanup(func() {
		srv.Close()
		sim.Close()
	})
	cl, err := gomaas.GetClient(srv.URL+"/MAAS/", sim.APIKey(), "2.0")
	if err != nil {
		t.Fatal(err)
	}
	return &bundle{sim: sim, srv: srv, cl: cl, h: h, n: n}
}

func statusOf(t *testing.T, err error) int {
	t.Helper()
	se, ok := gomaasapi.GetServerError(err)
	if !ok {
		t.Fatalf("want a MAAS server error, got %v", err)
	}
	return se.StatusCode
}

// waitStatus polls the machine until it reaches want.
func waitStatus(t *testing.T, cl *gomaas.Client, id string, want node.Status) *entity.Machine {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		m, err := cl.Machine.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		if m.Status == want {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("machine %s is %s, want %d", id, m.StatusName, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestOAuth(t *testing.T) {
	t.Parallel()
	b := setup(t)
	key := strings.Split(b.sim.APIKey(), ":")
	sign := func(consumer, token, secret string, ts int64, nonce, method string) string {
		return fmt.Sprintf(`OAuth realm="MAAS API", oauth_consumer_key="%s", oauth_token="%s", oauth_signature_method="%s", oauth_signature="%s", oauth_timestamp="%d", oauth_nonce="%s", oauth_version="1.0"`,
			consumer, token, method, url.QueryEscape("&"+secret), ts, nonce)
	}
	now := time.Now().Unix()
	cases := []struct {
		name   string
		auth   string
		status int
		body   string
	}{
		{"valid", sign(key[0], key[1], key[2], now, "n1", "PLAINTEXT"), 200, ""},
		{"no header", "", 401, "Authorization Required"},
		{"not oauth", "Bearer abc", 401, "Authorization Required"},
		{"unknown consumer", sign("nope", key[1], key[2], now, "n2", "PLAINTEXT"), 401, "Invalid API key"},
		{"unknown token", sign(key[0], "nope", key[2], now, "n3", "PLAINTEXT"), 401, "Invalid access token: nope"},
		{"wrong secret", sign(key[0], key[1], "wrong", now, "n4", "PLAINTEXT"), 401, "Invalid signature"},
		{"expired timestamp", sign(key[0], key[1], key[2], now-3600, "n5", "PLAINTEXT"), 401, "Expired timestamp"},
		{"hmac method", sign(key[0], key[1], key[2], now, "n6", "HMAC-SHA1"), 401, "not supported"},
		{"replayed nonce", sign(key[0], key[1], key[2], now, "n1", "PLAINTEXT"), 401, "Nonce already used"},
		{"bad timestamp", strings.Replace(sign(key[0], key[1], key[2], now, "n7", "PLAINTEXT"), strconv.FormatInt(now, 10), "soon", 1), 400, "unexpected type"},
	}
	for _, c := range cases { // in order: "replayed nonce" reuses "valid"'s nonce
		req, _ := http.NewRequest(http.MethodGet, b.srv.URL+"/MAAS/api/2.0/machines/", nil)
		if c.auth != "" {
			req.Header.Set("Authorization", c.auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode != c.status || !strings.Contains(string(body), c.body) {
			t.Errorf("%s: got %d %q, want %d containing %q", c.name, resp.StatusCode, body, c.status, c.body)
		}
	}
	t.Run("version is anonymous", func(t *testing.T) {
		resp, err := http.Get(b.srv.URL + "/MAAS/api/2.0/version/")
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("version: %d", resp.StatusCode)
		}
	})
	t.Run("gomaasapi client with a bad key", func(t *testing.T) {
		cl, err := gomaas.GetClient(b.srv.URL+"/MAAS/", key[0]+":"+key[1]+":wrong", "2.0")
		if err != nil {
			t.Fatal(err)
		}
		_, err = cl.Machines.Get(&entity.MachinesParams{})
		if got := statusOf(t, err); got != 401 {
			t.Fatalf("got %d", got)
		}
	})
}

func TestLifecycle(t *testing.T) {
	t.Parallel()
	b := setup(t, maassim.WithTiming(maassim.FastTiming().Scaled(0.2)))
	id := b.h.SystemID
	m, err := b.cl.Machines.Allocate(&entity.MachineAllocateParams{SystemID: id, AgentName: "test", Comment: "first"})
	if err != nil {
		t.Fatal(err)
	}
	if m.Status != node.StatusAllocated || m.Owner != "admin" {
		t.Fatalf("after allocate: %s owner %q", m.StatusName, m.Owner)
	}
	_, err = b.cl.Machines.Allocate(&entity.MachineAllocateParams{SystemID: id})
	if got := statusOf(t, err); got != 409 || !strings.Contains(err.Error(), "No machine with system ID "+id+" available.") {
		t.Fatalf("second allocate: %d %v", got, err)
	}
	if _, err := b.cl.Machine.SetWorkloadAnnotations(id, map[string]string{"k": "v"}); err != nil {
		t.Fatal(err)
	}
	userData := "#cloud-config\nusers: [default]\n"
	m, err = b.cl.Machine.Deploy(id, &entity.MachineDeployParams{UserData: base64.StdEncoding.EncodeToString([]byte(userData)), DistroSeries: "ubuntu/noble"})
	if err != nil {
		t.Fatal(err)
	}
	if m.Status != node.StatusDeploying {
		t.Fatalf("after deploy: %s", m.StatusName)
	}
	_, err = b.cl.Machine.Deploy(id, &entity.MachineDeployParams{})
	if got := statusOf(t, err); got != 409 {
		t.Fatalf("deploy while deploying: %d", got)
	}
	m = waitStatus(t, b.cl, id, node.StatusDeployed)
	if m.DistroSeries != "noble" || m.OSystem != "ubuntu" || m.WorkloadAnnotations["k"] != "v" {
		t.Fatalf("deployed machine: %+v", m)
	}
	deploys := b.sim.Deploys(id)
	if len(deploys) != 1 || deploys[0].UserData != userData {
		t.Fatalf("deploys: %+v", deploys)
	}
	m, err = b.cl.Machine.Release(id, &entity.MachineReleaseParams{Erase: true, QuickErase: true, Comment: "bye"})
	if err != nil {
		t.Fatal(err)
	}
	if m.Status != node.StatusDiskErasing {
		t.Fatalf("after release with erase: %s", m.StatusName)
	}
	_, err = b.cl.Machine.Release(id, &entity.MachineReleaseParams{})
	if got := statusOf(t, err); got != 409 {
		t.Fatalf("release while erasing: %d", got)
	}
	m = waitStatus(t, b.cl, id, node.StatusReady)
	if m.Owner != "" || len(m.WorkloadAnnotations) != 0 {
		t.Fatalf("released machine keeps owner %q annotations %v", m.Owner, m.WorkloadAnnotations)
	}
	if _, err := b.cl.Machine.Release(id, &entity.MachineReleaseParams{}); err != nil {
		t.Fatalf("releasing a Ready machine is a no-op in MAAS: %v", err)
	}
	ev, err := b.cl.Events.Get(&entity.EventParams{ID: id, Level: event.DEBUG, Limit: "100"})
	if err != nil {
		t.Fatal(err)
	}
	var types []string
	for i := len(ev.Events) - 1; i >= 0; i-- {
		types = append(types, ev.Events[i].Type)
	}
	joined := strings.Join(types, "|")
	for _, want := range []string{"User acquiring node", "User starting deployment", "Deployed", "User erasing disk", "Released"} {
		if !strings.Contains(joined, want) {
			t.Errorf("events %v lack %q", types, want)
		}
	}
	if _, err := b.cl.Machine.Get("nosuch"); statusOf(t, err) != 404 {
		t.Fatalf("unknown machine: %v", err)
	}
}

func TestDeleteMachine(t *testing.T) {
	t.Parallel()
	admin := maassim.Credential{Username: "admin", ConsumerKey: "ck1", TokenKey: "tk1", TokenSecret: "ts1"}
	user := maassim.Credential{Username: "alice", ConsumerKey: "ck2", TokenKey: "tk2", TokenSecret: "ts2"}
	b := setup(t, maassim.WithCredential(admin), maassim.WithCredential(user))
	alice, err := gomaas.GetClient(b.srv.URL+"/MAAS/", user.APIKey(), "2.0")
	if err != nil {
		t.Fatal(err)
	}
	id := b.n.SystemID
	if err := alice.Machine.Delete(id); statusOf(t, err) != http.StatusForbidden {
		t.Fatalf("delete by a user who is no admin: %v", err)
	}
	if err := b.cl.Machine.Delete(id); err != nil {
		t.Fatal(err)
	}
	if _, err := b.cl.Machine.Get(id); statusOf(t, err) != http.StatusNotFound {
		t.Fatalf("deleted machine: %v", err)
	}
	ms, err := b.cl.Machines.Get(&entity.MachinesParams{})
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 1 || ms[0].SystemID != b.h.SystemID {
		t.Fatalf("machines after the delete: %d, want only %s", len(ms), b.h.SystemID)
	}
}

func TestFailures(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		failure maassim.Failure
		erase   bool
		want    node.Status
		reason  string
	}{
		{"deploy", maassim.Failure{Deploy: "Installation failed (refer to the installation log for more information)."}, false, node.StatusFailedDeployment, "Installation failed"},
		{"erase", maassim.Failure{Erase: "Failed to erase disks."}, true, node.StatusFailedDiskErasing, "Failed to erase disks."},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			id := b.h.SystemID
			if err := b.sim.InjectFailure(id, c.failure); err != nil {
				t.Fatal(err)
			}
			if _, err := b.cl.Machine.Deploy(id, &entity.MachineDeployParams{}); err != nil {
				t.Fatal(err)
			}
			if c.erase {
				waitStatus(t, b.cl, id, node.StatusDeployed)
				if _, err := b.cl.Machine.Release(id, &entity.MachineReleaseParams{Erase: true}); err != nil {
					t.Fatal(err)
				}
			}
			m := waitStatus(t, b.cl, id, c.want)
			if !strings.Contains(m.StatusMessage, c.reason) {
				t.Fatalf("status message %q lacks %q", m.StatusMessage, c.reason)
			}
			if _, err := b.cl.Machine.Release(id, &entity.MachineReleaseParams{}); err != nil {
				t.Fatalf("a failed machine can be released: %v", err)
			}
		})
	}
	t.Run("stuck and advanced", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		id := b.h.SystemID
		if err := b.sim.InjectFailure(id, maassim.Failure{Stuck: "deploying"}); err != nil {
			t.Fatal(err)
		}
		if _, err := b.cl.Machine.Deploy(id, &entity.MachineDeployParams{}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
		if m, _ := b.cl.Machine.Get(id); m.Status != node.StatusDeploying {
			t.Fatalf("stuck deploy is %s", m.StatusName)
		}
		if err := b.sim.Advance(id); err != nil {
			t.Fatal(err)
		}
		waitStatus(t, b.cl, id, node.StatusDeployed)
	})
	t.Run("5xx on the next calls", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		if err := b.sim.InjectFault(maassim.Fault{Count: 2, Status: 502, Path: "machines/"}); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 2; i++ {
			_, err := b.cl.Machines.Get(&entity.MachinesParams{})
			if got := statusOf(t, err); got != 502 {
				t.Fatalf("call %d: %d", i, got)
			}
		}
		if _, err := b.cl.Machines.Get(&entity.MachinesParams{}); err != nil {
			t.Fatalf("third call: %v", err)
		}
	})
}

func TestScripts(t *testing.T) {
	t.Parallel()
	b := setup(t)
	script := "#!/bin/bash\n# --- Start MAAS 1.0 script metadata ---\n# name: 50-probe\n# script_type: commissioning\n# timeout: 00:02:00\n# --- End MAAS 1.0 script metadata ---\necho hi\n"
	cases := []struct {
		name    string
		params  entity.NodeScriptParams
		content string
		field   string
	}{
		{"no shebang", entity.NodeScriptParams{Name: "x"}, "echo hi\n", "script"},
		{"override embedded yaml", entity.NodeScriptParams{Name: "other"}, script, "name"},
		{"bad type", entity.NodeScriptParams{Name: "y", ScriptType: "bogus"}, "#!/bin/sh\n", "script_type"},
	}
	for _, c := range cases {
		_, err := b.cl.NodeScripts.Create(&c.params, []byte(c.content))
		if got := statusOf(t, err); got != 400 || !strings.Contains(err.Error(), `"`+c.field+`"`) {
			t.Errorf("%s: %d %v, want 400 naming %q", c.name, got, err, c.field)
		}
	}
	sc, err := b.cl.NodeScripts.Create(&entity.NodeScriptParams{Comment: "v1"}, []byte(script))
	if err != nil {
		t.Fatal(err)
	}
	if sc.Name != "50-probe" || sc.Type != entity.ScriptTypeCommissioning || sc.Timeout != "0:02:00" {
		t.Fatalf("created %+v", sc)
	}
	_, err = b.cl.NodeScripts.Create(&entity.NodeScriptParams{}, []byte(script))
	if got := statusOf(t, err); got != 400 || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("duplicate: %d %v", got, err)
	}
	v2 := strings.Replace(script, "echo hi", "echo bye", 1)
	if _, err := b.cl.NodeScript.Update("50-probe", &entity.NodeScriptParams{Comment: "v2"}, []byte(v2)); err != nil {
		t.Fatal(err)
	}
	got, err := b.cl.NodeScript.Get("50-probe", true)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.History) != 2 {
		t.Fatalf("history %+v", got.History)
	}
	if data, _ := base64.StdEncoding.DecodeString(got.History[0].Data); string(data) != v2 {
		t.Fatalf("newest revision %q", data)
	}
	if _, err := b.cl.NodeScript.Get("nope", false); statusOf(t, err) != 404 {
		t.Fatal("unknown script")
	}
}

func TestCommissioningRunsWebhookScript(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var got []*http.Request
	var bodies [][]byte
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		defer mu.Unlock()
		got = append(got, r)
		bodies = append(bodies, body)
		if len(got) == 1 {
			w.WriteHeader(http.StatusServiceUnavailable) // curl --retry covers it
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	defer hook.Close()
	b := setup(t)
	const secret = "s3cret-with-'quote-0123456789abcdef"
	script := "#!/bin/bash\n# --- Start MAAS 1.0 script metadata ---\n# name: 99-hook\n# script_type: commissioning\n# --- End MAAS 1.0 script metadata ---\n" +
		"WEBHOOK_URL='" + hook.URL + "/hook'\nWEBHOOK_SECRET='s3cret-with-'\\''quote-0123456789abcdef'\n"
	if _, err := b.cl.NodeScripts.Create(&entity.NodeScriptParams{}, []byte(script)); err != nil {
		t.Fatal(err)
	}
	id := b.n.SystemID
	if m, _ := b.cl.Machine.Get(id); m.Status != node.StatusNew || m.CPUCount != 0 {
		t.Fatalf("new machine: %s cpus %d", m.StatusName, m.CPUCount)
	}
	if _, err := b.cl.Machine.Commission(id, &entity.MachineCommissionParams{}); err != nil {
		t.Fatal(err)
	}
	m := waitStatus(t, b.cl, id, node.StatusReady)
	if m.CPUCount != b.n.CPUCount || m.HardwareInfo["cpu_model"] != b.n.CPUModel {
		t.Fatalf("commissioned machine: cpus %d model %q", m.CPUCount, m.HardwareInfo["cpu_model"])
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(b.sim.Webhooks()) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	d := b.sim.Webhooks()
	if len(d) != 1 || d[0].Attempts != 2 || d[0].Status != http.StatusNoContent {
		t.Fatalf("deliveries %+v", d)
	}
	mu.Lock()
	r, body := got[1], bodies[1]
	mu.Unlock()
	ts, _ := strconv.ParseInt(r.Header.Get("X-Gpuaas-Timestamp"), 10, 64)
	if want := maassim.WebhookSignature(secret, ts, body); r.Header.Get("X-Gpuaas-Signature") != want {
		t.Fatalf("signature %q, want %q", r.Header.Get("X-Gpuaas-Signature"), want)
	}
	var report struct {
		SystemID string `json:"system_id"`
		GPUs     []struct {
			Model string `json:"model"`
		} `json:"gpus"`
		GPUSource string `json:"gpu_source"`
	}
	if err := json.Unmarshal(body, &report); err != nil {
		t.Fatalf("body %s: %v", body, err)
	}
	if report.SystemID != id || len(report.GPUs) != 4 || report.GPUSource != "lspci" || report.GPUs[0].Model != "NVIDIA Corporation AD102GL [L40S]" {
		t.Fatalf("report %+v", report)
	}
	results, err := b.cl.NodeResults.Get(id, &entity.NodeResultParams{Filters: "99-hook", IncludeOutput: true})
	if err != nil {
		t.Fatal(err)
	}
	var stdout []byte
	for _, set := range results {
		for _, res := range set.Results {
			if res.Name == "99-hook" {
				stdout, _ = base64.StdEncoding.DecodeString(res.Stdout)
			}
		}
	}
	if strings.TrimSpace(string(stdout)) != string(body) {
		t.Fatalf("stored result %q, want the posted body", stdout)
	}
	devs, err := b.cl.NodeDevices.Get(id, &entity.NodeDeviceParams{HardwareType: "gpu"})
	if err != nil || len(devs) != 4 || devs[0].ProductName != "AD102GL [L40S]" {
		t.Fatalf("devices %+v %v", devs, err)
	}
}

func TestControlsOverHTTP(t *testing.T) {
	t.Parallel()
	b := setup(t)
	post := func(path, body string) int {
		resp, err := http.Post(b.srv.URL+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		return resp.StatusCode
	}
	if got := post("/_sim/machines/"+b.h.SystemID+"/failure", `{"deploy":"boom"}`); got != 200 {
		t.Fatalf("failure: %d", got)
	}
	if got := post("/_sim/machines/nosuch/advance", ``); got != 404 {
		t.Fatalf("unknown machine: %d", got)
	}
	if got := post("/_sim/faults", `{"count":1,"status":500}`); got != 200 {
		t.Fatalf("faults: %d", got)
	}
	_, err := b.cl.Machines.Get(&entity.MachinesParams{})
	if statusOf(t, err) != 500 {
		t.Fatal("fault not applied")
	}
	st, err := b.sim.Machine(b.h.SystemID)
	if err != nil || st.Failure.Deploy != "boom" {
		t.Fatalf("state %+v %v", st, err)
	}
	if _, err := b.sim.Machine("nosuch"); !errors.Is(err, maassim.ErrNoMachine) {
		t.Fatalf("got %v", err)
	}
	calls := b.sim.Calls()
	if len(calls) == 0 || calls[len(calls)-1].Status != 500 {
		t.Fatalf("calls %+v", calls)
	}
}

func TestLoadSpecs(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		file    string
		content string
		want    int
		err     string
	}{
		{"yaml", "m.yaml", "machines:\n  - hostname: gpu-a\n    cpu_model: EPYC\n    cpu_count: 8\n    memory_mib: 1024\n    disks: [{name: sda, size_bytes: 1000}]\n    gpus: [{model: NVIDIA A100, pci_name: \"GA100 [A100 SXM4 80GB]\", product_id: \"20b2\", count: 4, memory_mib: 81920}]\n", 1, ""},
		{"json", "m.json", `{"machines":[{"hostname":"gpu-b","status":"new","cpu_model":"x","cpu_count":1,"memory_mib":1,"disks":[{"name":"sda","size_bytes":1}]}]}`, 1, ""},
		{"unknown field", "m.json", `{"machines":[{"hostname":"gpu-b","cpus":1}]}`, 0, "unknown field"},
		{"no disks", "m.yaml", "machines:\n  - {hostname: c, cpu_model: x, cpu_count: 1, memory_mib: 1}\n", 0, "disk"},
		{"bad status", "m.yaml", "machines:\n  - {hostname: c, status: deployed, cpu_model: x, cpu_count: 1, memory_mib: 1, disks: [{name: sda, size_bytes: 1}]}\n", 0, "status"},
		{"bad gpu", "m.yaml", "machines:\n  - {hostname: c, cpu_model: x, cpu_count: 1, memory_mib: 1, disks: [{name: sda, size_bytes: 1}], gpus: [{model: x, count: 1}]}\n", 0, "gpu"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), c.file)
			if err := os.WriteFile(p, []byte(c.content), 0o644); err != nil {
				t.Fatal(err)
			}
			specs, err := maassim.LoadSpecs(p)
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("got %v, want an error about %q", err, c.err)
				}
				return
			}
			if err != nil || len(specs) != c.want || specs[0].SystemID == "" {
				t.Fatalf("got %+v %v", specs, err)
			}
			if _, err := maassim.New(maassim.WithMachines(specs...)); err != nil {
				t.Fatal(err)
			}
		})
	}
}
