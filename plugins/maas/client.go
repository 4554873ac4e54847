package maas

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	gomaas "github.com/canonical/gomaasclient/client"
	"github.com/canonical/gomaasclient/entity"
	gomaasapi "github.com/juju/gomaasapi/v2"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/netguard"
)

// apiVersion is the MAAS API version the driver speaks.
const apiVersion = "2.0"

// conn is how the driver reaches one MAAS region. A gomaasclient client is
// built per call with a transport bound to the call's context, so every
// request ends when the caller gives up (gomaasclient itself takes no
// context).
type conn struct {
	url       string // region URL, e.g. http://maas:5240/MAAS/
	apiKey    string
	transport http.RoundTripper
	timeout   time.Duration
	retries   int
	backoff   time.Duration
}

// newConn validates the region URL and API key and builds the transport:
// direct connections only (no proxy), through a dialer that refuses
// link-local and cloud metadata addresses whatever a name resolves to.
func newConn(rawURL, apiKey, caPEM string, timeout time.Duration, retries int, backoff time.Duration) (*conn, error) {
	u, err := checkURL("maas_url", rawURL)
	if err != nil {
		return nil, err
	}
	if root, _, versioned := gomaasapi.SplitVersionedURL(u.String()); versioned {
		if u, err = url.Parse(root); err != nil {
			return nil, &base.ConfigError{Field: "maas_url", Reason: err.Error()}
		}
	}
	parts := strings.Split(apiKey, ":")
	if len(parts) != 3 || parts[0] == "" || parts[1] == "" || parts[2] == "" {
		return nil, &base.ConfigError{Field: "api_key", Reason: "want consumer_key:token_key:token_secret"}
	}
	for _, r := range apiKey {
		if r <= ' ' || r > '~' {
			return nil, &base.ConfigError{Field: "api_key", Reason: "must be printable ASCII without spaces"}
		}
	}
	tr := &http.Transport{
		Proxy:                 nil,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second, Control: netguard.DialControl}).DialContext,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: timeout,
		MaxIdleConnsPerHost:   4,
		IdleConnTimeout:       90 * time.Second,
	}
	if caPEM != "" {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM([]byte(caPEM)) {
			return nil, &base.ConfigError{Field: "ca_cert", Reason: "no PEM certificate found"}
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return &conn{url: gomaasapi.EnsureTrailingSlash(u.String()), apiKey: apiKey, transport: tr, timeout: timeout, retries: retries, backoff: backoff}, nil
}

// client returns a gomaasclient client whose requests carry ctx.
func (c *conn) client(ctx context.Context) (*gomaas.Client, error) {
	cl, err := gomaas.GetClientWithTransport(c.url, c.apiKey, apiVersion, &ctxTransport{ctx: ctx, base: c.transport, timeout: c.timeout})
	if err != nil {
		return nil, fmt.Errorf("maas client: %v: %w", err, base.ErrInvalidArgument)
	}
	return cl, nil
}

// call runs fn with a fresh client and maps its error. Idempotent calls
// (reads) are retried on ErrUnavailable with exponential backoff; others
// are not, their callers re-read MAAS before trying again.
func (c *conn) call(ctx context.Context, what string, idempotent bool, fn func(*gomaas.Client) error) error {
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("maas: %s: %w", what, err)
		}
		cl, err := c.client(ctx)
		if err != nil {
			return err
		}
		err = mapError(ctx, what, fn(cl))
		if err == nil || !idempotent || !errors.Is(err, base.ErrUnavailable) || attempt >= c.retries {
			return err
		}
		if err := c.pause(ctx, attempt, err); err != nil {
			return err
		}
	}
}

// pause waits before retry attempt+1: the backoff doubled per attempt, or
// what MAAS asked for in Retry-After (capped), until ctx ends.
func (c *conn) pause(ctx context.Context, attempt int, cause error) error {
	d := c.backoff << attempt
	var se *serverError
	if errors.As(cause, &se) && se.retryAfter > 0 {
		d = min(se.retryAfter, 10*time.Second)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("maas: waiting to retry after %v: %w", cause, ctx.Err())
	}
}

// retryAfterHeader carries MAAS's Retry-After past gomaasapi, which would
// otherwise sleep on it without regard to the caller's context.
const retryAfterHeader = "X-Gpuaas-Retry-After"

// ctxTransport binds requests to a context and a per-request timeout.
type ctxTransport struct {
	ctx     context.Context
	base    http.RoundTripper
	timeout time.Duration
}

var _ http.RoundTripper = (*ctxTransport)(nil)

// RoundTrip implements http.RoundTripper.
func (t *ctxTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx, cancel := context.WithTimeout(t.ctx, t.timeout)
	resp, err := t.base.RoundTrip(req.WithContext(ctx))
	if err != nil {
		cancel()
		return nil, err
	}
	if ra := resp.Header.Get("Retry-After"); ra != "" {
		resp.Header.Del("Retry-After")
		resp.Header.Set(retryAfterHeader, ra)
	}
	resp.Body = &cancelOnClose{ReadCloser: resp.Body, cancel: cancel}
	return resp, nil
}

type cancelOnClose struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (c *cancelOnClose) Close() error {
	defer c.cancel()
	if err := c.ReadCloser.Close(); err != nil {
		return fmt.Errorf("maas: closing response: %w", err)
	}
	return nil
}

// serverError is a non-2xx answer from MAAS.
type serverError struct {
	status     int
	message    string
	retryAfter time.Duration
	sentinel   error
}

func (e *serverError) Error() string {
	return fmt.Sprintf("MAAS answered %d %s: %s", e.status, http.StatusText(e.status), e.message)
}

