// Package s3store is the storage-s3 driver: the gpuaas storage contract
// (sdk/storage) on any S3-compatible object store (AWS S3, Ceph RGW, MinIO,
// versitygw, ...), one bucket per configured instance.
//
// Objects live at key_prefix + key in the bucket. Put streams the body:
// objects up to one part go up in a single PutObject, larger ones as a
// multipart upload that reads the next part while the previous one uploads,
// so a Put holds at most two parts in memory; a failed or cancelled upload
// is aborted. Get streams the backend's response body through.
//
// Operation ids make mutating calls idempotent across process restarts: the
// result of each Put, Copy and Delete is recorded as a small JSON object under
// key_prefix + ".gpuaas/ops/", and objects written by Put and Copy carry a
// marker of the operation in their metadata, so a retry after a crash between
// the write and its record still finds the write. Keys under ".gpuaas/" are
// reserved: the driver refuses them and List never returns them. Operators
// may expire ".gpuaas/ops/" with a bucket lifecycle rule after the core's
// retry horizon (a day is plenty).
package s3store

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go/logging"
	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// Version is the driver's release version.
const Version = "0.1.0"

// Limits of the S3 protocol and of this driver.
const (
	// DefaultPartSize is the multipart part size when part_size_bytes is unset.
	DefaultPartSize = 16 << 20
	// MinPartSize is the smallest part S3 accepts (except the last one).
	MinPartSize = 5 << 20
	// MaxPartSize is the largest part S3 accepts.
	MaxPartSize = 5 << 30
	// MaxParts is the most parts one multipart upload may have. Objects of
	// known size larger than MaxParts parts get larger parts; a body of
	// unknown size may be at most MaxParts × part_size_bytes long.
	MaxParts = 10000
	// MaxPresignExpiry caps the lifetime of presigned URLs.
	MaxPresignExpiry = time.Hour
	// DefaultListLimit is the page size of List when the caller sets none.
	DefaultListLimit = 1000
	// MaxListLimit caps the page size of List.
	MaxListLimit = 10000

	// maxKeyLength is S3's limit on a full key, key_prefix included.
	maxKeyLength = 1024
	// maxCopyObjectSize is the largest object a single CopyObject copies.
	maxCopyObjectSize = 5 << 30
	// copyPartSize is the part size of a multipart (UploadPartCopy) copy.
	copyPartSize = 512 << 20
	// configureTimeout bounds the bucket check of Configure.
	configureTimeout = 30 * time.Second
)

// ReservedPrefix starts the keys the driver keeps for itself, relative to
// key_prefix. Calls with such keys fail with base.ErrInvalidArgument.
const ReservedPrefix = ".gpuaas/"

// Driver is the storage-s3 driver. Build it with New and configure it
// before use; it is safe for concurrent use and may be reconfigured.
type Driver struct {
	logger     hclog.Logger
	now        func() time.Time
	httpClient s3.HTTPClient

	// copyThreshold is the size above which Copy goes multipart, and
	// copyPart the part size it then uses; tests lower them.
	copyThreshold int64
	copyPart      int64

	mu       sync.Mutex
	s        *settings                // nil until configured
	inflight map[string]chan struct{} // operation id -> closed when done
}

var (
	_ storage.Driver      = (*Driver)(nil)
	_ storage.Presigner   = (*Driver)(nil)
	_ storage.RangeGetter = (*Driver)(nil)
)

// Option configures a Driver.
type Option func(*Driver)

// WithClock sets the clock that stamps presigned URL expiry times.
func WithClock(now func() time.Time) Option { return func(d *Driver) { d.now = now } }

// WithHTTPClient sets the HTTP client that talks to the S3 endpoint
// (default: the AWS SDK's client, with larger socket buffers).
func WithHTTPClient(c s3.HTTPClient) Option { return func(d *Driver) { d.httpClient = c } }

