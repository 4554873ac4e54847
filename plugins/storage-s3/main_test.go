package s3store_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/internal/s3test"
	s3store "github.com/gpuaas/gpuaas/plugins/storage-s3"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// The tests run against a real S3 server: the one the environment names
// (S3_ENDPOINT, S3_REGION, S3_BUCKET, S3_ACCESS_KEY_ID,
// S3_SECRET_ACCESS_KEY; the dev stack exports them), else a versitygw
// gateway they start on a free loopback port over a temporary folder.

// server is the S3 server of this test run, set by TestMain.
var server s3Server

// s3Server says how to reach the S3 server and its bucket.
type s3Server struct {
	Endpoint, Region, Bucket, AccessKeyID, SecretAccessKey string
}

func TestMain(m *testing.M) {
	// go-plugin's in-process test connection logs at debug level to
	// hclog's default output with no way to turn it off.
	hclog.DefaultOutput = io.Discard
	srv, stop, err := startS3()
	if err != nil {
		fmt.Fprintln(os.Stderr, "storage-s3 tests:", err)
		os.Exit(1)
	}
	server = srv
	code := m.Run()
	stop()
	os.Exit(code)
}

const versitygwHint = "install it with `make deps` (devstack/scripts/ensure-deps.sh) or " +
	"`go install github.com/versity/versitygw/cmd/versitygw@v1.8.0`, set VERSITYGW to its path, " +
	"or point S3_ENDPOINT, S3_REGION, S3_BUCKET, S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY at an S3 server " +
	"(the dev stack exports them)"

// startS3 returns the S3 server from the environment, or starts versitygw.
func startS3() (s3Server, func(), error) {
	if endpoint := os.Getenv("S3_ENDPOINT"); endpoint != "" {
		srv := s3Server{Endpoint: endpoint, Region: os.Getenv("S3_REGION"), Bucket: os.Getenv("S3_BUCKET"),
			AccessKeyID: os.Getenv("S3_ACCESS_KEY_ID"), SecretAccessKey: os.Getenv("S3_SECRET_ACCESS_KEY")}
		if srv.Region == "" || srv.Bucket == "" || srv.AccessKeyID == "" || srv.SecretAccessKey == "" {
			return s3Server{}, nil, errors.New("S3_ENDPOINT is set but S3_REGION, S3_BUCKET, S3_ACCESS_KEY_ID or S3_SECRET_ACCESS_KEY is not")
		}
		return srv, func() {}, nil
	}
	bin, err := findVersitygw()
	if err != nil {
		return s3Server{}, nil, err
	}
	root, err := os.MkdirTemp("", "storage-s3-test-")
	if err != nil {
		return s3Server{}, nil, err
	}
	srv := s3Server{Region: "us-east-1", Bucket: "gpuaas-test", AccessKeyID: "storages3test", SecretAccessKey: "storage-s3-test-secret-0123456789"}
	var (
		cmd    *exec.Cmd
		exited chan struct{} // closed when cmd has been waited for
		logs   bytes.Buffer
	)
	kill := func() {
		if cmd != nil {
			_ = cmd.Process.Kill()
			<-exited
			cmd = nil
		}
	}
	stop := func() {
		kill()
		_ = os.RemoveAll(root)
	}
	// A free port can be taken between the probe and the gateway's
	// listen; try a few.
	for attempt := 0; attempt < 5; attempt++ {
		addr, err := freeAddr()
		if err != nil {
			stop()
			return s3Server{}, nil, err
		}
		logs.Reset()
		// --keep-alive as S3 does; the dev stack's gateway runs without.
		cmd = exec.Command(bin, "--port", addr, "--region", srv.Region, "--keep-alive", "--quiet", "posix", root)
		// Credentials through the environment keep them out of ps.
		cmd.Env = append(os.Environ(), "ROOT_ACCESS_KEY_ID="+srv.AccessKeyID, "ROOT_SECRET_ACCESS_KEY="+srv.SecretAccessKey)
		cmd.Stdout, cmd.Stderr = &logs, &logs
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // no gateway outlives the tests
		if err := cmd.Start(); err != nil {
			cmd = nil
			stop()
			return s3Server{}, nil, fmt.Errorf("starting %s: %w", bin, err)
		}
		exited = make(chan struct{})
		go func(cmd *exec.Cmd, exited chan struct{}) {
			_ = cmd.Wait()
			close(exited)
		}(cmd, exited)
		srv.Endpoint = "http://" + addr
		if err := waitListening(addr, exited, 15*time.Second); err != nil {
			kill()
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err = srv.client().CreateBucket(ctx, &s3.CreateBucketInput{Bucket: &srv.Bucket})
		cancel()
		if err != nil {
			stop()
			return s3Server{}, nil, fmt.Errorf("creating bucket %q on versitygw: %w\n%s", srv.Bucket, err, logs.String())
		}
		return srv, stop, nil
	}
	stop()
	return s3Server{}, nil, fmt.Errorf("versitygw did not start listening:\n%s", logs.String())
}

func findVersitygw() (string, error) {
	candidates := []string{os.Getenv("VERSITYGW")}
	if p, err := exec.LookPath("versitygw"); err == nil {
		candidates = append(candidates, p)
	}
	gopath := os.Getenv("GOPATH")
	if gopath == "" {
		if home, err := os.UserHomeDir(); err == nil {
			gopath = filepath.Join(home, "go")
		}
	}
	candidates = append(candidates, filepath.Join(gopath, "bin", "versitygw"))
	for _, c := range candidates {
		if c == "" {
			continue
		}
		if st, err := os.Stat(c); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return c, nil
		}
	}
	return "", fmt.Errorf("no S3 server: S3_ENDPOINT is unset and the versitygw binary was not found; %s", versitygwHint)
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer func() { _ = l.Close() }()
	return l.Addr().String(), nil
}

