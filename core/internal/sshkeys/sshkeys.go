// Package sshkeys keeps users' SSH public keys: parsed, checked for strength,
// fingerprinted and stored once per user.
package sshkeys

import (
	"context"
	"crypto/ecdsa"
	"crypto/rsa"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/rid"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// Error codes.
const (
	CodeInvalid  errcode.Code = "invalid_ssh_key"
	CodeTooWeak  errcode.Code = "ssh_key_too_weak"
	CodeExists   errcode.Code = "ssh_key_exists"
	CodeNotFound errcode.Code = "ssh_key_not_found"
)

// Codes lists this package's codes for the contract test.
func Codes() []errcode.Code {
	return []errcode.Code{CodeInvalid, CodeTooWeak, CodeExists, CodeNotFound}
}

// MinRSABits is the smallest accepted RSA modulus.
const MinRSABits = 3072

// Key is a stored public key.
type Key struct {
	ID          uuid.UUID
	UserID      uuid.UUID
	Name        string
	Type        string
	Bits        int
	PublicKey   string
	Fingerprint string
	CreatedAt   time.Time
}

// Parse validates one authorized_keys line: a single key of type ed25519, ecdsa
// (nistp256/384/521) or RSA of at least MinRSABits bits, without options. It returns
// the key normalised (type and base64, no comment), its SHA-256 fingerprint, type
// and size.
func Parse(line string) (normalised, fingerprint, typ string, bits int, err error) {
	line = strings.TrimSpace(line)
	if line == "" || len(line) > 16*1024 || strings.ContainsAny(line, "\n\r\x00") {
		return "", "", "", 0, errcode.New(CodeInvalid, "public_key must be one OpenSSH public key line").WithDetails("field", "public_key")
	}
	pk, _, options, rest, perr := ssh.ParseAuthorizedKey([]byte(line))
	if perr != nil || len(rest) > 0 {
		return "", "", "", 0, errcode.New(CodeInvalid, "public_key is not an OpenSSH public key (ssh-ed25519, ecdsa-sha2-*, ssh-rsa)").WithDetails("field", "public_key")
	}
	if len(options) > 0 {
		return "", "", "", 0, errcode.New(CodeInvalid, "public_key must not carry authorized_keys options").WithDetails("field", "public_key")
	}
	ck, ok := pk.(ssh.CryptoPublicKey)
	if !ok {
		return "", "", "", 0, errcode.New(CodeInvalid, "unsupported key type %s", pk.Type()).WithDetails("field", "public_key")
	}
	switch k := ck.CryptoPublicKey().(type) {
	case *rsa.PublicKey:
		bits = k.N.BitLen()
		if bits < MinRSABits {
			return "", "", "", 0, errcode.New(CodeTooWeak, "RSA keys need at least %d bits (this one has %d); ed25519 is recommended", MinRSABits, bits).WithDetails("field", "public_key")
		}
		typ = "rsa"
	case *ecdsa.PublicKey:
		bits, typ = k.Curve.Params().BitSize, "ecdsa"
	default:
		if pk.Type() != ssh.KeyAlgoED25519 {
			return "", "", "", 0, errcode.New(CodeInvalid, "unsupported key type %s", pk.Type()).WithDetails("field", "public_key")
		}
		bits, typ = 256, "ed25519"
	}
	normalised = strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pk)))
	return normalised, ssh.FingerprintSHA256(pk), typ, bits, nil
}

// Service stores keys.
type Service struct {
	pool *pgxpool.Pool
	ids  rid.Builder
}

// NewService returns a Service.
func NewService(pool *pgxpool.Pool, region string) *Service {
	return &Service{pool: pool, ids: rid.Builder{Region: region}}
}

