package maassim

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	yaml "go.yaml.in/yaml/v3"
)

// Script types (metadataserver.enum.SCRIPT_TYPE).
const (
	scriptTypeCommissioning = 0
	scriptTypeTesting       = 2
	scriptTypeRelease       = 3
)

func scriptTypeName(t int) string {
	switch t {
	case scriptTypeCommissioning:
		return "commissioning"
	case scriptTypeTesting:
		return "testing"
	case scriptTypeRelease:
		return "release"
	}
	return "unknown"
}

// translateScriptType accepts what MAAS's translate_script_type accepts.
func translateScriptType(v string) (int, bool) {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "0", "commission", "commissioning":
		return scriptTypeCommissioning, true
	case "2", "test", "testing":
		return scriptTypeTesting, true
	case "3", "release":
		return scriptTypeRelease, true
	}
	return 0, false
}

// translateHardwareType accepts what MAAS's translate_hardware_type accepts.
func translateHardwareType(v string) (int, bool) {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "0", "node", "machine", "controller", "other", "generic":
		return 0, true
	case "1", "cpu", "processor":
		return 1, true
	case "2", "memory", "dimm", "ram":
		return 2, true
	case "3", "storage", "disk", "ssd":
		return 3, true
	case "4", "network", "net", "interface":
		return 4, true
	case "5", "gpu", "graphics":
		return 5, true
	}
	return 0, false
}

func hardwareTypeName(t int) string {
	return [...]string{"Node", "CPU", "Memory", "Storage", "Network", "GPU"}[t]
}

func parallelName(p int) string {
	return [...]string{"disabled", "instance", "any"}[p]
}

// scriptVersion is one revision of a script's content.
type scriptVersion struct {
	id      int
	data    []byte
	comment string
	created time.Time
}

// script is a stored (custom) script.
type script struct {
	id           int
	name         string
	title        string
	description  string
	tags         []string
	scriptType   int
	hardwareType int
	parallel     int
	timeout      time.Duration
	destructive  bool
	mayReboot    bool
	recommission bool
	applyNetconf bool
	forHardware  []string
	versions     []*scriptVersion // oldest first; the last is current
}

func (sc *script) current() *scriptVersion { return sc.versions[len(sc.versions)-1] }

// formErrors is a MAAS form validation error: field -> messages, sent as
// a JSON object with status 400.
type formErrors map[string][]string

func (f formErrors) add(field, msg string) { f[field] = append(f[field], msg) }

var yamlDelimRE = regexp.MustCompile(`(?i)\s*#\s*-+\s*(Start|End) MAAS (\d+\.\d+) script metadata\s+-+`)

// embeddedMetadata reads the YAML between the "Start/End MAAS 1.0 script
// metadata" comment lines, as MAAS's ScriptForm does.
func embeddedMetadata(content []byte, errs formErrors) map[string]any {
	lines := strings.Split(strings.ReplaceAll(string(content), "\r\n", "\n"), "\n")
	if len(lines) == 0 || !strings.HasPrefix(lines[0], "#!/") {
		errs.add("script", "Must start with shebang.")
	}
	var found bool
	var y strings.Builder
	for _, line := range lines[1:] {
		if m := yamlDelimRE.FindStringSubmatch(line); m != nil {
			if !found && m[2] == "1.0" {
				found = true
				continue
			} else if found {
				break
			}
		} else if found && strings.TrimSpace(line) != "" {
			_, after, ok := strings.Cut(line, "#")
			if !ok {
				errs.add("script", `Missing "#" on YAML line.`)
				return nil
			}
			y.WriteString(after + "\n")
		}
	}
	meta := map[string]any{}
	if err := yaml.Unmarshal([]byte(y.String()), &meta); err != nil {
		errs.add("script", "Invalid YAML: "+err.Error())
		return nil
	}
	return meta
}

// parseTimeout reads a Django DurationField value: "HH:MM:SS", "MM:SS" or
// seconds.
func parseTimeout(v string) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, true
	}
	parts := strings.Split(v, ":")
	if len(parts) > 3 {
		return 0, false
	}
	var total float64
	for _, p := range parts {
		f, err := strconv.ParseFloat(p, 64)
		if err != nil || f < 0 {
			return 0, false
		}
		total = total*60 + f
	}
	return time.Duration(total * float64(time.Second)), true
}

