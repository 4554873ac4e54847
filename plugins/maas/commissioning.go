package maas

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	gomaas "github.com/canonical/gomaasclient/client"
	"github.com/canonical/gomaasclient/entity"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// Webhook headers the commissioning script sends.
const (
	// TimestampHeader carries the Unix time the report was signed at.
	TimestampHeader = "X-Gpuaas-Timestamp"
	// SignatureHeader carries "sha256=" and the hex HMAC-SHA256 of
	// "<timestamp>.<body>" keyed with the webhook secret.
	SignatureHeader = "X-Gpuaas-Signature"
)

// scriptTemplate is the commissioning script the driver installs in MAAS.
// MAAS runs custom commissioning scripts on every machine it commissions,
// in the ephemeral environment and as root, after its built-in ones. The
// script reports the machine's facts to the core. Keep it POSIX-tool
// plain: the simulator (maassim) reproduces its logic byte for byte, and
// TestCommissioningScriptMatchesSimulator runs it with bash to prove it.
const scriptTemplate = `#!/bin/bash
# --- Start MAAS 1.0 script metadata ---
# name: @@NAME@@
# title: gpuaas node report
# description: Reports this machine's GPUs, CPU, memory and disks to the gpuaas control plane in a signed webhook.
# tags: gpuaas
# script_type: commissioning
# hardware_type: node
# parallel: any
# timeout: 00:05:00
# --- End MAAS 1.0 script metadata ---
#
# Installed by the gpuaas MAAS driver @@VERSION@@ for instance @@INSTANCE@@.
# The driver rewrites this script whenever it is configured: change the
# driver's configuration, not this script.
#
# It prints a JSON report (MAAS keeps it as this script's result) and POSTs
# it to WEBHOOK_URL with the headers
#   X-Gpuaas-Timestamp: <unix seconds>
#   X-Gpuaas-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" keyed with WEBHOOK_SECRET>
# A failed delivery is reported on stderr and does not fail commissioning:
# the driver also reads this script's result from MAAS.
set -u

WEBHOOK_URL=@@WEBHOOK_URL@@
WEBHOOK_SECRET=@@WEBHOOK_SECRET@@
INSTANCE_ID_FILE='/var/lib/cloud/data/instance-id'
CPUINFO='/proc/cpuinfo'
MEMINFO='/proc/meminfo'

# json_string prints $1 for use inside a JSON string: control characters
# dropped, backslash and double quote escaped.
json_string() {
	printf '%s' "$1" | tr -d '\000-\037\177' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'
}

# number prints $1 as a JSON number if it is all digits, else 0.
number() {
	case "$1" in
	'' | *[!0-9]*) printf '0' ;;
	*)
		n=${1#"${1%%[!0]*}"}
		printf '%s' "${n:-0}"
		;;
	esac
}

# trim prints $1 without leading and trailing white space.
trim() {
	t=${1#"${1%%[![:space:]]*}"}
	printf '%s' "${t%"${t##*[![:space:]]}"}"
}

system_id=''
if [ -r "$INSTANCE_ID_FILE" ]; then
	# cloud-init's instance id is the MAAS system id.
	system_id=$(head -n 1 "$INSTANCE_ID_FILE")
fi
host=$(hostname)
cpu_model=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' "$CPUINFO" | head -n 1)
cpu_count=$(number "$(nproc --all)")
mem_kib=$(number "$(sed -n 's/^MemTotal:[[:space:]]*\([0-9]*\) kB$/\1/p' "$MEMINFO" | head -n 1)")

disks=''
while read -r name size type; do
	[ "$type" = disk ] || continue
	disks="$disks${disks:+,}{\"name\":\"$(json_string "$name")\",\"size_bytes\":$(number "$size")}"
done <<EOF
$(lsblk -b -d -n -o NAME,SIZE,TYPE 2>/dev/null)
EOF

gpus=''
gpu_source=none
if command -v nvidia-smi >/dev/null 2>&1; then
	while IFS=',' read -r name mem uuid bus; do
		name=$(trim "$name")
		[ -n "$name" ] || continue
		gpus="$gpus${gpus:+,}{\"model\":\"$(json_string "$name")\",\"memory_mib\":$(number "$(trim "$mem")"),\"uuid\":\"$(json_string "$(trim "$uuid")")\",\"pci_address\":\"$(json_string "$(trim "$bus")")\"}"
	done <<EOF
$(nvidia-smi --query-gpu=name,memory.total,uuid,pci.bus_id --format=csv,noheader,nounits 2>/dev/null)
EOF
	[ -z "$gpus" ] || gpu_source=nvidia-smi
fi
if [ -z "$gpus" ]; then
	# No NVIDIA driver in the ephemeral image: the PCI ID database names
	# the GPUs (3D and VGA controllers of vendor 10de).
	while IFS='|' read -r slot name device; do
		[ -n "$slot" ] || continue
		gpus="$gpus${gpus:+,}{\"model\":\"$(json_string "$name")\",\"memory_mib\":0,\"pci_device_id\":\"$(json_string "$device")\",\"pci_address\":\"$(json_string "$slot")\"}"
	done <<EOF
$(lspci -D -nn -d 10de: 2>/dev/null | sed -n 's/^\([0-9a-fA-F:.]*\) [^[]*\[03\(00\|02\)\]: \(.*\) \[10de:\([0-9a-fA-F]*\)\].*$/\1|\3|\4/p')
EOF
	[ -z "$gpus" ] || gpu_source=lspci
fi

ts=$(date +%s)
body="{\"version\":1,\"event\":\"commissioning\",\"system_id\":\"$(json_string "$system_id")\",\"hostname\":\"$(json_string "$host")\",\"timestamp\":$ts,\"cpu\":{\"model\":\"$(json_string "$cpu_model")\",\"count\":$cpu_count},\"memory_kib\":$mem_kib,\"disks\":[$disks],\"gpus\":[$gpus],\"gpu_source\":\"$gpu_source\"}"
printf '%s\n' "$body"

sig=$(printf '%s.%s' "$ts" "$body" | openssl dgst -sha256 -hmac "$WEBHOOK_SECRET" | sed 's/^.*= *//')
if ! curl -fsS -o /dev/null --max-time 30 --retry 5 --retry-delay 2 --retry-connrefused \
	-H 'Content-Type: application/json' \
	-H "X-Gpuaas-Timestamp: $ts" \
	-H "X-Gpuaas-Signature: sha256=$sig" \
	--data-binary "$body" "$WEBHOOK_URL"; then
	echo "gpuaas: webhook delivery to $WEBHOOK_URL failed; the driver's MAAS poll will pick this machine up" >&2
fi
exit 0
`

