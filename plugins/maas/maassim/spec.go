package maassim

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	yaml "go.yaml.in/yaml/v3"
)

// MachineSpec describes one simulated machine: what MAAS knows about it and
// what its hardware reports when a commissioning script runs on it.
type MachineSpec struct {
	// SystemID is the MAAS system id; empty derives one from the hostname.
	SystemID string `json:"system_id,omitempty" yaml:"system_id,omitempty"`
	Hostname string `json:"hostname" yaml:"hostname"`
	// Status is the initial state: "new" (not yet commissioned) or "ready"
	// (commissioned; the default).
	Status       string     `json:"status,omitempty" yaml:"status,omitempty"`
	Pool         string     `json:"pool,omitempty" yaml:"pool,omitempty"`
	Zone         string     `json:"zone,omitempty" yaml:"zone,omitempty"`
	Tags         []string   `json:"tags,omitempty" yaml:"tags,omitempty"`
	Architecture string     `json:"architecture,omitempty" yaml:"architecture,omitempty"`
	PowerType    string     `json:"power_type,omitempty" yaml:"power_type,omitempty"`
	CPUModel     string     `json:"cpu_model" yaml:"cpu_model"`
	CPUCount     int        `json:"cpu_count" yaml:"cpu_count"`
	CPUSpeedMHz  int        `json:"cpu_speed_mhz,omitempty" yaml:"cpu_speed_mhz,omitempty"`
	MemoryMiB    int64      `json:"memory_mib" yaml:"memory_mib"`
	Disks        []DiskSpec `json:"disks" yaml:"disks"`
	GPUs         []GPUSpec  `json:"gpus,omitempty" yaml:"gpus,omitempty"`
	MACAddress   string     `json:"mac_address,omitempty" yaml:"mac_address,omitempty"`
	IPAddress    string     `json:"ip_address,omitempty" yaml:"ip_address,omitempty"`
}

// DiskSpec is one physical disk.
type DiskSpec struct {
	Name      string `json:"name" yaml:"name"`
	SizeBytes int64  `json:"size_bytes" yaml:"size_bytes"`
	Model     string `json:"model,omitempty" yaml:"model,omitempty"`
	Serial    string `json:"serial,omitempty" yaml:"serial,omitempty"`
}

// GPUSpec is a group of identical GPUs.
type GPUSpec struct {
	// Model is the name nvidia-smi reports, e.g. "NVIDIA H100 80GB HBM3".
	Model string `json:"model" yaml:"model"`
	// PCIName is the device name in the PCI ID database, as lspci prints
	// it after the vendor, e.g. "GH100 [H100 SXM5 80GB]".
	PCIName   string `json:"pci_name" yaml:"pci_name"`
	VendorID  string `json:"vendor_id,omitempty" yaml:"vendor_id,omitempty"`
	ProductID string `json:"product_id" yaml:"product_id"`
	Count     int    `json:"count" yaml:"count"`
	MemoryMiB int    `json:"memory_mib" yaml:"memory_mib"`
	// NvidiaSMI says whether the NVIDIA driver (and nvidia-smi) is present
	// in the commissioning environment. Stock MAAS ephemeral images have no
	// NVIDIA driver, so scripts fall back to lspci there.
	NvidiaSMI bool `json:"nvidia_smi,omitempty" yaml:"nvidia_smi,omitempty"`
}

// Specs is the machine list file format (JSON or YAML).
type Specs struct {
	Machines []MachineSpec `json:"machines" yaml:"machines"`
}

var (
	systemIDRE = regexp.MustCompile(`^[a-z0-9]{6}$`)
	hostnameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	nameRE     = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
	hexIDRE    = regexp.MustCompile(`^[0-9a-f]{4}$`)
)