// Add stores a key for user.
func (s *Service) Add(ctx context.Context, user uuid.UUID, name, line string) (*Key, error) {
	if n := strings.TrimSpace(name); n == "" || len(name) > 100 {
		return nil, errcode.New(errcode.ValidationFailed, "name must be 1-100 characters").WithDetails("field", "name")
	}
	norm, fp, typ, bits, err := Parse(line)
	if err != nil {
		return nil, err
	}
	k := &Key{ID: uuid.Must(uuid.NewV7()), UserID: user, Name: name, Type: typ, Bits: bits, PublicKey: norm, Fingerprint: fp}
	err = store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, `INSERT INTO ssh_keys (id, user_id, name, key_type, bits, public_key, fingerprint) VALUES ($1, $2, $3, $4, $5, $6, $7)
			RETURNING created_at`, k.ID, user, name, typ, bits, norm, fp).Scan(&k.CreatedAt)
		if store.IsUniqueViolation(err, "") {
			return errcode.New(CodeExists, "you already added this key (%s)", fp).WithDetails("fingerprint", fp)
		}
		if err != nil {
			return err
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "ssh_key.add", Target: s.ids.InOrg("", "ssh_key", k.ID.String()), Details: map[string]any{"fingerprint": fp, "type": typ}})
	})
	if err != nil {
		return nil, fmt.Errorf("sshkeys: add: %w", err)
	}
	return k, nil
}

const columns = `id, user_id, name, key_type, bits, public_key, fingerprint, created_at`

// List returns a user's keys by id after the cursor, up to limit+1.
func (s *Service) List(ctx context.Context, user, after uuid.UUID, limit int) ([]*Key, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+columns+` FROM ssh_keys WHERE user_id = $1 AND id > $2 ORDER BY id LIMIT $3`, user, after, limit+1)
	if err != nil {
		return nil, fmt.Errorf("sshkeys: list: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Key, error) {
		k := &Key{}
		return k, r.Scan(&k.ID, &k.UserID, &k.Name, &k.Type, &k.Bits, &k.PublicKey, &k.Fingerprint, &k.CreatedAt)
	})
}

// Delete removes one of user's keys; another user's key is not found.
func (s *Service) Delete(ctx context.Context, user, id uuid.UUID) error {
	err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		var fp string
		err := tx.QueryRow(ctx, `DELETE FROM ssh_keys WHERE id = $1 AND user_id = $2 RETURNING fingerprint`, id, user).Scan(&fp)
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(CodeNotFound, "SSH key not found")
		}
		if err != nil {
			return err
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "ssh_key.delete", Target: s.ids.InOrg("", "ssh_key", id.String()), Details: map[string]any{"fingerprint": fp}})
	})
	if err != nil {
		return fmt.Errorf("sshkeys: delete: %w", err)
	}
	return nil
}

// PublicKeys returns the user's keys named by ids (every key of the user when
// ids is empty) as authorized_keys lines. An id that is not one of the user's
// keys is a validation error naming it.
func (s *Service) PublicKeys(ctx context.Context, user uuid.UUID, ids []uuid.UUID) ([]string, error) {
	rows, err := s.pool.Query(ctx, `SELECT id, public_key FROM ssh_keys WHERE user_id = $1 AND (coalesce(cardinality($2::uuid[]), 0) = 0 OR id = ANY($2)) ORDER BY id`, user, ids)
	if err != nil {
		return nil, fmt.Errorf("sshkeys: public keys: %w", err)
	}
	found := map[uuid.UUID]string{}
	var keys []string
	for rows.Next() {
		var id uuid.UUID
		var k string
		if err := rows.Scan(&id, &k); err != nil {
			rows.Close()
			return nil, fmt.Errorf("sshkeys: public keys: %w", err)
		}
		found[id] = k
		keys = append(keys, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("sshkeys: public keys: %w", err)
	}
	for _, id := range ids {
		if _, ok := found[id]; !ok {
			return nil, errcode.New(errcode.ValidationFailed, "ssh key %s is not one of your keys", id).WithDetails("field", "ssh_key_ids")
		}
	}
	return keys, nil
}
