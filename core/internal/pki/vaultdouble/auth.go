package vaultdouble

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"
)

// token is a Vault service token.
type token struct {
	id, accessor string
	displayName  string
	path         string
	policies     []string
	issued       time.Time
	creationTTL  time.Duration // 0: never expires (root)
	maxTTL       time.Duration // explicit max TTL; 0: none
	expires      time.Time     // zero: never
	renewable    bool
	meta         map[string]string
}

func (t *token) expired(now time.Time) bool { return !t.expires.IsZero() && !now.Before(t.expires) }

// allowed is the double's ACL: root and any policy beyond "default" may use
// every mount; "default" alone may only look up and renew itself.
func (t *token) allowed(path string) bool {
	if path == "auth/token/lookup-self" || path == "auth/token/renew-self" {
		return true
	}
	for _, p := range t.policies {
		if p != "default" {
			return true
		}
	}
	return false
}

// ttl is the remaining lifetime in whole seconds, as Vault reports it.
func (t *token) ttl(now time.Time) int64 {
	if t.expires.IsZero() {
		return 0
	}
	return int64(t.expires.Sub(now) / time.Second)
}

func (t *token) auth(now time.Time) map[string]any {
	var meta any
	if t.meta != nil {
		meta = t.meta
	}
	return map[string]any{
		"client_token":    t.id,
		"accessor":        t.accessor,
		"policies":        t.policies,
		"token_policies":  t.policies,
		"metadata":        meta,
		"lease_duration":  t.ttl(now),
		"renewable":       t.renewable,
		"entity_id":       "",
		"token_type":      "service",
		"orphan":          true,
		"mfa_requirement": nil,
		"num_uses":        0,
	}
}

// issue makes a token that lives ttl, at most maxTTL (0: no max).
func (s *Server) issue(policies []string, ttl, maxTTL time.Duration, renewable bool, displayName, path string, meta map[string]string) *token {
	now := s.now()
	t := &token{id: "hvs." + randomID(24), accessor: randomID(24), displayName: displayName, path: path,
		policies: policies, issued: now, creationTTL: ttl, maxTTL: maxTTL, renewable: renewable, meta: meta}
	if maxTTL > 0 && (ttl == 0 || ttl > maxTTL) {
		t.creationTTL = maxTTL
	}
	if t.creationTTL > 0 {
		t.expires = now.Add(t.creationTTL)
	}
	s.tokens[t.id] = t
	return t
}

func (s *Server) lookupSelf(w http.ResponseWriter, req *request) {
	t, now := req.token, s.now()
	var expire any
	if !t.expires.IsZero() {
		expire = t.expires.UTC().Format(time.RFC3339Nano)
	}
	writeData(w, map[string]any{
		"accessor":         t.accessor,
		"creation_time":    t.issued.Unix(),
		"creation_ttl":     int64(t.creationTTL / time.Second),
		"display_name":     t.displayName,
		"entity_id":        "",
		"expire_time":      expire,
		"explicit_max_ttl": int64(t.maxTTL / time.Second),
		"id":               t.id,
		"issue_time":       t.issued.UTC().Format(time.RFC3339Nano),
		"meta":             t.meta,
		"num_uses":         0,
		"orphan":           true,
		"path":             t.path,
		"policies":         t.policies,
		"renewable":        t.renewable,
		"ttl":              t.ttl(now),
		"type":             "service",
	}, nil, "token")
}

func (s *Server) renewSelf(w http.ResponseWriter, req *request) {
	t, now := req.token, s.now()
	if t.expires.IsZero() || !t.renewable {
		writeErrors(w, http.StatusBadRequest, "lease is not renewable")
		return
	}
	inc, err := duration(req.body, "increment")
	if err != nil {
		writeErrors(w, http.StatusBadRequest, err.Error())
		return
	}
	if inc <= 0 {
		inc = t.creationTTL
	}
	var warnings []string
	expires := now.Add(inc)
	if t.maxTTL > 0 && expires.After(t.issued.Add(t.maxTTL)) {
		expires = t.issued.Add(t.maxTTL)
		warnings = append(warnings, fmt.Sprintf("TTL of %q exceeded the effective max_ttl of %q; TTL value is capped accordingly",
			inc.String(), expires.Sub(now).Truncate(time.Second).String()))
	}
	t.expires = expires
	s.stats.Renewals++
	writeJSON(w, http.StatusOK, response(nil, t.auth(now), warnings, "token"))
}

func (s *Server) createToken(w http.ResponseWriter, req *request) {
	ttl, err := duration(req.body, "ttl")
	if err != nil {
		writeErrors(w, http.StatusBadRequest, err.Error())
		return
	}
	maxTTL, err := duration(req.body, "explicit_max_ttl")
	if err != nil {
		writeErrors(w, http.StatusBadRequest, err.Error())
		return
	}
	policies := stringList(req.body, "policies")
	if len(policies) == 0 {
		policies = slices.Clone(req.token.policies)
	}
	for _, p := range policies {
		if p == "root" && !slices.Contains(req.token.policies, "root") {
			writeErrors(w, http.StatusBadRequest, "root tokens may not be created without parent token being root")
			return
		}
	}
	if ttl == 0 && !slices.Contains(policies, "root") {
		ttl = 768 * time.Hour // Vault's default max lease TTL
	}
	name := str(req.body, "display_name")
	if name == "" {
		name = "token"
	} else {
		name = "token-" + strings.ToLower(name)
	}
	t := s.issue(policies, ttl, maxTTL, boolean(req.body, "renewable", true), name, "auth/token/create", nil)
	writeJSON(w, http.StatusOK, response(nil, t.auth(s.now()), nil, "token"))
}

func (s *Server) appRoleLogin(w http.ResponseWriter, req *request) {
	roleID, secretID := str(req.body, "role_id"), str(req.body, "secret_id")
	if roleID == "" {
		writeErrors(w, http.StatusBadRequest, "missing role_id")
		return
	}
	r := s.approles[roleID]
	if r == nil || secretID == "" || secretID != r.secretID {
		writeErrors(w, http.StatusBadRequest, "invalid role or secret ID")
		return
	}
	t := s.issue([]string{"default", "gpuaas"}, r.ttl, r.maxTTL, true, "approle", "auth/"+s.mounts.AppRole+"/login",
		map[string]string{"role_name": roleID})
	s.stats.Logins++
	writeJSON(w, http.StatusOK, response(nil, t.auth(s.now()), nil, "approle"))
}
