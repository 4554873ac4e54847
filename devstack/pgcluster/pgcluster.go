// Package pgcluster runs a private PostgreSQL cluster in a data folder with the system's
// PostgreSQL binaries, as a child process of the dev stack.
package pgcluster

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/devstack/childproc"
	"github.com/gpuaas/gpuaas/devstack/loopback"
)

// DefaultBinDir holds initdb and postgres on Debian.
const DefaultBinDir = "/usr/lib/postgresql/15/bin"

// stopGrace is how long a fast shutdown may take before the process group is killed.
const stopGrace = 20 * time.Second

// Launcher starts child processes.
type Launcher interface {
	Start(cmd *exec.Cmd, opts ...childproc.Option) (*childproc.Process, error)
}

// Config describes one cluster.
type Config struct {
	BinDir  string // DefaultBinDir unless set
	DataDir string
	LogFile string
	Port    int
	// AppName is the application's role and database (owned by the role), created at start.
	AppName string
}

// Cluster is a PostgreSQL cluster that can be stopped and started again on the same port.
type Cluster struct {
	cfg      Config
	launcher Launcher
	cred     *syscall.Credential // nil when not running as root

	mu   sync.Mutex
	proc *childproc.Process
	log  *os.File
}

// New checks that the binaries exist and finds the OS user to run them as.
func New(cfg Config, launcher Launcher) (*Cluster, error) {
	if cfg.BinDir == "" {
		cfg.BinDir = DefaultBinDir
	}
	if cfg.DataDir == "" || cfg.LogFile == "" || cfg.Port == 0 || cfg.AppName == "" {
		return nil, errors.New("pgcluster: DataDir, LogFile, Port and AppName are required")
	}
	for _, bin := range []string{"initdb", "postgres"} {
		if _, err := os.Stat(filepath.Join(cfg.BinDir, bin)); err != nil {
			return nil, fmt.Errorf("PostgreSQL 15 not found (%w): install it with `apt-get install -y postgresql`", err)
		}
	}
	c := &Cluster{cfg: cfg, launcher: launcher}
	if os.Geteuid() == 0 {
		cred, err := unprivilegedUser()
		if err != nil {
			return nil, err
		}
		c.cred = cred
	}
	return c, nil
}

// PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` OS
// user, or `nobody` where there is none.
func unprivilegedUser() (*syscall.Credential, error) {
	var errs []error
	for _, name := range []string{"postgres", "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
		gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
		if err := errors.Join(err1, err2); err != nil {
			return nil, fmt.Errorf("user %s: %w", name, err)
		}
		return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
	}
	return nil, fmt.Errorf("no OS user to run PostgreSQL as: %w", errors.Join(errs...))
}

// Addr is host:port.
func (c *Cluster) Addr() string { return loopback.Addr(c.cfg.Port) }

// URL connects as the application role to its database (DATABASE_URL).
func (c *Cluster) URL() string {
	return fmt.Sprintf("postgres://%s@%s/%s?sslmode=disable", c.cfg.AppName, c.Addr(), c.cfg.AppName)
}

// AdminURL connects as the superuser to the postgres database.
func (c *Cluster) AdminURL() string {
	return fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable", c.Addr())
}

// BinDir is where the PostgreSQL binaries are.
func (c *Cluster) BinDir() string { return c.cfg.BinDir }

// Start creates the cluster when the data folder has none, starts the server, waits for it to
// answer SQL and makes sure the application role and database exist.
func (c *Cluster) Start(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc != nil {
		return nil
	}
	logf, err := os.OpenFile(c.cfg.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open postgres log: %w", err)
	}
	if err := c.prepareDataDir(ctx, logf); err != nil {
		_ = logf.Close()
		return err
	}
	cmd := c.command("postgres",
		"-D", c.cfg.DataDir,
		"-p", strconv.Itoa(c.cfg.Port),
		"-c", "listen_addresses="+loopback.Host,
		"-c", "unix_socket_directories=",
		"-c", "fsync=off",
		"-c", "synchronous_commit=off",
		"-c", "full_page_writes=off",
		"-c", "max_connections=500",
		"-c", "shared_buffers=256MB",
	)
	cmd.Stdout, cmd.Stderr = logf, logf
	proc, err := c.launcher.Start(cmd)
	if err != nil {
		_ = logf.Close()
		return fmt.Errorf("start postgres: %w", err)
	}
	c.proc, c.log = proc, logf
	err = loopback.Poll(ctx, 25*time.Millisecond, proc.Done(), c.CheckHealth)
	if err == nil {
		err = c.bootstrap(ctx)
	}
	if err != nil {
		select {
		case <-proc.Done():
			err = fmt.Errorf("postgres exited (%v): %w", proc.Err(), err)
		default:
		}
		_ = c.stopLocked(ctx)
		return err
	}
	return nil
}