func formatTimeout(d time.Duration) string {
	sec := int64(d / time.Second)
	return fmt.Sprintf("%d:%02d:%02d", sec/3600, sec/60%60, sec%60)
}

// parseBool reads a Django BooleanField value.
func parseBool(v string) bool {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "1", "true", "t", "on", "yes", "y":
		return true
	}
	return false
}

// applyScriptForm fills sc from form values and the script's embedded YAML
// the way MAAS's ScriptForm does: values in the YAML may not be overridden
// by different form values. creating is false for an update.
func applyScriptForm(sc *script, form map[string]string, content []byte, creating bool, errs formErrors) {
	if v, ok := form["type"]; ok {
		if _, has := form["script_type"]; !has {
			form["script_type"] = v
		}
	}
	if content != nil {
		meta := embeddedMetadata(content, errs)
		for k, v := range meta {
			var sv string
			switch v := v.(type) {
			case []any:
				parts := make([]string, 0, len(v))
				for _, e := range v {
					parts = append(parts, fmt.Sprint(e))
				}
				sv = strings.Join(parts, ",")
			case int:
				// PyYAML reads an unquoted 00:05:00 as 300 (base 60).
				sv = strconv.Itoa(v)
			default:
				sv = fmt.Sprint(v)
			}
			switch k {
			case "tags", "timeout":
				if creating {
					if _, given := form[k]; !given {
						form[k] = sv
					}
				}
				continue
			case "results", "parameters", "packages", "for_hardware":
				continue
			}
			if given, ok := form[k]; ok {
				same := given == sv
				if k == "script_type" {
					a, okA := translateScriptType(given)
					b, okB := translateScriptType(sv)
					same = okA && okB && a == b
				}
				if !same {
					errs.add(k, "May not override values defined in embedded YAML.")
				}
				continue
			}
			form[k] = sv
		}
	}
	if v, ok := form["name"]; ok || creating {
		if strings.TrimSpace(v) == "" {
			errs.add("name", "This field is required.")
		} else if strings.ContainsAny(v, "/ ") || v != strings.TrimSpace(v) {
			errs.add("name", "Name contains disallowed characters.")
		} else {
			sc.name = v
		}
	}
	if v, ok := form["title"]; ok {
		sc.title = v
	}
	if v, ok := form["description"]; ok {
		sc.description = v
	}
	if v, ok := form["tags"]; ok {
		sc.tags = nil
		for _, t := range strings.Split(v, ",") {
			if t = strings.TrimSpace(t); t != "" {
				sc.tags = append(sc.tags, t)
			}
		}
	}
	if v, ok := form["script_type"]; ok && v != "" {
		if t, ok := translateScriptType(v); ok {
			sc.scriptType = t
		} else {
			errs.add("script_type", "Script type must be commissioning, testing or release")
		}
	} else if creating {
		sc.scriptType = scriptTypeTesting
	}
	if v, ok := form["hardware_type"]; ok && v != "" {
		if t, ok := translateHardwareType(v); ok {
			sc.hardwareType = t
		} else {
			errs.add("hardware_type", "Hardware type must be node, cpu, memory, storage, network or gpu")
		}
	}
	if v, ok := form["parallel"]; ok && v != "" {
		switch strings.ToLower(v) {
		case "0", "disabled", "none":
			sc.parallel = 0
		case "1", "instance", "name":
			sc.parallel = 1
		case "2", "any", "enabled":
			sc.parallel = 2
		default:
			errs.add("parallel", "Script parallel must be disabled, instance, or any.")
		}
	}
	if v, ok := form["timeout"]; ok {
		if d, ok := parseTimeout(v); ok {
			sc.timeout = d
		} else {
			errs.add("timeout", "Enter a valid duration.")
		}
	}
	for field, dst := range map[string]*bool{
		"destructive": &sc.destructive, "may_reboot": &sc.mayReboot,
		"recommission": &sc.recommission, "apply_configured_networking": &sc.applyNetconf,
	} {
		if v, ok := form[field]; ok {
			*dst = parseBool(v)
		}
	}
	if creating && content == nil {
		errs.add("script", "This field is required.")
	}
}

// shellAssignRE matches a top-level shell assignment of a single-quoted
// value; an embedded quote is written as quote, backslash, quote, quote.
var shellAssignRE = regexp.MustCompile(`^([A-Za-z_][A-Za-z0-9_]*)=((?:'[^']*'|\\')+)\s*$`)