// Validate checks a spec and fills in defaults.
func (m *MachineSpec) Validate() error {
	if !hostnameRE.MatchString(m.Hostname) {
		return fmt.Errorf("machine %q: hostname must be a DNS label", m.Hostname)
	}
	if m.SystemID == "" {
		m.SystemID = deriveSystemID(m.Hostname)
	}
	if !systemIDRE.MatchString(m.SystemID) {
		return fmt.Errorf("machine %q: system_id %q must be 6 lower-case letters or digits", m.Hostname, m.SystemID)
	}
	switch m.Status {
	case "":
		m.Status = "ready"
	case "new", "ready":
	default:
		return fmt.Errorf("machine %q: status %q must be new or ready", m.Hostname, m.Status)
	}
	if m.Pool == "" {
		m.Pool = "default"
	}
	if m.Zone == "" {
		m.Zone = "default"
	}
	for _, n := range append([]string{m.Pool, m.Zone}, m.Tags...) {
		if !nameRE.MatchString(n) {
			return fmt.Errorf("machine %q: pool, zone and tag names must match %s, got %q", m.Hostname, nameRE, n)
		}
	}
	if m.Architecture == "" {
		m.Architecture = "amd64/generic"
	}
	if m.PowerType == "" {
		m.PowerType = "ipmi"
	}
	if m.CPUCount <= 0 || m.MemoryMiB <= 0 || m.CPUModel == "" {
		return fmt.Errorf("machine %q: cpu_model, cpu_count and memory_mib are required", m.Hostname)
	}
	if len(m.Disks) == 0 {
		return fmt.Errorf("machine %q: at least one disk is required", m.Hostname)
	}
	for i, d := range m.Disks {
		if !nameRE.MatchString(d.Name) || d.SizeBytes <= 0 {
			return fmt.Errorf("machine %q: disk %d needs a name and a positive size", m.Hostname, i)
		}
	}
	for i := range m.GPUs {
		g := &m.GPUs[i]
		if g.VendorID == "" {
			g.VendorID = "10de"
		}
		if g.Model == "" || g.PCIName == "" || g.Count <= 0 || !hexIDRE.MatchString(g.ProductID) || !hexIDRE.MatchString(g.VendorID) {
			return fmt.Errorf("machine %q: gpu %d needs model, pci_name, a 4-digit hex product_id and a positive count", m.Hostname, i)
		}
		if strings.ContainsAny(g.Model+g.PCIName, ",|\n") {
			return fmt.Errorf("machine %q: gpu %d: model and pci_name may not contain ',', '|' or newlines", m.Hostname, i)
		}
	}
	if m.MACAddress == "" {
		m.MACAddress = deriveMAC(m.SystemID)
	}
	return nil
}

// deriveSystemID makes a stable MAAS-looking system id from a hostname.
func deriveSystemID(hostname string) string {
	const alphabet = "abcdefghkmnpqrstwxy3456789"
	var h uint64 = 14695981039346656037
	for i := 0; i < len(hostname); i++ {
		h ^= uint64(hostname[i])
		h *= 1099511628211
	}
	var b [6]byte
	for i := range b {
		b[i] = alphabet[h%uint64(len(alphabet))]
		h /= uint64(len(alphabet))
	}
	return string(b[:])
}

func deriveMAC(systemID string) string {
	var h uint32 = 2166136261
	for i := 0; i < len(systemID); i++ {
		h ^= uint32(systemID[i])
		h *= 16777619
	}
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", byte(h>>16), byte(h>>8), byte(h))
}

// LoadSpecs reads a machine list from a JSON or YAML file.
func LoadSpecs(path string) ([]MachineSpec, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("machines file: %w", err)
	}
	var specs Specs
	switch strings.ToLower(filepath.Ext(path)) {
	case ".json":
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		err = dec.Decode(&specs)
	default:
		dec := yaml.NewDecoder(bytes.NewReader(data))
		dec.KnownFields(true)
		err = dec.Decode(&specs)
	}
	if err != nil {
		return nil, fmt.Errorf("machines file %s: %w", path, err)
	}
	for i := range specs.Machines {
		if err := specs.Machines[i].Validate(); err != nil {
			return nil, fmt.Errorf("machines file %s: %w", path, err)
		}
	}
	return specs.Machines, nil
}

// SKU names the two built-in machine shapes.
type SKU string

// Built-in SKUs.
const (
	// SKUH100 is an 8x H100 SXM5 80GB server, 2x96-core EPYC, 1.5 TiB.
	SKUH100 SKU = "h100"
	// SKUL40S is a 4x L40S 48GB server, 2x32-core Xeon, 512 GiB.
	SKUL40S SKU = "l40s"
)

