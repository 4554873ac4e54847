package netguard_test

import (
	"errors"
	"testing"

	"github.com/gpuaas/gpuaas/sdk/netguard"
)

func TestHost(t *testing.T) {
	for host, refused := range map[string]bool{
		"": true, "169.254.169.254": true, "fe80::1": true, "::ffff:169.254.169.254": true, "100.100.100.200": true,
		"0.0.0.0": true, "224.0.0.1": true, "metadata.google.internal": true, "Metadata.Google.Internal.": true,
		"fe80::1%eth0": true,
		"maas.example": false, "127.0.0.1": false, "10.0.0.5": false, "2001:db8::1": false,
	} {
		if got := netguard.Host(host) != ""; got != refused {
			t.Errorf("Host(%q) refused %t, want %t (%s)", host, got, refused, netguard.Host(host))
		}
	}
}

func TestDialControl(t *testing.T) {
	for addr, refused := range map[string]bool{
		"169.254.169.254:80": true, "[fd00:ec2::254]:80": true, "168.63.129.16:80": true,
		"127.0.0.1:8080": false, "[2001:db8::1]:443": false,
	} {
		var re *netguard.RefusedError
		if got := errors.As(netguard.DialControl("tcp", addr, nil), &re); got != refused {
			t.Errorf("%s: refused %t, want %t", addr, got, refused)
		}
	}
}
