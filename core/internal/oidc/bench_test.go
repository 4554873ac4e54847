package oidc_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"testing"

	"github.com/gpuaas/gpuaas/core/internal/oidc"
	"github.com/gpuaas/gpuaas/core/internal/oidc/oidctest"
)

// The Verify benchmarks measure the hot path: a token of a known key, no network. The
// "signature-only" sub-benchmark is the bare crypto/* verification of one signature,
// the floor Verify cannot go below; the difference is parsing and claim checks.

func BenchmarkVerifyRS256(b *testing.B) {
	benchmarkVerify(b, "RS256")
	b.Run("signature-only", func(b *testing.B) {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			b.Fatal(err)
		}
		digest := sha256.Sum256([]byte("header.payload"))
		sig, err := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, digest[:])
		if err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			d := sha256.Sum256([]byte("header.payload"))
			if err := rsa.VerifyPKCS1v15(&key.PublicKey, crypto.SHA256, d[:], sig); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkVerifyES256(b *testing.B) {
	benchmarkVerify(b, "ES256")
	b.Run("signature-only", func(b *testing.B) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		digest := sha256.Sum256([]byte("header.payload"))
		sig, err := ecdsa.SignASN1(rand.Reader, key, digest[:])
		if err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			d := sha256.Sum256([]byte("header.payload"))
			if !ecdsa.VerifyASN1(&key.PublicKey, d[:], sig) {
				b.Fatal("signature does not verify")
			}
		}
	})
}

func BenchmarkVerifyEdDSA(b *testing.B) {
	benchmarkVerify(b, "EdDSA")
	b.Run("signature-only", func(b *testing.B) {
		pub, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		msg := []byte("header.payload")
		sig := ed25519.Sign(priv, msg)
		b.ReportAllocs()
		for b.Loop() {
			if !ed25519.Verify(pub, msg, sig) {
				b.Fatal("signature does not verify")
			}
		}
	})
}

// benchmarkVerify runs Verify of one valid token of alg: without the verified-token
// cache (every call parses and checks the signature), serially and in parallel, and
// with the cache (every call after the first is a hit).
func benchmarkVerify(b *testing.B, alg string) {
	ctx := context.Background()
	e := setup(b, setupOpts{
		issuer:   []oidctest.Option{oidctest.WithAlgs(alg)},
		config:   func(c *oidc.Config) { c.AllowedAlgs = []string{alg} },
		verifier: []oidc.Option{oidc.WithVerifiedCache(0)},
	})
	cached, err := oidc.NewVerifier(ctx, oidc.Config{
		IssuerURL: e.iss.URL(), Audience: e.iss.Audience(), AllowedAlgs: []string{alg},
		HTTPClient: e.iss.Client(), Now: e.clock.Now,
	})
	if err != nil {
		b.Fatal(err)
	}
	tok := e.iss.Mint()
	run := func(name string, v *oidc.Verifier, parallel bool) {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			if !parallel {
				for b.Loop() {
					if _, err := v.Verify(ctx, tok); err != nil {
						b.Fatal(err)
					}
				}
				return
			}
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := v.Verify(ctx, tok); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
	run("verify", e.v, false)
	run("verify-parallel", e.v, true)
	run("cached", cached, false)
	run("cached-parallel", cached, true)
}
