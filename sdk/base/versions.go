package base

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrIncompatibleAPIVersion means host and driver share no driver API
// version. The host marks the instance incompatible and keeps running.
var ErrIncompatibleAPIVersion = errors.New("no common driver API version")

// IncompatibleError lists both sides' versions when negotiation fails.
type IncompatibleError struct {
	Host   []string
	Plugin []string
}

func (e *IncompatibleError) Error() string {
	return fmt.Sprintf("no common driver API version: host supports [%s], plugin supports [%s]",
		strings.Join(e.Host, ", "), strings.Join(e.Plugin, ", "))
}

// Unwrap makes an IncompatibleError an ErrIncompatibleAPIVersion.
func (e *IncompatibleError) Unwrap() error { return ErrIncompatibleAPIVersion }

// APIVersion is a driver API version "MAJOR.MINOR".
type APIVersion struct {
	Major, Minor int
}

// ParseAPIVersion parses "MAJOR.MINOR" (both non-negative integers).
func ParseAPIVersion(s string) (APIVersion, error) {
	major, minor, ok := strings.Cut(s, ".")
	if !ok {
		return APIVersion{}, fmt.Errorf("api version %q: want MAJOR.MINOR: %w", s, ErrInvalidArgument)
	}
	ma, err1 := strconv.Atoi(major)
	mi, err2 := strconv.Atoi(minor)
	if err1 != nil || err2 != nil || ma < 0 || mi < 0 {
		return APIVersion{}, fmt.Errorf("api version %q: want MAJOR.MINOR: %w", s, ErrInvalidArgument)
	}
	return APIVersion{Major: ma, Minor: mi}, nil
}

func (v APIVersion) String() string { return fmt.Sprintf("%d.%d", v.Major, v.Minor) }

// Less orders versions.
func (v APIVersion) Less(o APIVersion) bool {
	if v.Major != o.Major {
		return v.Major < o.Major
	}
	return v.Minor < o.Minor
}

// NegotiateAPIVersion picks the highest version both the host and the
// plugin list. Versions that do not parse are ignored; no common version
// returns an *IncompatibleError.
func NegotiateAPIVersion(host, plugin []string) (string, error) {
	offered := make(map[APIVersion]bool, len(plugin))
	for _, s := range plugin {
		if v, err := ParseAPIVersion(s); err == nil {
			offered[v] = true
		}
	}
	var best *APIVersion
	for _, s := range host {
		v, err := ParseAPIVersion(s)
		if err != nil || !offered[v] {
			continue
		}
		if best == nil || best.Less(v) {
			best = &v
		}
	}
	if best == nil {
		return "", &IncompatibleError{Host: append([]string(nil), host...), Plugin: append([]string(nil), plugin...)}
	}
	return best.String(), nil
}