// shellVars reads the top-level NAME='value' assignments of a script.
func shellVars(content []byte) map[string]string {
	out := map[string]string{}
	for _, line := range strings.Split(string(content), "\n") {
		m := shellAssignRE.FindStringSubmatch(strings.TrimRight(line, "\r"))
		if m == nil {
			continue
		}
		var b strings.Builder
		rest := m[2]
		for rest != "" {
			if strings.HasPrefix(rest, `\'`) {
				b.WriteByte('\'')
				rest = rest[2:]
				continue
			}
			end := strings.IndexByte(rest[1:], '\'')
			b.WriteString(rest[1 : 1+end])
			rest = rest[end+2:]
		}
		out[m[1]] = b.String()
	}
	return out
}

// MachineEnvironment is what a commissioning script sees on a simulated
// machine: the output of the tools and files the gpuaas commissioning
// script reads. NvidiaSMI is nil when nvidia-smi is not installed.
type MachineEnvironment struct {
	InstanceID string
	Hostname   string
	CPUInfo    string
	MemInfo    string
	Nproc      string
	Lsblk      string
	Lspci      string
	NvidiaSMI  *string
}

// environment builds m's commissioning environment.
func (m *machine) environment() MachineEnvironment {
	sp := m.spec
	var cpu strings.Builder
	for i := 0; i < sp.CPUCount; i++ {
		fmt.Fprintf(&cpu, "processor\t: %d\nvendor_id\t: %s\nmodel name\t: %s\ncpu MHz\t\t: %d.000\n\n",
			i, cpuVendor(sp.CPUModel), sp.CPUModel, sp.CPUSpeedMHz)
	}
	memKiB := sp.MemoryMiB * 1024
	mem := fmt.Sprintf("MemTotal:       %d kB\nMemFree:        %d kB\nMemAvailable:   %d kB\n", memKiB, memKiB*97/100, memKiB*96/100)
	var lsblk strings.Builder
	fmt.Fprintf(&lsblk, "loop0           %d loop\n", 67108864)
	for _, d := range sp.Disks {
		fmt.Fprintf(&lsblk, "%-15s %d disk\n", d.Name, d.SizeBytes)
	}
	var lspci, smi strings.Builder
	fmt.Fprintf(&lspci, "0000:00:00.0 Host bridge [0600]: Advanced Micro Devices, Inc. [AMD] Root Complex [1022:14a4] (rev 01)\n")
	anySMI := false
	bus := 0x18
	for gi, g := range sp.GPUs {
		for i := 0; i < g.Count; i++ {
			addr := fmt.Sprintf("0000:%02x:00.0", bus)
			class := "3D controller [0302]"
			if strings.Contains(g.PCIName, "GeForce") || strings.Contains(g.PCIName, "RTX") {
				class = "VGA compatible controller [0300]"
			}
			fmt.Fprintf(&lspci, "%s %s: NVIDIA Corporation %s [%s:%s] (rev a1)\n", addr, class, g.PCIName, g.VendorID, g.ProductID)
			if g.NvidiaSMI {
				anySMI = true
				fmt.Fprintf(&smi, "%s, %d, GPU-%s-%04x-%04x-%04x-%012x, %s\n", g.Model, g.MemoryMiB,
					strings.ReplaceAll(deriveMAC(sp.SystemID), ":", "")[4:], gi, i, bus, bus*4099+i, "0000"+addr)
			}
			bus += 0x10
		}
	}
	env := MachineEnvironment{
		InstanceID: sp.SystemID + "\n",
		Hostname:   sp.Hostname + "\n",
		CPUInfo:    cpu.String(),
		MemInfo:    mem,
		Nproc:      strconv.Itoa(sp.CPUCount) + "\n",
		Lsblk:      lsblk.String(),
		Lspci:      lspci.String(),
	}
	if anySMI {
		out := smi.String()
		env.NvidiaSMI = &out
	}
	return env
}

func cpuVendor(model string) string {
	if strings.Contains(model, "AMD") {
		return "AuthenticAMD"
	}
	return "GenuineIntel"
}

// Helpers that behave exactly like the shell functions and pipelines of
// the gpuaas commissioning script (plugins/maas commissioning.go).