// shellQuote quotes s for a POSIX shell: single quotes, with each
// embedded quote closed, escaped and reopened.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// CommissioningScript renders the commissioning script for a webhook.
func CommissioningScript(name, instance, webhookURL, webhookSecret string) []byte {
	r := strings.NewReplacer(
		"@@NAME@@", name,
		"@@VERSION@@", Version,
		"@@INSTANCE@@", instance,
		"@@WEBHOOK_URL@@", shellQuote(webhookURL),
		"@@WEBHOOK_SECRET@@", shellQuote(webhookSecret),
	)
	return []byte(r.Replace(scriptTemplate))
}

// installScript stores the commissioning script in MAAS, or updates it
// when its content differs; an identical script is left alone.
func (d *Driver) installScript(ctx context.Context, s *settings) error {
	content := CommissioningScript(s.scriptName, s.instance, s.webhookURL, string(s.webhookSecret))
	comment := fmt.Sprintf("gpuaas MAAS driver %s", Version)
	var current *entity.NodeScript
	err := s.conn.call(ctx, "read commissioning script "+s.scriptName, true, func(cl *gomaas.Client) error {
		sc, err := cl.NodeScript.Get(s.scriptName, true)
		current = sc
		return err
	})
	switch {
	case errors.Is(err, base.ErrNotFound):
		err = s.conn.call(ctx, "create commissioning script "+s.scriptName, false, func(cl *gomaas.Client) error {
			_, err := cl.NodeScripts.Create(&entity.NodeScriptParams{Name: s.scriptName, Comment: comment}, content)
			return err
		})
		if err == nil {
			d.logger.Info("commissioning script installed", "script", s.scriptName)
			return nil
		}
		if !errors.Is(err, base.ErrInvalidArgument) || !strings.Contains(err.Error(), "already exists") {
			return err
		}
		// Created meanwhile by another instance of this driver: update it.
	case err != nil:
		return err
	case current != nil && len(current.History) > 0:
		if have, decErr := base64.StdEncoding.DecodeString(current.History[0].Data); decErr == nil && bytes.Equal(have, content) &&
			current.Type == entity.ScriptTypeCommissioning {
			d.logger.Debug("commissioning script up to date", "script", s.scriptName)
			return nil
		}
	}
	err = s.conn.call(ctx, "update commissioning script "+s.scriptName, false, func(cl *gomaas.Client) error {
		_, err := cl.NodeScript.Update(s.scriptName, &entity.NodeScriptParams{Comment: comment}, content)
		return err
	})
	if err != nil {
		return err
	}
	d.logger.Info("commissioning script updated", "script", s.scriptName)
	return nil
}

