package pki

import (
	"net/http"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Defaults of the options.
const (
	// DefaultMaxCertTTL caps node certificates (agents renew at two thirds).
	DefaultMaxCertTTL = 24 * time.Hour
	// DefaultMaxSSHTTL caps SSH user certificates (terminal sessions).
	DefaultMaxSSHTTL = time.Hour
)

// Option configures a backend.
type Option func(*options)

type options struct {
	now        func() time.Time
	maxCertTTL time.Duration
	maxSSHTTL  time.Duration
	log        hclog.Logger
	httpClient *http.Client
}

func buildOptions(opts []Option) options {
	o := options{now: time.Now, maxCertTTL: DefaultMaxCertTTL, maxSSHTTL: DefaultMaxSSHTTL, log: hclog.NewNullLogger()}
	for _, f := range opts {
		f(&o)
	}
	return o
}

// WithNow sets the clock (default time.Now) of the local backend's
// certificates and revocations.
func WithNow(now func() time.Time) Option { return func(o *options) { o.now = now } }

// WithMaxCertTTL caps node certificates' lifetime (default DefaultMaxCertTTL;
// a Vault role's max_ttl caps it too).
func WithMaxCertTTL(d time.Duration) Option { return func(o *options) { o.maxCertTTL = d } }

// WithMaxSSHTTL caps SSH certificates' lifetime (default DefaultMaxSSHTTL).
func WithMaxSSHTTL(d time.Duration) Option { return func(o *options) { o.maxSSHTTL = d } }

// WithLogger sets the logger (default none). Keys, tokens and secret ids are
// never logged.
func WithLogger(l hclog.Logger) Option { return func(o *options) { o.log = l } }

// WithHTTPClient sets the HTTP client the Vault backend uses (default the
// Vault client's, configured from VAULT_CACERT, VAULT_CLIENT_CERT, ... in the
// environment).
func WithHTTPClient(c *http.Client) Option { return func(o *options) { o.httpClient = c } }
