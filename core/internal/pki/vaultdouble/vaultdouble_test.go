package vaultdouble_test

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/pki/vaultdouble"
)

// TestWireShapes pins the raw HTTP answers the double gives, as Vault gives them.
func TestWireShapes(t *testing.T) {
	t.Parallel()
	now := time.Unix(1_700_000_000, 0)
	d, err := vaultdouble.New(vaultdouble.WithNow(func() time.Time { return now }))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	call := func(method, path, token, body string) (int, map[string]any) {
		t.Helper()
		req, err := http.NewRequest(method, d.URL+"/v1/"+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		if token != "" {
			req.Header.Set("X-Vault-Token", token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = resp.Body.Close() }()
		raw, _ := io.ReadAll(resp.Body)
		var out map[string]any
		if strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
			if err := json.Unmarshal(raw, &out); err != nil {
				t.Fatalf("%s %s: body %q: %v", method, path, raw, err)
			}
		}
		return resp.StatusCode, out
	}
	errorsOf := func(body map[string]any) string {
		b, _ := json.Marshal(body["errors"])
		return string(b)
	}
	root := d.RootToken

	for _, c := range []struct {
		name, method, path, token, body string
		status                          int
		errors                          string
	}{
		{"no token", "PUT", "transit/keys/k", "", `{"type":"ed25519"}`, 403, `["permission denied"]`},
		{"bad token", "GET", "auth/token/lookup-self", "hvs.nope", "", 403, `["permission denied"]`},
		{"unknown route", "GET", "nothing/here", root, "", 404, `["no handler for route \"nothing/here\". route entry not found."]`},
		{"missing key", "GET", "transit/keys/missing", root, "", 404, `[]`},
		{"sign with missing key", "PUT", "transit/sign/missing", root, `{"input":"aGk="}`, 400, `["signing key not found"]`},
		{"unknown pki role", "PUT", "pki/sign/other", root, `{"csr":"x"}`, 400, `["unknown role: other"]`},
		{"bad approle", "PUT", "auth/approle/login", "", `{"role_id":"r","secret_id":"s"}`, 400, `["invalid role or secret ID"]`},
		{"root is not renewable", "PUT", "auth/token/renew-self", root, `{}`, 400, `["lease is not renewable"]`},
	} {
		t.Run(c.name, func(t *testing.T) {
			status, body := call(c.method, c.path, c.token, c.body)
			if status != c.status || errorsOf(body) != c.errors || len(body) != 1 {
				t.Fatalf("%d %v; want %d {\"errors\": %s}", status, body, c.status, c.errors)
			}
		})
	}

	t.Run("success envelope", func(t *testing.T) {
		status, body := call("PUT", "transit/keys/k", root, `{"type":"ed25519"}`)
		if status != 200 {
			t.Fatalf("create key: %d %v", status, body)
		}
		for _, k := range []string{"request_id", "lease_id", "renewable", "lease_duration", "data", "wrap_info", "warnings", "auth"} {
			if _, ok := body[k]; !ok {
				t.Fatalf("envelope lacks %q: %v", k, body)
			}
		}
		data := body["data"].(map[string]any)
		if data["type"] != "ed25519" || data["latest_version"] != float64(1) {
			t.Fatalf("key data %v", data)
		}
	})

	t.Run("token expiry and renewal", func(t *testing.T) {
		status, body := call("PUT", "auth/token/create", root, `{"ttl":"10s","explicit_max_ttl":"15s"}`)
		if status != 200 {
			t.Fatalf("create token: %d %v", status, body)
		}
		auth := body["auth"].(map[string]any)
		tok := auth["client_token"].(string)
		if auth["lease_duration"] != float64(10) || auth["renewable"] != true || body["data"] != nil {
			t.Fatalf("auth %v", body)
		}
		now = now.Add(8 * time.Second)
		status, body = call("PUT", "auth/token/renew-self", tok, `{}`)
		// Renewed for 10 s but capped by the 15 s max: 7 s left.
		if status != 200 || body["auth"].(map[string]any)["lease_duration"] != float64(7) || body["warnings"] == nil {
			t.Fatalf("renew: %d %v", status, body)
		}
		now = now.Add(7 * time.Second)
		if status, _ := call("GET", "auth/token/lookup-self", tok, ""); status != 403 {
			t.Fatalf("expired token: %d", status)
		}
		if s := d.Stats(); s.Renewals != 1 || s.Denied < 3 {
			t.Fatalf("stats %+v", s)
		}
	})
}