func waitListening(addr string, exited <-chan struct{}, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return errors.New("versitygw exited")
		default:
		}
		if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
			_ = c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("versitygw not listening on %s after %s", addr, timeout)
}

// client is a plain S3 client of the server, for checks and baselines,
// with the driver's HTTP client.
func (srv s3Server) client() *s3.Client {
	return s3.New(s3.Options{
		HTTPClient:   s3store.DefaultHTTPClient(),
		Region:       srv.Region,
		BaseEndpoint: aws.String(srv.Endpoint),
		UsePathStyle: true,
		Credentials: aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return aws.Credentials{AccessKeyID: srv.AccessKeyID, SecretAccessKey: srv.SecretAccessKey}, nil
		}),
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
	})
}

// config is a driver configuration with a key prefix of its own, emptied
// when the test ends. extra overrides fields; a nil value removes one.
func (srv s3Server) config(t testing.TB, extra map[string]any) map[string]any {
	t.Helper()
	prefix := uniquePrefix(t)
	cfg := map[string]any{
		"endpoint":          srv.Endpoint,
		"region":            srv.Region,
		"bucket":            srv.Bucket,
		"path_style":        true,
		"access_key_id":     srv.AccessKeyID,
		"secret_access_key": srv.SecretAccessKey,
		"key_prefix":        prefix,
	}
	for k, v := range extra {
		if v == nil {
			delete(cfg, k)
		} else {
			cfg[k] = v
		}
	}
	t.Cleanup(func() { s3test.Empty(t, srv.client(), srv.Bucket, prefix) })
	return cfg
}

func uniquePrefix(t testing.TB) string {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	name := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
			return r
		}
		return '-'
	}, t.Name())
	if len(name) > 40 {
		name = name[:40]
	}
	return "storage-s3-test/" + name + "-" + hex.EncodeToString(b[:]) + "/"
}

// uploads lists the incomplete multipart uploads under prefix.
func (srv s3Server) uploads(t testing.TB, prefix string) []types.MultipartUpload {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := srv.client().ListMultipartUploads(ctx, &s3.ListMultipartUploadsInput{Bucket: &srv.Bucket, Prefix: &prefix})
	if err != nil {
		t.Fatalf("ListMultipartUploads: %v", err)
	}
	return out.Uploads
}

// configure validates raw against the driver's schema, as the core does,
// and configures d with it.
func configure(ctx context.Context, d *s3store.Driver, raw map[string]any) error {
	schema, err := d.ConfigSchema(ctx)
	if err != nil {
		return err
	}
	cfg, err := base.ValidateConfig(schema, raw)
	if err != nil {
		return err
	}
	cfg.APIVersion = storage.APIVersion1
	cfg.Instance = "test"
	return d.Configure(ctx, cfg)
}

// setup is what most tests need: a configured driver with a key prefix of
// its own.
type setup struct {
	ctx    context.Context
	d      *s3store.Driver
	cfg    map[string]any
	prefix string // the driver's key_prefix
	raw    *s3.Client
	ops    int
}

func newSetup(t testing.TB, extra map[string]any, opts ...s3store.Option) *setup {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	cfg := server.config(t, extra)
	d := s3store.New(hclog.NewNullLogger(), opts...)
	if err := configure(ctx, d, cfg); err != nil {
		t.Fatalf("Configure: %v", err)
	}
	return &setup{ctx: ctx, d: d, cfg: cfg, prefix: cfg["key_prefix"].(string), raw: server.client()}
}

// op returns a fresh operation id.
func (s *setup) op() string {
	s.ops++
	return fmt.Sprintf("op-%d-%d", time.Now().UnixNano(), s.ops)
}

// put stores data under key.
func (s *setup) put(t testing.TB, key string, data []byte, contentType string) *storage.ObjectInfo {
	t.Helper()
	info, err := s.d.Put(s.ctx, &storage.PutRequest{OperationID: s.op(), Key: key, Size: int64(len(data)), ContentType: contentType}, bytes.NewReader(data))
	if err != nil {
		t.Fatalf("Put %q: %v", key, err)
	}
	return info
}

// get reads the whole object at key.
func (s *setup) get(t testing.TB, key string) []byte {
	t.Helper()
	obj, err := s.d.Get(s.ctx, key)
	if err != nil {
		t.Fatalf("Get %q: %v", key, err)
	}
	defer func() { _ = obj.Body.Close() }()
	b, err := io.ReadAll(obj.Body)
	if err != nil {
		t.Fatalf("Get %q: reading: %v", key, err)
	}
	if int64(len(b)) != obj.Info.Size {
		t.Fatalf("Get %q: %d bytes, info says %d", key, len(b), obj.Info.Size)
	}
	return b
}

func randomBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func nullLogger() hclog.Logger { return hclog.NewNullLogger() }