// jsonString is the script's json_string: control bytes dropped,
// backslash and double quote escaped.
func jsonString(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c < 0x20 || c == 0x7f:
		case c == '\\':
			b.WriteString(`\\`)
		case c == '"':
			b.WriteString(`\"`)
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// number is the script's number: digits without leading zeros, else 0.
func number(s string) string {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return "0"
		}
	}
	s = strings.TrimLeft(s, "0")
	if s == "" {
		return "0"
	}
	return s
}

// trim is the script's trim: leading and trailing [[:space:]] removed.
func trim(s string) string { return strings.Trim(s, " \t\n\v\f\r") }

// commandOutput is what $(cmd) yields: trailing newlines removed.
func commandOutput(s string) string { return strings.TrimRight(s, "\n") }

// heredocLines are the lines a `while read` loop over a here-document of
// $(cmd) sees.
func heredocLines(out string) []string { return strings.Split(commandOutput(out), "\n") }

var (
	modelNameRE = regexp.MustCompile(`^model name[ \t\n\v\f\r]*:[ \t\n\v\f\r]*`)
	memTotalRE  = regexp.MustCompile(`^MemTotal:[ \t\n\v\f\r]*([0-9]*) kB$`)
	lspciGPURE  = regexp.MustCompile(`^([0-9a-fA-F:.]*) [^\[]*\[03(00|02)\]: (.*) \[10de:([0-9a-fA-F]*)\].*$`)
)

// WebhookBody is the JSON body the gpuaas commissioning script builds on a
// machine with this environment at Unix time ts.
func (e MachineEnvironment) WebhookBody(ts int64) []byte {
	systemID := strings.SplitN(e.InstanceID, "\n", 2)[0]
	host := commandOutput(e.Hostname)
	cpuModel := ""
	for _, line := range strings.Split(e.CPUInfo, "\n") {
		if loc := modelNameRE.FindStringIndex(line); loc != nil {
			cpuModel = line[loc[1]:]
			break
		}
	}
	cpuCount := number(commandOutput(e.Nproc))
	memKiB := ""
	for _, line := range strings.Split(e.MemInfo, "\n") {
		if m := memTotalRE.FindStringSubmatch(line); m != nil {
			memKiB = m[1]
			break
		}
	}
	var disks []string
	for _, line := range heredocLines(e.Lsblk) {
		f := strings.Fields(line)
		name, size, typ := "", "", ""
		if len(f) > 0 {
			name = f[0]
		}
		if len(f) > 1 {
			size = f[1]
		}
		if len(f) > 2 {
			typ = strings.Join(f[2:], " ")
		}
		if typ != "disk" {
			continue
		}
		disks = append(disks, fmt.Sprintf(`{"name":"%s","size_bytes":%s}`, jsonString(name), number(size)))
	}
	var gpus []string
	source := "none"
	if e.NvidiaSMI != nil {
		for _, line := range heredocLines(*e.NvidiaSMI) {
			f := strings.SplitN(line, ",", 4)
			for len(f) < 4 {
				f = append(f, "")
			}
			name, mem, uuid, busID := trim(f[0]), trim(f[1]), trim(f[2]), trim(f[3])
			if name == "" {
				continue
			}
			gpus = append(gpus, fmt.Sprintf(`{"model":"%s","memory_mib":%s,"uuid":"%s","pci_address":"%s"}`,
				jsonString(name), number(mem), jsonString(uuid), jsonString(busID)))
		}
		if len(gpus) > 0 {
			source = "nvidia-smi"
		}
	}
	if len(gpus) == 0 {
		for _, line := range strings.Split(e.Lspci, "\n") {
			m := lspciGPURE.FindStringSubmatch(line)
			if m == nil || m[1] == "" {
				continue
			}
			gpus = append(gpus, fmt.Sprintf(`{"model":"%s","memory_mib":0,"pci_device_id":"%s","pci_address":"%s"}`,
				jsonString(m[3]), jsonString(m[4]), jsonString(m[1])))
		}
		if len(gpus) > 0 {
			source = "lspci"
		}
	}
	body := fmt.Sprintf(`{"version":1,"event":"commissioning","system_id":"%s","hostname":"%s","timestamp":%d,`+
		`"cpu":{"model":"%s","count":%s},"memory_kib":%s,"disks":[%s],"gpus":[%s],"gpu_source":"%s"}`,
		jsonString(systemID), jsonString(host), ts, jsonString(cpuModel), cpuCount, number(memKiB),
		strings.Join(disks, ","), strings.Join(gpus, ","), source)
	return []byte(body)
}