// New returns an unconfigured driver that logs to logger (nil: nowhere).
func New(logger hclog.Logger, opts ...Option) *Driver {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	d := &Driver{
		logger:        logger,
		now:           time.Now,
		copyThreshold: maxCopyObjectSize,
		copyPart:      copyPartSize,
		inflight:      map[string]chan struct{}{},
	}
	for _, o := range opts {
		o(d)
	}
	if d.httpClient == nil {
		d.httpClient = DefaultHTTPClient()
	}
	return d
}

// DefaultHTTPClient returns the HTTP client a driver uses unless
// WithHTTPClient says otherwise: the AWS SDK's, with socket buffers large
// enough that a streamed object is not copied 4 KiB at a time, and more
// idle connections kept per host for parallel calls.
func DefaultHTTPClient() *awshttp.BuildableClient {
	return awshttp.NewBuildableClient().WithTransportOptions(func(tr *http.Transport) {
		tr.ReadBufferSize = 128 << 10
		tr.WriteBufferSize = 128 << 10
		tr.MaxIdleConnsPerHost = 32
	})
}

// Info implements base.BasePlugin.
func (d *Driver) Info(context.Context) (*base.Info, error) {
	return &base.Info{
		Name:          "storage-s3",
		Kind:          base.KindStorage,
		DriverVersion: Version,
		APIVersions:   storage.SupportedAPIVersions(),
	}, nil
}

// Configuration field names.
const (
	fieldEndpoint      = "endpoint"
	fieldRegion        = "region"
	fieldBucket        = "bucket"
	fieldPathStyle     = "path_style"
	fieldAccessKeyID   = "access_key_id"
	fieldSecretKey     = "secret_access_key"
	fieldPartSize      = "part_size_bytes"
	fieldKeyPrefix     = "key_prefix"
	fieldPresignExpiry = "presign_max_expiry"
	fieldConcurrency   = "upload_concurrency"
)

// ConfigSchema implements base.BasePlugin.
func (d *Driver) ConfigSchema(context.Context) (*base.ConfigSchema, error) {
	return &base.ConfigSchema{Fields: []base.Field{
		{Name: fieldEndpoint, Type: base.TypeURL, Description: "S3 endpoint, http:// or https:// (e.g. https://rgw.example.net:8443). Leave unset for AWS S3 in the region."},
		{Name: fieldRegion, Type: base.TypeString, Required: true, Description: "Region the requests are signed for (e.g. us-east-1; what the store expects for S3-compatible stores)."},
		{Name: fieldBucket, Type: base.TypeString, Required: true, Description: "Bucket that holds the objects; it must exist."},
		{Name: fieldPathStyle, Type: base.TypeBool, Default: false, Description: "Address the bucket in the path (endpoint/bucket/key) instead of the host name; most S3-compatible stores need this."},
		{Name: fieldAccessKeyID, Type: base.TypeSecret, Required: true, Description: "Access key id."},
		{Name: fieldSecretKey, Type: base.TypeSecret, Required: true, Description: "Secret access key."},
		{Name: fieldPartSize, Type: base.TypeInt, Default: DefaultPartSize, Description: "Multipart part size in bytes (5 MiB to 5 GiB). Objects larger than one part upload in parts; a Put holds at most two parts in memory."},
		{Name: fieldConcurrency, Type: base.TypeInt, Default: 1, Description: "Parts of one Put that upload at once (1 to 16) while the next part is read; a Put holds upload_concurrency+1 parts in memory."},
		{Name: fieldKeyPrefix, Type: base.TypeString, Default: "", Description: "Prefix put before every key, ending in '/' (e.g. gpuaas/); empty for none."},
		{Name: fieldPresignExpiry, Type: base.TypeDuration, Default: MaxPresignExpiry.String(), Description: "Longest lifetime of a presigned URL (at most 1h); longer requests are shortened to it."},
	}}, nil
}

// settings is one configuration, immutable once built.
type settings struct {
	client    *s3.Client
	presigner *s3.PresignClient
	endpoint  string // for messages: the URL, or "AWS S3 (region)"
	bucket    string
	prefix    string
	partSize  int64
	// concurrency is how many parts of one Put upload at once.
	concurrency int
	presignMax  time.Duration
	// bufs holds *[]byte part buffers of partSize bytes for reuse.
	bufs *sync.Pool
}

