package maas_test

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/plugins/maas"
	"github.com/gpuaas/gpuaas/plugins/maas/maassim"
)

// TestCommissioningScriptMatchesSimulator runs the commissioning script the
// driver installs with bash, on a stand-in for a machine: its files and
// tools print what the simulated machine shows (nvidia-smi present on the
// H100 machine, only lspci on the L40S one). The webhook it posts must be
// byte for byte what the simulator sends for that machine, signed as the
// driver verifies it: the simulator's Go rendition of the script is the
// script.
func TestCommissioningScriptMatchesSimulator(t *testing.T) {
	for _, tool := range []string{"bash", "curl", "openssl", "sed", "tr", "head"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("the commissioning script needs %s: %v", tool, err)
		}
	}
	const secret = "it's-a-secret-with-a-quote-0123456789"
	cases := []struct {
		sku    maassim.SKU
		source string
	}{
		{maassim.SKUH100, "nvidia-smi"},
		{maassim.SKUL40S, "lspci"},
	}
	for _, c := range cases {
		t.Run(string(c.sku), func(t *testing.T) {
			t.Parallel()
			spec, err := maassim.NewMachine(c.sku, 0, "ready")
			if err != nil {
				t.Fatal(err)
			}
			sim, err := maassim.New(maassim.WithMachines(spec))
			if err != nil {
				t.Fatal(err)
			}
			defer sim.Close()
			env, err := sim.Environment(spec.SystemID)
			if err != nil {
				t.Fatal(err)
			}

			type delivery struct {
				body   []byte
				header http.Header
			}
			got := make(chan delivery, 1)
			recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				body, _ := io.ReadAll(r.Body)
				got <- delivery{body: body, header: r.Header.Clone()}
				w.WriteHeader(http.StatusAccepted)
			}))
			defer recv.Close()

			dir := t.TempDir()
			bin := filepath.Join(dir, "bin")
			if err := os.Mkdir(bin, 0o755); err != nil {
				t.Fatal(err)
			}
			write := func(name, content string, mode os.FileMode) string {
				p := filepath.Join(dir, name)
				if err := os.WriteFile(p, []byte(content), mode); err != nil {
					t.Fatal(err)
				}
				return p
			}
			tool := func(name, output string) {
				data := write(name+".out", output, 0o644)
				write(filepath.Join("bin", name), "#!/bin/sh\nexec cat "+data+"\n", 0o755)
			}
			tool("hostname", env.Hostname)
			tool("nproc", env.Nproc)
			tool("lsblk", env.Lsblk)
			tool("lspci", env.Lspci)
			if env.NvidiaSMI != nil {
				tool("nvidia-smi", *env.NvidiaSMI)
			}
			script := string(maas.CommissioningScript("99-gpuaas-report-test", "test", recv.URL+"/api/v1/webhooks/maas/test", secret))
			// Point the machine's files at the stand-ins; the rest runs as is.
			for name, content := range map[string]string{"INSTANCE_ID_FILE": env.InstanceID, "CPUINFO": env.CPUInfo, "MEMINFO": env.MemInfo} {
				path := write(strings.ToLower(name), content, 0o644)
				re := regexp.MustCompile(`(?m)^` + name + `=.*$`)
				if !re.MatchString(script) {
					t.Fatalf("the script has no %s assignment", name)
				}
				script = re.ReplaceAllLiteralString(script, name+"='"+path+"'")
			}
			scriptPath := write("script", script, 0o755)

			cmd := exec.Command("bash", scriptPath)
			cmd.Env = []string{"PATH=" + bin + ":/usr/local/bin:/usr/bin:/bin", "LC_ALL=C"}
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Run(); err != nil {
				t.Fatalf("script: %v\n%s", err, stderr.String())
			}
			var d delivery
			select {
			case d = <-got:
			default:
				t.Fatalf("the script posted nothing; stderr:\n%s", stderr.String())
			}
			ts, err := strconv.ParseInt(d.header.Get(maas.TimestampHeader), 10, 64)
			if err != nil {
				t.Fatalf("timestamp header %q", d.header.Get(maas.TimestampHeader))
			}
			if want := env.WebhookBody(ts); !bytes.Equal(d.body, want) {
				t.Fatalf("the script posted\n%s\nthe simulator sends\n%s", d.body, want)
			}
			if strings.TrimSpace(stdout.String()) != string(d.body) {
				t.Errorf("the script printed %q, not the body it posted", stdout.String())
			}
			if want := maas.SignWebhook([]byte(secret), ts, d.body)[maas.SignatureHeader]; d.header.Get(maas.SignatureHeader) != want {
				t.Fatalf("signature %q, want %q", d.header.Get(maas.SignatureHeader), want)
			}
			if want := maassim.WebhookSignature(secret, ts, d.body); d.header.Get(maas.SignatureHeader) != want {
				t.Fatalf("the simulator signs %q, the script %q", want, d.header.Get(maas.SignatureHeader))
			}
			if !strings.Contains(string(d.body), `"gpu_source":"`+c.source+`"`) {
				t.Fatalf("body %s: want GPUs from %s", d.body, c.source)
			}
		})
	}
}