// WebhookDelivery records one run of a webhook-posting commissioning
// script.
type WebhookDelivery struct {
	SystemID string    `json:"system_id"`
	Script   string    `json:"script"`
	URL      string    `json:"url"`
	At       time.Time `json:"at"`
	Attempts int       `json:"attempts"`
	Status   int       `json:"status"`
	Error    string    `json:"error,omitempty"`
	Body     string    `json:"body"`
}

// runCommissioningScriptsLocked "runs" the custom commissioning scripts on
// m at time at, in name order, and stores their results. A script that
// assigns WEBHOOK_URL and WEBHOOK_SECRET is the gpuaas commissioning
// script: its logic (collect facts, print them, POST them signed) is
// carried out here in Go; any other script is recorded as passed with no
// output, since the simulator cannot run arbitrary shell.
func (s *Server) runCommissioningScriptsLocked(m *machine, at time.Time) {
	set := m.commission
	if set == nil {
		return
	}
	for _, sc := range s.sortedScriptsLocked() {
		if sc.scriptType != scriptTypeCommissioning {
			continue
		}
		s.nextResultID++
		res := &scriptResult{
			id: s.nextResultID, name: sc.name, scriptID: sc.id, revision: sc.current().id,
			status: 2, started: at, ended: at, hwType: sc.hardwareType,
		}
		set.results = append(set.results, res)
		vars := shellVars(sc.current().data)
		url, secret := vars["WEBHOOK_URL"], vars["WEBHOOK_SECRET"]
		if url == "" || secret == "" {
			continue
		}
		body := m.environment().WebhookBody(at.Unix())
		res.stdout = append(append([]byte(nil), body...), '\n')
		s.wg.Add(1)
		go s.deliverWebhook(m.id(), sc.name, url, secret, at.Unix(), body, res)
	}
}

// WebhookSignature is the X-Gpuaas-Signature value the script sends:
// "sha256=" and the hex HMAC-SHA256 of "<ts>.<body>" keyed with secret.
func WebhookSignature(secret string, ts int64, body []byte) string {
	mac := hmac.New(sha256.New, []byte(secret))
	fmt.Fprintf(mac, "%d.", ts)
	mac.Write(body)
	return "sha256=" + hex.EncodeToString(mac.Sum(nil))
}

// deliverWebhook POSTs like the script's curl does: five retries on
// connection refused, timeouts and 408/429/5xx, a fixed delay between
// attempts; a final failure goes to the script's stderr, not its exit
// status.
func (s *Server) deliverWebhook(systemID, scriptName, url, secret string, ts int64, body []byte, res *scriptResult) {
	defer s.wg.Done()
	d := WebhookDelivery{SystemID: systemID, Script: scriptName, URL: url, At: time.Unix(ts, 0).UTC(), Body: string(body)}
	const retries = 5
	for attempt := 0; attempt <= retries; attempt++ {
		d.Attempts = attempt + 1
		status, err := s.postWebhook(url, secret, ts, body)
		d.Status = status
		d.Error = ""
		if err != nil {
			d.Error = err.Error()
		}
		transient := err != nil || status == 408 || status == 429 || status >= 500
		if !transient || attempt == retries {
			break
		}
		select {
		case <-s.done:
			attempt = retries
		case <-time.After(s.timing.WebhookRetryDelay):
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if d.Error != "" || d.Status >= 400 {
		msg := d.Error
		if msg == "" {
			msg = fmt.Sprintf("The requested URL returned error: %d", d.Status)
		}
		res.stderr = []byte(fmt.Sprintf("curl: (22) %s\ngpuaas: webhook delivery to %s failed; the driver's MAAS poll will pick this machine up\n", msg, url))
	}
	s.webhooks = append(s.webhooks, d)
	s.logger.Debug("commissioning webhook", "system_id", systemID, "status", d.Status, "attempts", d.Attempts)
}

func (s *Server) postWebhook(url, secret string, ts int64, body []byte) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go func() {
		select {
		case <-s.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return 0, fmt.Errorf("curl: (3) URL using bad/illegal format: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "curl/7.81.0")
	req.Header.Set("X-Gpuaas-Timestamp", strconv.FormatInt(ts, 10))
	req.Header.Set("X-Gpuaas-Signature", WebhookSignature(secret, ts, body))
	resp, err := s.webhookClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer func() { _ = resp.Body.Close() }()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, nil
}