// Report is the JSON body of a commissioning webhook, and the output MAAS
// keeps for the commissioning script.
type Report struct {
	Version   int    `json:"version"`
	Event     string `json:"event"`
	SystemID  string `json:"system_id"`
	Hostname  string `json:"hostname"`
	Timestamp int64  `json:"timestamp"`
	CPU       struct {
		Model string `json:"model"`
		Count int    `json:"count"`
	} `json:"cpu"`
	MemoryKiB uint64 `json:"memory_kib"`
	Disks     []struct {
		Name      string `json:"name"`
		SizeBytes uint64 `json:"size_bytes"`
	} `json:"disks"`
	GPUs []struct {
		Model       string `json:"model"`
		MemoryMiB   uint64 `json:"memory_mib"`
		UUID        string `json:"uuid,omitempty"`
		PCIAddress  string `json:"pci_address,omitempty"`
		PCIDeviceID string `json:"pci_device_id,omitempty"`
	} `json:"gpus"`
	GPUSource string `json:"gpu_source"`
}

// systemIDRE is what the driver accepts as a MAAS system id.
var systemIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// parseReport decodes and checks a report.
func parseReport(body []byte) (*Report, error) {
	var r Report
	if err := json.Unmarshal(body, &r); err != nil {
		return nil, fmt.Errorf("maas: commissioning report: %v: %w", err, base.ErrInvalidArgument)
	}
	if r.Version != 1 || r.Event != "commissioning" {
		return nil, fmt.Errorf("maas: commissioning report: version %d event %q: %w", r.Version, r.Event, base.ErrInvalidArgument)
	}
	if !systemIDRE.MatchString(r.SystemID) {
		return nil, fmt.Errorf("maas: commissioning report: bad system id %q: %w", r.SystemID, base.ErrInvalidArgument)
	}
	return &r, nil
}

// gpuMemoryRE finds the memory size in a GPU name ("H100 80GB HBM3",
// "GH100 [H100 SXM5 80GB]").
var gpuMemoryRE = regexp.MustCompile(`(?i)\b(\d{1,4})\s*GB\b`)

// gpuMemoryFromName returns the memory a GPU name states, or 0.
func gpuMemoryFromName(name string) uint64 {
	m := gpuMemoryRE.FindStringSubmatch(name)
	if m == nil {
		return 0
	}
	n, _ := strconv.ParseUint(m[1], 10, 64)
	return n << 30
}

