// Package netguard keeps a driver from being turned into a way to reach a
// host's cloud instance-metadata service (and its credentials) or other
// link-local endpoints: configuration URLs are checked when they are set
// (Host), and the dialer checks every address it connects to again, after
// name resolution (DialControl), whatever a name resolved to.
package netguard

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
)

// metadataIPs are instance-metadata endpoints outside the link-local
// ranges (those are refused as a whole).
func metadataIPs() []netip.Addr {
	return []netip.Addr{
		netip.MustParseAddr("100.100.100.200"), // Alibaba Cloud
		netip.MustParseAddr("168.63.129.16"),   // Azure wire server
		netip.MustParseAddr("fd00:ec2::254"),   // AWS IMDS over IPv6
	}
}

// metadataNames are host names of instance-metadata services.
func metadataNames() []string {
	return []string{
		"metadata", "metadata.google.internal", "metadata.goog", "metadata.azure.internal",
		"instance-data", "instance-data.ec2.internal", "metadata.tencentyun.com", "metadata.platformequinix.com",
	}
}

// Forbidden reports whether a driver must never connect to a: link-local,
// multicast, unspecified and cloud metadata addresses.
func Forbidden(a netip.Addr) bool {
	a = a.Unmap()
	switch {
	case a.IsLinkLocalUnicast(), a.IsLinkLocalMulticast(), a.IsInterfaceLocalMulticast(),
		a.IsMulticast(), a.IsUnspecified():
		return true
	}
	return slices.Contains(metadataIPs(), a)
}

// Host says why a URL's host (u.Hostname()) must not be used, or "" when
// it may: a forbidden address, a metadata service's name, or no host.
func Host(host string) string {
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	if host == "" {
		return "no host"
	}
	if a, err := netip.ParseAddr(host); err == nil {
		if Forbidden(a) {
			return fmt.Sprintf("host %s is a link-local, multicast, unspecified or cloud metadata address", host)
		}
		return ""
	}
	if strings.Contains(host, "%") {
		return fmt.Sprintf("host %q is not a host name", host)
	}
	if slices.Contains(metadataNames(), host) {
		return fmt.Sprintf("host %s is a cloud metadata service", host)
	}
	return ""
}

// RefusedError is a connection DialControl would not make.
type RefusedError struct{ Addr string }

func (e *RefusedError) Error() string {
	return fmt.Sprintf("refusing to connect to %s: link-local, multicast, unspecified and cloud metadata addresses are not allowed", e.Addr)
}

// DialControl is a net.Dialer Control hook: it runs after name resolution,
// on the address actually dialled, and refuses Forbidden ones with a
// *RefusedError.
func DialControl(_, address string, _ syscall.RawConn) error {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		host = address
	}
	if a, err := netip.ParseAddr(host); err == nil && Forbidden(a) {
		return &RefusedError{Addr: address}
	}
	return nil
}