var (
	regionRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)
	bucketRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$`)
)

// newSettings checks cfg beyond what the schema can say and builds the S3
// clients. Errors name the field.
func (d *Driver) newSettings(cfg *base.Config) (*settings, error) {
	s := &settings{
		bucket:      cfg.String(fieldBucket),
		prefix:      cfg.String(fieldKeyPrefix),
		partSize:    cfg.Int(fieldPartSize),
		concurrency: int(cfg.Int(fieldConcurrency)),
		presignMax:  cfg.Duration(fieldPresignExpiry),
		bufs:        &sync.Pool{},
	}
	region := cfg.String(fieldRegion)
	endpoint := cfg.String(fieldEndpoint)
	if endpoint != "" {
		u, err := url.Parse(endpoint)
		switch {
		case err != nil:
			return nil, &base.ConfigError{Field: fieldEndpoint, Reason: fmt.Sprintf("not a URL: %v", err)}
		case u.Scheme != "http" && u.Scheme != "https":
			return nil, &base.ConfigError{Field: fieldEndpoint, Reason: fmt.Sprintf("scheme %q: want http or https", u.Scheme)}
		case u.Host == "":
			return nil, &base.ConfigError{Field: fieldEndpoint, Reason: "no host"}
		case u.User != nil:
			return nil, &base.ConfigError{Field: fieldEndpoint, Reason: "credentials in the URL; use access_key_id and secret_access_key"}
		case u.RawQuery != "" || u.Fragment != "":
			return nil, &base.ConfigError{Field: fieldEndpoint, Reason: "query or fragment in the URL"}
		case u.Path != "" && u.Path != "/":
			return nil, &base.ConfigError{Field: fieldEndpoint, Reason: fmt.Sprintf("path %q: want scheme://host[:port] only", u.Path)}
		}
		endpoint = u.Scheme + "://" + u.Host
		s.endpoint = endpoint
	} else {
		s.endpoint = fmt.Sprintf("AWS S3 (%s)", region)
	}
	if !regionRE.MatchString(region) {
		return nil, &base.ConfigError{Field: fieldRegion, Reason: fmt.Sprintf("%q: want letters, digits, '-' or '_'", region)}
	}
	if !bucketRE.MatchString(s.bucket) || strings.Contains(s.bucket, "..") {
		return nil, &base.ConfigError{Field: fieldBucket, Reason: fmt.Sprintf("%q is not a valid bucket name (3-63 lower case letters, digits, '.', '-', '_')", s.bucket)}
	}
	if s.partSize < MinPartSize || s.partSize > MaxPartSize {
		return nil, &base.ConfigError{Field: fieldPartSize, Reason: fmt.Sprintf("%d: want %d (5 MiB) to %d (5 GiB)", s.partSize, MinPartSize, int64(MaxPartSize))}
	}
	if s.concurrency < 1 || s.concurrency > 16 {
		return nil, &base.ConfigError{Field: fieldConcurrency, Reason: fmt.Sprintf("%d: want 1 to 16", s.concurrency)}
	}
	if err := checkKeyPrefix(s.prefix); err != nil {
		return nil, err
	}
	if s.presignMax <= 0 || s.presignMax > MaxPresignExpiry {
		return nil, &base.ConfigError{Field: fieldPresignExpiry, Reason: fmt.Sprintf("%s: want more than 0 and at most %s", s.presignMax, MaxPresignExpiry)}
	}

	creds := aws.Credentials{
		AccessKeyID:     cfg.String(fieldAccessKeyID),
		SecretAccessKey: cfg.String(fieldSecretKey),
		Source:          "storage-s3 configuration",
	}
	logger := d.logger.Named("s3")
	opts := s3.Options{
		Region:       region,
		UsePathStyle: cfg.Bool(fieldPathStyle),
		Credentials: aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return creds, nil
		}),
		HTTPClient: d.httpClient,
		// Checksums only where S3 requires them: the trailing-checksum
		// framing the SDK uses otherwise is not understood by every
		// S3-compatible store, and the signed payload hash already
		// protects the body on plain http.
		RequestChecksumCalculation:                aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation:                aws.ResponseChecksumValidationWhenRequired,
		DisableLogOutputChecksumValidationSkipped: true,
		Logger: logging.LoggerFunc(func(c logging.Classification, format string, v ...any) {
			if c == logging.Warn {
				logger.Warn(fmt.Sprintf(format, v...))
			} else {
				logger.Debug(fmt.Sprintf(format, v...))
			}
		}),
	}
	if endpoint != "" {
		opts.BaseEndpoint = aws.String(endpoint)
	}
	s.client = s3.New(opts)
	s.presigner = s3.NewPresignClient(s.client)
	return s, nil
}

func checkKeyPrefix(p string) error {
	bad := func(reason string) error { return &base.ConfigError{Field: fieldKeyPrefix, Reason: reason} }
	switch {
	case p == "":
		return nil
	case !utf8.ValidString(p):
		return bad("not UTF-8")
	case strings.HasPrefix(p, "/"):
		return bad(fmt.Sprintf("%q starts with '/'", p))
	case !strings.HasSuffix(p, "/"):
		return bad(fmt.Sprintf("%q does not end with '/'", p))
	case strings.Contains(p, "//"):
		return bad(fmt.Sprintf("%q has an empty segment", p))
	case len(p) > 512:
		return bad("longer than 512 bytes")
	}
	for _, seg := range strings.Split(strings.TrimSuffix(p, "/"), "/") {
		if seg == "." || seg == ".." {
			return bad(fmt.Sprintf("%q has a %q segment", p, seg))
		}
	}
	for _, r := range p {
		if r < 0x20 || r == 0x7f {
			return bad("control character")
		}
	}
	return nil
}

// Configure implements base.BasePlugin. It checks that the bucket exists
// and that the credentials may list it (HeadBucket) before it replaces the
// running configuration.
func (d *Driver) Configure(ctx context.Context, cfg *base.Config) error {
	s, err := d.newSettings(cfg)
	if err != nil {
		return err
	}
	if err := s.checkBucket(ctx); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.s = s
	d.logger.Info("configured", "endpoint", s.endpoint, "bucket", s.bucket, "key_prefix", s.prefix,
		"part_size_bytes", s.partSize, "instance", cfg.Instance, "api_version", cfg.APIVersion)
	return nil
}

// settings returns the running configuration.
func (d *Driver) settings() (*settings, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.s == nil {
		return nil, fmt.Errorf("storage-s3: not configured: %w", base.ErrFailedPrecondition)
	}
	return d.s, nil
}

// objectKey is the bucket key of a driver key.
func (s *settings) objectKey(key string) string { return s.prefix + key }

// checkKey refuses keys the SDK would refuse, keys too long once prefixed,
// and keys in the reserved namespace.
func (s *settings) checkKey(what, key string) error {
	switch {
	case key == "":
		return fmt.Errorf("storage-s3: %s: empty: %w", what, base.ErrInvalidArgument)
	case !utf8.ValidString(key):
		return fmt.Errorf("storage-s3: %s: not UTF-8: %w", what, base.ErrInvalidArgument)
	case len(s.prefix)+len(key) > maxKeyLength:
		return fmt.Errorf("storage-s3: %s: %d bytes with the key prefix, more than %d: %w", what, len(s.prefix)+len(key), maxKeyLength, base.ErrInvalidArgument)
	case strings.HasPrefix(key, ReservedPrefix):
		return fmt.Errorf("storage-s3: %s %q: keys under %q are reserved: %w", what, key, ReservedPrefix, base.ErrInvalidArgument)
	}
	return nil
}

// partBuffer returns a buffer of size bytes and the func that gives it
// back; buffers of the configured part size are reused.
func (s *settings) partBuffer(size int64) (buf []byte, release func()) {
	if size != s.partSize {
		return make([]byte, size), func() {}
	}
	if p, ok := s.bufs.Get().(*[]byte); ok {
		return *p, func() { s.bufs.Put(p) }
	}
	b := make([]byte, size)
	return b, func() { s.bufs.Put(&b) }
}
