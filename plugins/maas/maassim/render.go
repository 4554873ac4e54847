package maassim

import (
	"encoding/base64"
	"fmt"
	"strings"
)

func encodeBase64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// decodeBase64 reads base64 the way Python's b64decode does: standard
// alphabet, padding optional, whitespace ignored.
func decodeBase64(s string) ([]byte, error) {
	s = strings.Join(strings.Fields(s), "")
	if m := len(s) % 4; m != 0 {
		s += strings.Repeat("=", 4-m)
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("maassim: base64: %w", err)
	}
	return b, nil
}

func (s *Server) poolJSON(name string) map[string]any {
	desc := ""
	if name == "default" {
		desc = "Default pool"
	}
	id := s.pools[name]
	return map[string]any{"name": name, "description": desc, "id": id, "resource_uri": fmt.Sprintf("/MAAS/api/2.0/resourcepool/%d/", id)}
}

func (s *Server) zoneJSON(name string) map[string]any {
	return map[string]any{"name": name, "description": "", "id": s.zones[name], "resource_uri": "/MAAS/api/2.0/zones/" + name + "/"}
}

func (s *Server) blockDeviceJSON(m *machine, i int, d DiskSpec) map[string]any {
	id := 10 + i
	return map[string]any{
		"id": id, "name": d.Name, "path": "/dev/disk/by-dname/" + d.Name, "size": d.SizeBytes,
		"block_size": 512, "model": d.Model, "serial": d.Serial, "type": "physical", "tags": []string{"ssd"},
		"id_path": "/dev/disk/by-id/wwn-0x5002538" + d.Serial, "uuid": nil, "filesystem": nil,
		"partitions": []any{}, "partition_table_type": nil, "used_for": "Unused",
		"available_size": d.SizeBytes, "used_size": 0, "storage_pool": nil, "system_id": m.id(),
		"numa_node": 0, "firmware_version": "GDC7302Q",
		"resource_uri": fmt.Sprintf("/MAAS/api/2.0/nodes/%s/blockdevices/%d/", m.id(), id),
	}
}

func (s *Server) interfaceJSON(m *machine) map[string]any {
	vlan := map[string]any{
		"vid": 0, "mtu": 1500, "dhcp_on": true, "external_dhcp": nil, "relay_vlan": nil, "space": "undefined",
		"primary_rack": "rack01", "secondary_rack": nil, "fabric": "fabric-0", "id": 5001, "fabric_id": 0,
		"name": "untagged", "resource_uri": "/MAAS/api/2.0/vlans/5001/",
	}
	links := []any{}
	if m.status == StatusDeployed || m.status == StatusDeploying {
		links = append(links, map[string]any{
			"id": 1, "mode": "auto", "ip_address": m.spec.IPAddress,
			"subnet": map[string]any{"id": 1, "name": "10.20.0.0/16", "cidr": "10.20.0.0/16", "vlan": vlan, "gateway_ip": "10.20.0.1", "dns_servers": []string{}, "space": "undefined", "managed": true, "allow_dns": true, "allow_proxy": true, "active_discovery": false, "rdns_mode": 2, "resource_uri": "/MAAS/api/2.0/subnets/1/"},
		})
	}
	return map[string]any{
		"id": 1, "name": "eno1", "type": "physical", "mac_address": m.spec.MACAddress, "enabled": true,
		"links": links, "vlan": vlan, "system_id": m.id(), "params": "", "tags": []string{}, "parents": []string{},
		"children": []string{}, "discovered": nil, "link_connected": true, "link_speed": 25000,
		"interface_speed": 25000, "effective_mtu": 1500, "vendor": "Mellanox Technologies",
		"product": "MT2892 Family [ConnectX-6 Dx]", "firmware_version": "22.36.1010", "numa_node": 0, "sriov_max_vf": 0,
		"resource_uri": fmt.Sprintf("/MAAS/api/2.0/nodes/%s/interfaces/1/", m.id()),
	}
}