func (e *serverError) Unwrap() error { return e.sentinel }

// mapError is the one place where errors from MAAS and the network become
// SDK sentinels. what names the operation for the message.
func mapError(ctx context.Context, what string, err error) error {
	if err == nil {
		return nil
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("maas: %s: %w", what, ctxErr)
	}
	if se, ok := asServerError(err); ok {
		return fmt.Errorf("maas: %s: %w", what, se)
	}
	var blocked *netguard.RefusedError
	switch {
	case errors.As(err, &blocked):
		return fmt.Errorf("maas: %s: %v: %w", what, blocked, base.ErrPermissionDenied)
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		// The per-request timeout, not the caller's context.
		return fmt.Errorf("maas: %s: MAAS did not answer in time: %v: %w", what, err, base.ErrUnavailable)
	}
	var certErr *tls.CertificateVerificationError
	var unknownCA x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	if errors.As(err, &certErr) || errors.As(err, &unknownCA) || errors.As(err, &hostErr) {
		return fmt.Errorf("maas: %s: TLS: %v (set ca_cert): %w", what, err, base.ErrFailedPrecondition)
	}
	var urlErr *url.Error
	var netErr net.Error
	var syntaxErr *json.SyntaxError
	var typeErr *json.UnmarshalTypeError
	switch {
	case errors.As(err, &urlErr), errors.As(err, &netErr), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return fmt.Errorf("maas: %s: MAAS unreachable: %v: %w", what, err, base.ErrUnavailable)
	case errors.As(err, &syntaxErr), errors.As(err, &typeErr):
		return fmt.Errorf("maas: %s: unexpected answer from MAAS: %v: %w", what, err, base.ErrInternal)
	}
	return fmt.Errorf("maas: %s: %v: %w", what, err, base.ErrInternal)
}

// asServerError turns gomaasapi's ServerError into a *serverError with
// its sentinel.
func asServerError(err error) (*serverError, bool) {
	se, ok := gomaasapi.GetServerError(err)
	if !ok {
		var direct gomaasapi.ServerError
		if !errors.As(err, &direct) {
			return nil, false
		}
		se = direct
	}
	out := &serverError{status: se.StatusCode, message: summarize(se.BodyMessage)}
	if ra, convErr := strconv.Atoi(se.Header.Get(retryAfterHeader)); convErr == nil && ra > 0 {
		out.retryAfter = time.Duration(ra) * time.Second
	}
	switch code := se.StatusCode; {
	case code == http.StatusBadRequest:
		out.sentinel = base.ErrInvalidArgument
	case code == http.StatusUnauthorized:
		out.sentinel = base.ErrUnauthenticated
	case code == http.StatusForbidden:
		out.sentinel = base.ErrPermissionDenied
	case code == http.StatusNotFound:
		out.sentinel = base.ErrNotFound
	case code == http.StatusConflict:
		// NodeStateViolation / NodesNotAvailable: the machine is not in a
		// state for this.
		out.sentinel = base.ErrFailedPrecondition
	case code == http.StatusTooManyRequests, code >= 500:
		out.sentinel = base.ErrUnavailable
	default:
		out.sentinel = base.ErrInternal
	}
	return out, true
}

// summarize makes a MAAS error body fit in one short line.
func summarize(body string) string {
	body = strings.Join(strings.Fields(body), " ")
	if len(body) > 300 {
		body = body[:300] + "..."
	}
	if body == "" {
		return "(no message)"
	}
	return body
}

// checkURL validates an http(s) URL of a config field: absolute, no
// credentials, and not a link-local or metadata address.
func checkURL(field, raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, &base.ConfigError{Field: field, Reason: "not a URL"}
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, &base.ConfigError{Field: field, Reason: fmt.Sprintf("scheme %q: want http or https", u.Scheme)}
	}
	if u.User != nil {
		return nil, &base.ConfigError{Field: field, Reason: "must not carry credentials"}
	}
	if why := netguard.Host(u.Hostname()); why != "" {
		return nil, &base.ConfigError{Field: field, Reason: why}
	}
	if u.Fragment != "" {
		return nil, &base.ConfigError{Field: field, Reason: "must not have a fragment"}
	}
	return u, nil
}

// machine is what the driver reads of a MAAS machine: gomaasclient's
// entity plus the failure reason, which the entity does not carry.
type machine struct {
	entity.Machine
	ErrorDescription string
}

// annotations returns the machine's workload annotations (owner data on
// older MAAS).
func (m *machine) annotations() map[string]string {
	if len(m.WorkloadAnnotations) > 0 {
		return m.WorkloadAnnotations
	}
	out := map[string]string{}
	if od, ok := m.OwnerData.(map[string]any); ok {
		for k, v := range od {
			if s, ok := v.(string); ok {
				out[k] = s
			}
		}
	}
	return out
}

// getMachine reads a machine by system id.
func (c *conn) getMachine(ctx context.Context, systemID string) (*machine, error) {
	var out *machine
	err := c.call(ctx, "read machine "+systemID, true, func(cl *gomaas.Client) error {
		mc, ok := cl.Machine.(*gomaas.Machine)
		if !ok {
			return fmt.Errorf("unexpected machine client %T", cl.Machine)
		}
		api := mc.APIClient.GetSubObject("machines").GetSubObject(systemID)
		return api.Get("", url.Values{}, func(data []byte) error {
			m := &machine{}
			if err := json.Unmarshal(data, &m.Machine); err != nil {
				return err
			}
			var extra struct {
				ErrorDescription string `json:"error_description"`
			}
			_ = json.Unmarshal(data, &extra)
			m.ErrorDescription = extra.ErrorDescription
			out = m
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}
