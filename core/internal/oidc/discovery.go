package oidc

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
)

// maxResponseBytes bounds every document read from the provider.
const maxResponseBytes = 1 << 20

// providerMetadata is the part of the OpenID Provider Metadata (OpenID Connect
// Discovery 1.0, section 3) that the verifier and the login flow use.
type providerMetadata struct {
	Issuer                            string   `json:"issuer"`
	AuthorizationEndpoint             string   `json:"authorization_endpoint"`
	TokenEndpoint                     string   `json:"token_endpoint"`
	JWKSURI                           string   `json:"jwks_uri"`
	UserinfoEndpoint                  string   `json:"userinfo_endpoint"`
	EndSessionEndpoint                string   `json:"end_session_endpoint"`
	TokenEndpointAuthMethodsSupported []string `json:"token_endpoint_auth_methods_supported"`
	CodeChallengeMethodsSupported     []string `json:"code_challenge_methods_supported"`
}

// discover fetches and checks the discovery document of issuer.
func discover(ctx context.Context, client *http.Client, issuer string) (providerMetadata, error) {
	var meta providerMetadata
	wellKnown := strings.TrimSuffix(issuer, "/") + "/.well-known/openid-configuration"
	if err := getJSON(ctx, client, wellKnown, &meta); err != nil {
		return meta, errcode.Wrap(err, CodeDiscoveryFailed, "cannot read the provider's discovery document")
	}
	if meta.Issuer != issuer {
		return meta, errcode.New(CodeIssuerMismatch,
			"discovery document names issuer %q, configured issuer is %q", meta.Issuer, issuer)
	}
	for name, endpoint := range map[string]string{
		"jwks_uri":               meta.JWKSURI,
		"authorization_endpoint": meta.AuthorizationEndpoint,
		"token_endpoint":         meta.TokenEndpoint,
	} {
		if u, err := url.Parse(endpoint); err != nil || !u.IsAbs() || u.Host == "" {
			return meta, errcode.New(CodeDiscoveryFailed, "discovery document has no usable %s", name)
		}
	}
	return meta, nil
}

// getJSON GETs url and decodes a JSON body of at most maxResponseBytes into dst.
func getJSON(ctx context.Context, client *http.Client, url string, dst any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return fmt.Errorf("build request for %s: %w", url, err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("get %s: %w", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBytes+1))
	if err != nil {
		return fmt.Errorf("read %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("get %s: status %d", url, resp.StatusCode)
	}
	if len(body) > maxResponseBytes {
		return fmt.Errorf("get %s: response larger than %d bytes", url, maxResponseBytes)
	}
	if err := json.Unmarshal(body, dst); err != nil {
		return fmt.Errorf("decode %s: %w", url, err)
	}
	return nil
}