// Stop asks for a fast shutdown (SIGINT), waits for it and for the port to close.
func (c *Cluster) Stop(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stopLocked(ctx)
}

func (c *Cluster) stopLocked(ctx context.Context) error {
	if c.proc == nil {
		return nil
	}
	c.proc.Stop(syscall.SIGINT, stopGrace)
	c.proc = nil
	_ = c.log.Close()
	return loopback.WaitClosed(ctx, c.Addr())
}

// CheckHealth runs SELECT 1 as the superuser.
func (c *Cluster) CheckHealth(ctx context.Context) error {
	conn, err := pgx.Connect(ctx, c.AdminURL())
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	var one int
	return conn.QueryRow(ctx, "SELECT 1").Scan(&one)
}

func (c *Cluster) bootstrap(ctx context.Context) error {
	conn, err := pgx.Connect(ctx, c.AdminURL())
	if err != nil {
		return fmt.Errorf("connect as superuser: %w", err)
	}
	defer conn.Close(context.Background())
	name := pgx.Identifier{c.cfg.AppName}.Sanitize()
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", c.cfg.AppName).Scan(&exists); err != nil {
		return fmt.Errorf("look up role: %w", err)
	}
	if !exists {
		if _, err := conn.Exec(ctx, "CREATE ROLE "+name+" LOGIN CREATEDB NOSUPERUSER"); err != nil {
			return fmt.Errorf("create role: %w", err)
		}
	}
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)", c.cfg.AppName).Scan(&exists); err != nil {
		return fmt.Errorf("look up database: %w", err)
	}
	if !exists {
		if _, err := conn.Exec(ctx, "CREATE DATABASE "+name+" OWNER "+name); err != nil {
			return fmt.Errorf("create database: %w", err)
		}
	}
	return nil
}

// prepareDataDir runs initdb unless the folder already holds a cluster, and makes the folder
// reachable and owned by the cluster's OS user.
func (c *Cluster) prepareDataDir(ctx context.Context, logf *os.File) error {
	dir := c.cfg.DataDir
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create data dir: %w", err)
	}
	if c.cred != nil {
		if err := allowSearch(filepath.Dir(dir)); err != nil {
			return err
		}
		if err := chownTree(dir, int(c.cred.Uid), int(c.cred.Gid)); err != nil {
			return fmt.Errorf("chown data dir: %w", err)
		}
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(dir, "PG_VERSION")); err == nil {
		return nil
	}
	cmd := c.command("initdb", "-D", dir, "--auth=trust", "-U", "postgres", "-E", "UTF8",
		"--locale=C", "--no-sync", "--no-instructions")
	cmd.Stdout, cmd.Stderr = logf, logf
	proc, err := c.launcher.Start(cmd)
	if err != nil {
		return fmt.Errorf("start initdb: %w", err)
	}
	select {
	case <-proc.Done():
	case <-ctx.Done():
		proc.Stop(syscall.SIGTERM, time.Second)
		return fmt.Errorf("initdb: %w", ctx.Err())
	}
	if err := proc.Err(); err != nil {
		return fmt.Errorf("initdb: %w", err)
	}
	return nil
}

func (c *Cluster) command(bin string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(c.cfg.BinDir, bin), args...)
	cmd.Dir = c.cfg.DataDir
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C", "LANG=C"}
	if c.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred}
	}
	return cmd
}

// allowSearch adds the "others may traverse" bit to dir and its ancestors where it is
// missing (t.TempDir and /root are 0700), so that the cluster's OS user can reach its data.
// Search permission alone does not let anyone list those folders.
func allowSearch(dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	for d := abs; ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			return err
		}
		if st.Mode().Perm()&0o001 == 0 {
			if err := os.Chmod(d, st.Mode().Perm()|0o001); err != nil {
				return fmt.Errorf("let postgres reach %s: %w", d, err)
			}
		}
		if d == filepath.Dir(d) {
			return nil
		}
	}
}

func chownTree(root string, uid, gid int) error {
	st, err := os.Stat(root)
	if err != nil {
		return err
	}
	if s, ok := st.Sys().(*syscall.Stat_t); ok && int(s.Uid) == uid {
		// Already ours: only initdb's own files are inside.
		return nil
	}
	return filepath.WalkDir(root, func(path string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(path, uid, gid)
	})
}