// renderMachineLocked is the machine's JSON as MAAS's machine handler
// shows it (DISPLAYED_MACHINE_FIELDS).
func (s *Server) renderMachineLocked(m *machine) map[string]any {
	sp := m.spec
	commissioned := m.commissioned()
	unknown := func(v string) string {
		if !commissioned {
			return "Unknown"
		}
		return v
	}
	hw := map[string]string{
		"system_vendor": unknown("Supermicro"), "system_product": unknown("AS -8125GS-TNHR"),
		"system_family": unknown("Family"), "system_version": unknown("0123456789"),
		"system_sku": unknown("Default string"), "system_serial": unknown("S" + strings.ToUpper(sp.SystemID) + "001"),
		"cpu_model": unknown(sp.CPUModel), "mainboard_vendor": unknown("Supermicro"),
		"mainboard_product": unknown("H13DSG-O-CPU"), "mainboard_serial": unknown("OM" + strings.ToUpper(sp.SystemID)),
		"mainboard_version": unknown("1.01"), "mainboard_firmware_vendor": unknown("American Megatrends International, LLC."),
		"mainboard_firmware_date": unknown("03/15/2024"), "mainboard_firmware_version": unknown("1.8"),
		"chassis_vendor": unknown("Supermicro"), "chassis_type": unknown("Main Server Chassis"),
		"chassis_serial": unknown("C8" + strings.ToUpper(sp.SystemID)), "chassis_version": unknown("0123456789"),
	}
	cpuCount, cpuSpeed, memory, storage := 0, 0, int64(0), 0.0
	blocks := []any{}
	var bootDisk any
	numa := []any{}
	if commissioned {
		cpuCount, cpuSpeed, memory = sp.CPUCount, sp.CPUSpeedMHz, sp.MemoryMiB
		for i, d := range sp.Disks {
			storage += float64(d.SizeBytes) / 1e6
			b := s.blockDeviceJSON(m, i, d)
			blocks = append(blocks, b)
			if i == 0 {
				bootDisk = b
			}
		}
		cores := make([]int, sp.CPUCount)
		for i := range cores {
			cores[i] = i
		}
		numa = append(numa, map[string]any{"index": 0, "memory": sp.MemoryMiB, "cores": cores, "hugepages_set": []any{}})
	}
	owner := any(nil)
	if m.owner != "" {
		owner = m.owner
	}
	ips := []string{}
	if m.status == StatusDeployed || m.status == StatusDeploying {
		ips = append(ips, sp.IPAddress)
	}
	annotations := map[string]string{}
	for k, v := range m.annotations {
		annotations[k] = v
	}
	commStatus, commName := -1, "Unknown"
	if m.commission != nil {
		commStatus, commName = m.commission.status, resultStatusName(m.commission.status)
	}
	setID := func(set *scriptSet) any {
		if set == nil {
			return nil
		}
		return set.id
	}
	hwe := any(nil)
	if m.hweKernel != "" {
		hwe = m.hweKernel
	}
	iface := s.interfaceJSON(m)
	return map[string]any{
		"system_id": sp.SystemID, "hostname": sp.Hostname, "description": "", "hardware_uuid": hardwareUUID(sp.SystemID),
		"domain": map[string]any{"authoritative": true, "ttl": nil, "is_default": true, "resource_record_count": 0, "id": 0, "name": "maas", "resource_uri": "/MAAS/api/2.0/domains/0/"},
		"fqdn":   sp.Hostname + ".maas", "owner": owner, "owner_data": annotations, "workload_annotations": annotations,
		"locked": m.locked, "cache_sets": []any{}, "bcaches": []any{}, "bios_boot_method": "uefi",
		"boot_interface": iface, "architecture": sp.Architecture, "min_hwe_kernel": "", "hwe_kernel": hwe,
		"cpu_count": cpuCount, "cpu_speed": cpuSpeed, "memory": memory, "swap_size": nil, "storage": storage,
		"status": int(m.status), "osystem": m.osystem, "distro_series": m.distro, "ephemeral_deploy": false,
		"error_description": m.errorDesc, "netboot": m.status != StatusDeployed, "power_type": sp.PowerType,
		"power_state": m.powerState, "tag_names": append([]string{}, sp.Tags...), "address_ttl": nil,
		"ip_addresses": ips, "interface_set": []any{iface}, "zone": s.zoneJSON(sp.Zone), "pool": s.poolJSON(sp.Pool),
		"disable_ipv4": false, "boot_disk": bootDisk, "blockdevice_set": blocks, "physicalblockdevice_set": blocks,
		"virtualblockdevice_set": []any{}, "volume_groups": []any{}, "raids": []any{}, "status_action": "",
		"status_message": m.message, "status_name": m.status.String(), "node_type": 0, "node_type_name": "Machine",
		"special_filesystems": []any{}, "parent": nil,
		"default_gateways":                map[string]any{"ipv4": map[string]any{"gateway_ip": nil, "link_id": nil}, "ipv6": map[string]any{"gateway_ip": nil, "link_id": nil}},
		"current_commissioning_result_id": setID(m.commission), "current_testing_result_id": nil,
		"current_installation_result_id": setID(m.install),
		"commissioning_status":           commStatus, "commissioning_status_name": commName,
		"testing_status": -1, "testing_status_name": "Unknown", "cpu_test_status": -1, "cpu_test_status_name": "Unknown",
		"memory_test_status": -1, "memory_test_status_name": "Unknown", "network_test_status": -1,
		"network_test_status_name": "Unknown", "storage_test_status": -1, "storage_test_status_name": "Unknown",
		"other_test_status": -1, "other_test_status_name": "Unknown", "interface_test_status": -1,
		"interface_test_status_name": "Unknown", "hardware_info": hw, "numanode_set": numa,
		"last_sync": nil, "sync_interval": nil, "next_sync": nil, "enable_hw_sync": false,
		"enable_kernel_crash_dump": false, "is_dpu": false,
		"resource_uri": "/MAAS/api/2.0/machines/" + sp.SystemID + "/",
	}
}

func hardwareUUID(systemID string) string {
	h := deriveMAC(systemID + "uuid")
	hex := strings.ReplaceAll(h, ":", "")
	return fmt.Sprintf("4c4c4544-0035-3010-8%s-%s", hex[:3], hex)
}
