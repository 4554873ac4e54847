// Package s3gw runs the Versity S3 gateway (versitygw) with its posix backend as a child
// process and makes sure a bucket exists.
package s3gw

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"

	"github.com/gpuaas/gpuaas/devstack/childproc"
	"github.com/gpuaas/gpuaas/devstack/loopback"
)

// InstallHint installs the binary.
const InstallHint = "go install github.com/versity/versitygw/cmd/versitygw@latest"

// Launcher starts child processes.
type Launcher interface {
	Start(cmd *exec.Cmd, opts ...childproc.Option) (*childproc.Process, error)
}

// Config describes one gateway.
type Config struct {
	Bin     string
	Port    int
	RootDir string // posix backend: every folder in it is a bucket
	LogFile string
	Region  string
	Bucket  string // created at start when missing
	// AccessKeyID and SecretAccessKey are the root credentials; random when empty.
	AccessKeyID, SecretAccessKey string
}

// Gateway is a versitygw process that can be stopped and started again on the same port.
type Gateway struct {
	cfg      Config
	launcher Launcher

	mu   sync.Mutex
	proc *childproc.Process
	log  *os.File
}

// New returns a stopped gateway.
func New(cfg Config, launcher Launcher) (*Gateway, error) {
	if cfg.Bin == "" || cfg.Port == 0 || cfg.RootDir == "" || cfg.LogFile == "" || cfg.Bucket == "" {
		return nil, errors.New("s3gw: Bin, Port, RootDir, LogFile and Bucket are required")
	}
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	if cfg.AccessKeyID == "" {
		cfg.AccessKeyID = "GPUAAS" + randomString(14)
	}
	if cfg.SecretAccessKey == "" {
		cfg.SecretAccessKey = randomString(40)
	}
	return &Gateway{cfg: cfg, launcher: launcher}, nil
}

func randomString(n int) string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails on Linux
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

// Addr is host:port.
func (g *Gateway) Addr() string { return loopback.Addr(g.cfg.Port) }

// Endpoint is the S3 endpoint URL (S3_ENDPOINT).
func (g *Gateway) Endpoint() string { return "http://" + g.Addr() }

// Region is the signing region.
func (g *Gateway) Region() string { return g.cfg.Region }

// Bucket is the bucket made at start.
func (g *Gateway) Bucket() string { return g.cfg.Bucket }

// Credentials are the root access key id and secret.
func (g *Gateway) Credentials() (accessKeyID, secretAccessKey string) {
	return g.cfg.AccessKeyID, g.cfg.SecretAccessKey
}

// Client returns an S3 client for the gateway (path-style addressing).
func (g *Gateway) Client(optFns ...func(*s3.Options)) *s3.Client {
	return s3.New(s3.Options{
		Region:                     g.cfg.Region,
		BaseEndpoint:               aws.String(g.Endpoint()),
		UsePathStyle:               true,
		Credentials:                credentials.NewStaticCredentialsProvider(g.cfg.AccessKeyID, g.cfg.SecretAccessKey, ""),
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
	}, optFns...)
}

// Start starts the gateway, creates the bucket when missing and returns once HeadBucket
// succeeds.
func (g *Gateway) Start(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.proc != nil {
		return nil
	}
	if err := os.MkdirAll(g.cfg.RootDir, 0o755); err != nil {
		return fmt.Errorf("create s3 root: %w", err)
	}
	logf, err := os.OpenFile(g.cfg.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open versitygw log: %w", err)
	}
	cmd := exec.Command(g.cfg.Bin,
		"--port", g.Addr(),
		"--region", g.cfg.Region,
		"--quiet",
		"posix", g.cfg.RootDir)
	// Credentials through the environment keep them out of `ps`.
	cmd.Env = append(os.Environ(),
		"ROOT_ACCESS_KEY_ID="+g.cfg.AccessKeyID,
		"ROOT_SECRET_ACCESS_KEY="+g.cfg.SecretAccessKey)
	cmd.Stdout, cmd.Stderr = logf, logf
	proc, err := g.launcher.Start(cmd)
	if err != nil {
		_ = logf.Close()
		return fmt.Errorf("start versitygw: %w", err)
	}
	g.proc, g.log = proc, logf
	client := g.Client(func(o *s3.Options) { o.RetryMaxAttempts = 1 })
	err = loopback.Poll(ctx, 25*time.Millisecond, proc.Done(), func(ctx context.Context) error {
		return g.ensureBucket(ctx, client)
	})
	if err != nil {
		select {
		case <-proc.Done():
			err = fmt.Errorf("versitygw exited (%v): %w", proc.Err(), err)
		default:
		}
		_ = g.stopLocked(ctx)
		return err
	}
	return nil
}

func (g *Gateway) ensureBucket(ctx context.Context, client *s3.Client) error {
	_, err := client.HeadBucket(ctx, &s3.HeadBucketInput{Bucket: aws.String(g.cfg.Bucket)})
	var notFound *types.NotFound
	if !errors.As(err, &notFound) {
		return err
	}
	_, err = client.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(g.cfg.Bucket)})
	var owned *types.BucketAlreadyOwnedByYou
	if err != nil && !errors.As(err, &owned) {
		return fmt.Errorf("create bucket %s: %w", g.cfg.Bucket, err)
	}
	return g.CheckHealth(ctx)
}

// CheckHealth runs HeadBucket on the bucket.
func (g *Gateway) CheckHealth(ctx context.Context) error {
	_, err := g.Client(func(o *s3.Options) { o.RetryMaxAttempts = 1 }).
		HeadBucket(ctx, &s3.HeadBucketInput{Bucket: aws.String(g.cfg.Bucket)})
	return err
}

// Stop stops the gateway and returns once its port is closed.
func (g *Gateway) Stop(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.stopLocked(ctx)
}

func (g *Gateway) stopLocked(ctx context.Context) error {
	if g.proc == nil {
		return nil
	}
	g.proc.Stop(syscall.SIGTERM, 5*time.Second)
	g.proc = nil
	_ = g.log.Close()
	return loopback.WaitClosed(ctx, g.Addr())
}
