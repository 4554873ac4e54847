package manual

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/netguard"
)

// The driver talks to two services it is configured with (the core and
// Nomad) and hands a third URL (the agent listener) to nodes. None of them
// may point at link-local or cloud instance-metadata addresses: a
// configuration must not turn the driver into a way to read a host's
// metadata credentials. URLs are checked at Configure, and the dialer checks
// every address it connects to again, whatever a name resolved to.

// urlRule says which schemes a URL field accepts.
type urlRule int

const (
	httpOrHTTPS urlRule = iota
	httpsOnly
)

// checkServiceURL validates the URL of a config field: http(s) (or https
// only), absolute, no credentials, query or fragment, and no host that is
// a link-local, multicast, unspecified or metadata address or name. It
// returns the URL without a trailing slash.
func checkServiceURL(field, raw string, rule urlRule) (string, error) {
	bad := func(format string, args ...any) error {
		return &base.ConfigError{Field: field, Reason: fmt.Sprintf(format, args...)}
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "", bad("not a URL")
	}
	switch {
	case rule == httpsOnly && u.Scheme != "https":
		return "", bad("scheme %q: want https", u.Scheme)
	case u.Scheme != "http" && u.Scheme != "https":
		return "", bad("scheme %q: want http or https", u.Scheme)
	case u.User != nil:
		return "", bad("must not carry credentials")
	case u.RawQuery != "" || u.ForceQuery:
		return "", bad("must not have a query")
	case u.Fragment != "":
		return "", bad("must not have a fragment")
	case u.Opaque != "":
		return "", bad("not a hierarchical URL")
	}
	if why := netguard.Host(u.Hostname()); why != "" {
		return "", bad("%s", why)
	}
	return strings.TrimRight(u.String(), "/"), nil
}

// certPool parses PEM CA certificates. It returns nil for an empty PEM.
func certPool(field, pemText string) (*x509.CertPool, []*x509.Certificate, error) {
	if strings.TrimSpace(pemText) == "" {
		return nil, nil, nil
	}
	var certs []*x509.Certificate
	rest := []byte(pemText)
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, nil, &base.ConfigError{Field: field, Reason: fmt.Sprintf("PEM block %q: want CERTIFICATE", block.Type)}
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, nil, &base.ConfigError{Field: field, Reason: fmt.Sprintf("certificate %d: %v", len(certs)+1, err)}
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, nil, &base.ConfigError{Field: field, Reason: "no PEM certificate found"}
	}
	if strings.TrimSpace(string(rest)) != "" {
		return nil, nil, &base.ConfigError{Field: field, Reason: "text after the last PEM certificate"}
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
	}
	return pool, certs, nil
}

// encodeCerts writes certificates as clean PEM (no text around the blocks).
func encodeCerts(certs []*x509.Certificate) string {
	var b strings.Builder
	for _, c := range certs {
		b.Write(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
	}
	return b.String()
}

// newHTTPClient is a client that connects directly (no proxy), refuses
// forbidden addresses at dial time, trusts roots (system roots when nil),
// and gives up on one request after timeout.
func newHTTPClient(roots *x509.CertPool, timeout time.Duration) *http.Client {
	tr := &http.Transport{
		Proxy: nil,
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
			Control:   netguard.DialControl,
		}).DialContext,
		TLSClientConfig:       &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: timeout,
		MaxIdleConnsPerHost:   8,
		IdleConnTimeout:       90 * time.Second,
		ForceAttemptHTTP2:     true,
	}
	return &http.Client{
		Transport: tr,
		Timeout:   timeout,
		// A redirect could lead anywhere; the services the driver talks to
		// have no reason to send one.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}
