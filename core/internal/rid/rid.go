// Package rid formats and parses canonical resource identifiers:
//
//	gpuaas:{region}:{org}:{project}:{type}:{id}
//
// Org and project are empty for resources above them (an org is
// gpuaas:{region}:{org}::org:{org}; a user is gpuaas:{region}:::user:{id}). Every API,
// event and audit row that names a resource uses this one shape.
package rid

import (
	"fmt"
	"regexp"
	"strings"
)

// ID is a canonical resource identifier.
type ID struct {
	Region  string
	Org     string
	Project string
	Type    string
	ID      string
}

var (
	partRE = regexp.MustCompile(`^[A-Za-z0-9._-]*$`)
	typeRE = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)
)

// String formats the identifier.
func (r ID) String() string {
	return strings.Join([]string{"gpuaas", r.Region, r.Org, r.Project, r.Type, r.ID}, ":")
}

// Parse reads an identifier made by String.
func Parse(s string) (ID, error) {
	parts := strings.Split(s, ":")
	if len(parts) != 6 || parts[0] != "gpuaas" {
		return ID{}, fmt.Errorf("rid: %q is not gpuaas:{region}:{org}:{project}:{type}:{id}", s)
	}
	r := ID{Region: parts[1], Org: parts[2], Project: parts[3], Type: parts[4], ID: parts[5]}
	if r.Region == "" || r.ID == "" || !typeRE.MatchString(r.Type) {
		return ID{}, fmt.Errorf("rid: %q needs a region, a type and an id", s)
	}
	for _, p := range []string{r.Region, r.Org, r.Project, r.ID} {
		if !partRE.MatchString(p) {
			return ID{}, fmt.Errorf("rid: %q has a part with characters outside [A-Za-z0-9._-]", s)
		}
	}
	if r.Project != "" && r.Org == "" {
		return ID{}, fmt.Errorf("rid: %q names a project without its org", s)
	}
	return r, nil
}

// Builder makes identifiers for one region.
type Builder struct{ Region string }

// User is a user's identifier.
func (b Builder) User(id string) ID { return ID{Region: b.Region, Type: "user", ID: id} }

// Org is an org's identifier.
func (b Builder) Org(org string) ID { return ID{Region: b.Region, Org: org, Type: "org", ID: org} }

// Project is a project's identifier.
func (b Builder) Project(org, project string) ID {
	return ID{Region: b.Region, Org: org, Project: project, Type: "project", ID: project}
}

// InOrg is a resource owned by an org.
func (b Builder) InOrg(org, typ, id string) ID {
	return ID{Region: b.Region, Org: org, Type: typ, ID: id}
}

// InProject is a resource owned by a project.
func (b Builder) InProject(org, project, typ, id string) ID {
	return ID{Region: b.Region, Org: org, Project: project, Type: typ, ID: id}
}

// Platform is a platform-level resource (policy key, plugin, ...).
func (b Builder) Platform(typ, id string) ID { return ID{Region: b.Region, Type: typ, ID: id} }