// groupGPUs counts GPUs per model, in order of first appearance.
func groupGPUs(models []string, memMiB []uint64) []provisioner.GPU {
	var out []provisioner.GPU
	idx := map[string]int{}
	for i, model := range models {
		model = strings.TrimSpace(model)
		if model == "" {
			continue
		}
		mem := memMiB[i] << 20
		if mem == 0 {
			mem = gpuMemoryFromName(model)
		}
		if j, ok := idx[model]; ok {
			out[j].Count++
			out[j].MemoryBytes = max(out[j].MemoryBytes, mem)
			continue
		}
		idx[model] = len(out)
		out = append(out, provisioner.GPU{Model: model, Count: 1, MemoryBytes: mem})
	}
	return out
}

// facts are the node facts a report states.
func (r *Report) facts() provisioner.NodeFacts {
	f := provisioner.NodeFacts{
		NodeID:      r.SystemID,
		Hostname:    r.Hostname,
		CPU:         provisioner.CPU{Model: r.CPU.Model, Cores: r.CPU.Count},
		MemoryBytes: r.MemoryKiB << 10,
	}
	for _, d := range r.Disks {
		f.DiskBytes += d.SizeBytes
	}
	models := make([]string, len(r.GPUs))
	mem := make([]uint64, len(r.GPUs))
	for i, g := range r.GPUs {
		models[i], mem[i] = g.Model, g.MemoryMiB
	}
	f.GPUs = groupGPUs(models, mem)
	return f
}

// SignWebhook returns the headers the commissioning script sends with body
// at Unix time ts.
func SignWebhook(secret []byte, ts int64, body []byte) map[string]string {
	return map[string]string{
		"Content-Type":  "application/json",
		TimestampHeader: strconv.FormatInt(ts, 10),
		SignatureHeader: "sha256=" + hex.EncodeToString(webhookMAC(secret, ts, body)),
	}
}

func webhookMAC(secret []byte, ts int64, body []byte) []byte {
	mac := hmac.New(sha256.New, secret)
	fmt.Fprintf(mac, "%d.", ts)
	mac.Write(body)
	return mac.Sum(nil)
}

// verifyWebhook checks a webhook's signature over the raw body, in
// constant time, and that its timestamp is within tolerance of now. It
// returns the timestamp.
func verifyWebhook(secret []byte, tolerance time.Duration, now time.Time, hook *provisioner.Webhook) (int64, error) {
	tsHeader := hook.Header.Get(TimestampHeader)
	sigHeader := hook.Header.Get(SignatureHeader)
	if tsHeader == "" || sigHeader == "" {
		return 0, fmt.Errorf("maas: webhook: missing %s or %s: %w", TimestampHeader, SignatureHeader, base.ErrUnauthenticated)
	}
	ts, err := strconv.ParseInt(tsHeader, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("maas: webhook: bad %s: %w", TimestampHeader, base.ErrUnauthenticated)
	}
	hexSig, ok := strings.CutPrefix(sigHeader, "sha256=")
	got, decErr := hex.DecodeString(hexSig)
	if !ok || decErr != nil {
		return 0, fmt.Errorf("maas: webhook: malformed %s: %w", SignatureHeader, base.ErrUnauthenticated)
	}
	if !hmac.Equal(got, webhookMAC(secret, ts, hook.Body)) {
		return 0, fmt.Errorf("maas: webhook: signature mismatch: %w", base.ErrUnauthenticated)
	}
	if age := now.Sub(time.Unix(ts, 0)); age > tolerance || age < -tolerance {
		return 0, fmt.Errorf("maas: webhook: timestamp %d is %s away from now, beyond %s (replay?): %w",
			ts, age.Round(time.Second), tolerance, base.ErrUnauthenticated)
	}
	return ts, nil
}