// NewMachine returns the spec of the i-th machine of a built-in SKU,
// commissioned (Ready) unless status says "new".
func NewMachine(sku SKU, i int, status string) (MachineSpec, error) {
	var m MachineSpec
	switch sku {
	case SKUH100:
		m = MachineSpec{
			Hostname:    fmt.Sprintf("gpu-h100-%02d", i+1),
			Pool:        "h100",
			Tags:        []string{"gpu", "nvidia", "h100"},
			CPUModel:    "AMD EPYC 9654 96-Core Processor",
			CPUCount:    192,
			CPUSpeedMHz: 2400,
			MemoryMiB:   1536 * 1024,
			Disks: []DiskSpec{
				{Name: "sda", SizeBytes: 480103981056, Model: "MTFDDAK480TDS"},
				{Name: "nvme0n1", SizeBytes: 3840755982336, Model: "SAMSUNG MZQL23T8HCLS-00A07"},
				{Name: "nvme1n1", SizeBytes: 3840755982336, Model: "SAMSUNG MZQL23T8HCLS-00A07"},
			},
			GPUs: []GPUSpec{{Model: "NVIDIA H100 80GB HBM3", PCIName: "GH100 [H100 SXM5 80GB]", ProductID: "2330", Count: 8, MemoryMiB: 81559, NvidiaSMI: true}},
		}
	case SKUL40S:
		m = MachineSpec{
			Hostname:    fmt.Sprintf("gpu-l40s-%02d", i+1),
			Pool:        "l40s",
			Tags:        []string{"gpu", "nvidia", "l40s"},
			CPUModel:    "Intel(R) Xeon(R) Gold 6448Y",
			CPUCount:    64,
			CPUSpeedMHz: 2100,
			MemoryMiB:   512 * 1024,
			Disks: []DiskSpec{
				{Name: "sda", SizeBytes: 960197124096, Model: "SAMSUNG MZ7L3960HCJR-00A07"},
				{Name: "nvme0n1", SizeBytes: 1920383410176, Model: "SAMSUNG MZQL21T9HCJR-00A07"},
			},
			// No NVIDIA driver in the ephemeral image: scripts see lspci.
			GPUs: []GPUSpec{{Model: "NVIDIA L40S", PCIName: "AD102GL [L40S]", ProductID: "26b9", Count: 4, MemoryMiB: 46068}},
		}
	default:
		return MachineSpec{}, fmt.Errorf("unknown sku %q (want %s or %s)", sku, SKUH100, SKUL40S)
	}
	m.Status = status
	for i := range m.Disks {
		m.Disks[i].Serial = fmt.Sprintf("S%s%02d", strings.ToUpper(deriveSystemID(m.Hostname)), i)
	}
	m.IPAddress = fmt.Sprintf("10.20.%d.%d", map[SKU]int{SKUH100: 1, SKUL40S: 2}[sku], 10+i)
	if err := m.Validate(); err != nil {
		return MachineSpec{}, err
	}
	return m, nil
}

// DefaultMachines is three H100 and two L40S machines, all commissioned.
func DefaultMachines() []MachineSpec {
	var out []MachineSpec
	for _, s := range []struct {
		sku SKU
		n   int
	}{{SKUH100, 3}, {SKUL40S, 2}} {
		for i := 0; i < s.n; i++ {
			m, err := NewMachine(s.sku, i, "ready")
			if err != nil {
				panic(err) // the built-in specs are valid
			}
			out = append(out, m)
		}
	}
	return out
}

// Timing is how long each simulated phase takes. A zero duration completes
// the phase at once (the API still answers with the transitional state).
type Timing struct {
	Commission  time.Duration `json:"commission"`
	Deploy      time.Duration `json:"deploy"`
	Release     time.Duration `json:"release"`
	EraseQuick  time.Duration `json:"erase_quick"`
	EraseSecure time.Duration `json:"erase_secure"`
	EraseFull   time.Duration `json:"erase_full"`
	// WebhookRetryDelay is the pause between webhook delivery attempts
	// (curl --retry-delay in the script).
	WebhookRetryDelay time.Duration `json:"webhook_retry_delay"`
}

// InstantTiming completes every phase at once.
func InstantTiming() Timing { return Timing{WebhookRetryDelay: 10 * time.Millisecond} }

// FastTiming takes a fraction of a second per phase: for tests.
func FastTiming() Timing {
	return Timing{
		Commission:        300 * time.Millisecond,
		Deploy:            400 * time.Millisecond,
		Release:           150 * time.Millisecond,
		EraseQuick:        250 * time.Millisecond,
		EraseSecure:       400 * time.Millisecond,
		EraseFull:         800 * time.Millisecond,
		WebhookRetryDelay: 50 * time.Millisecond,
	}
}

// RealisticTiming is close to a real bare-metal server.
func RealisticTiming() Timing {
	return Timing{
		Commission:        6 * time.Minute,
		Deploy:            9 * time.Minute,
		Release:           90 * time.Second,
		EraseQuick:        3 * time.Minute,
		EraseSecure:       12 * time.Minute,
		EraseFull:         2 * time.Hour,
		WebhookRetryDelay: 2 * time.Second,
	}
}

// TimingByName returns "instant", "fast" or "realistic" timing.
func TimingByName(name string) (Timing, error) {
	switch name {
	case "instant":
		return InstantTiming(), nil
	case "fast":
		return FastTiming(), nil
	case "realistic":
		return RealisticTiming(), nil
	}
	return Timing{}, fmt.Errorf("unknown timing %q (want instant, fast or realistic)", name)
}

// Scaled multiplies every duration by f.
func (t Timing) Scaled(f float64) Timing {
	s := func(d time.Duration) time.Duration { return time.Duration(float64(d) * f) }
	return Timing{
		Commission: s(t.Commission), Deploy: s(t.Deploy), Release: s(t.Release),
		EraseQuick: s(t.EraseQuick), EraseSecure: s(t.EraseSecure), EraseFull: s(t.EraseFull),
		WebhookRetryDelay: s(t.WebhookRetryDelay),
	}
}