// HandleWebhook implements provisioner.WebhookHandler: it verifies a
// commissioning report posted by the driver's commissioning script and
// returns the machine's facts, completed with its pool and tags from MAAS.
func (d *Driver) HandleWebhook(ctx context.Context, hook *provisioner.Webhook) ([]provisioner.NodeEvent, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	ts, err := verifyWebhook(s.webhookSecret, s.webhookTolerance, d.now(), hook)
	if err != nil {
		d.logger.Warn("webhook refused", "error", err)
		return nil, err
	}
	r, err := parseReport(hook.Body)
	if err != nil {
		return nil, err
	}
	if r.Timestamp != ts {
		return nil, fmt.Errorf("maas: webhook: report timestamp %d differs from the signed %d: %w", r.Timestamp, ts, base.ErrInvalidArgument)
	}
	facts := r.facts()
	// The machine does not know its pool and tags; MAAS does. A machine
	// MAAS does not know is refused; MAAS being unreachable is not fatal.
	lookup, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	m, err := s.conn.getMachine(lookup, r.SystemID)
	switch {
	case err == nil:
		facts.Pool = m.Pool.Name
		facts.Tags = mergeTags(m.TagNames, nil)
		if facts.Hostname == "" {
			facts.Hostname = m.Hostname
		}
	case errors.Is(err, base.ErrNotFound):
		return nil, fmt.Errorf("maas: webhook: machine %s: %w", r.SystemID, err)
	case ctx.Err() != nil:
		return nil, fmt.Errorf("maas: webhook: %w", ctx.Err())
	default:
		d.logger.Warn("webhook: MAAS lookup failed; facts without pool and tags", "system_id", r.SystemID, "error", err)
	}
	sum := sha256.Sum256(hook.Body)
	return []provisioner.NodeEvent{{
		ID:         fmt.Sprintf("maas:%s:commissioning:%s:%d:%s", s.instance, r.SystemID, ts, hex.EncodeToString(sum[:6])),
		Type:       provisioner.EventFacts,
		NodeID:     r.SystemID,
		OccurredAt: time.Unix(ts, 0).UTC(),
		Facts:      &facts,
	}}, nil
}

// scriptReport reads the newest passed result of the commissioning script
// on a machine; nil when there is none.
func (d *Driver) scriptReport(ctx context.Context, s *settings, systemID string) (*Report, error) {
	var sets []entity.NodeResult
	err := s.conn.call(ctx, "read commissioning results of "+systemID, true, func(cl *gomaas.Client) error {
		var err error
		sets, err = cl.NodeResults.Get(systemID, &entity.NodeResultParams{Filters: s.scriptName, IncludeOutput: true})
		return err
	})
	if err != nil {
		return nil, err
	}
	var best *Report
	bestSet := -1
	for _, set := range sets {
		if set.Type != entity.COMMISSIONING || set.ID < bestSet {
			continue
		}
		for _, res := range set.Results {
			if res.Name != s.scriptName || res.Status != entity.PASSED {
				continue
			}
			out, err := base64.StdEncoding.DecodeString(res.Stdout)
			if err != nil || len(bytes.TrimSpace(out)) == 0 {
				continue
			}
			line, _, _ := bytes.Cut(bytes.TrimSpace(out), []byte("\n"))
			r, err := parseReport(line)
			if err != nil || r.SystemID != systemID {
				continue
			}
			best, bestSet = r, set.ID
		}
	}
	return best, nil
}

// deviceGPUs reads the GPUs MAAS found on a machine when commissioning.
func (d *Driver) deviceGPUs(ctx context.Context, s *settings, systemID string) ([]provisioner.GPU, error) {
	var devs []entity.NodeDevice
	err := s.conn.call(ctx, "read devices of "+systemID, true, func(cl *gomaas.Client) error {
		var err error
		devs, err = cl.NodeDevices.Get(systemID, &entity.NodeDeviceParams{HardwareType: "gpu"})
		return err
	})
	if err != nil {
		return nil, err
	}
	var models []string
	for _, dev := range devs {
		if dev.HardwareType != entity.GPU {
			continue
		}
		models = append(models, strings.TrimSpace(dev.VendorName+" "+dev.ProductName))
	}
	return groupGPUs(models, make([]uint64, len(models))), nil
}
