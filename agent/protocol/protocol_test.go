package protocol

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"testing"
	"time"
)

func TestVerify(t *testing.T) {
	pub1, priv1, _ := ed25519.GenerateKey(rand.Reader)
	pub2, priv2, _ := ed25519.GenerateKey(rand.Reader)
	now := time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)
	task := func(mut func(*Task)) Task {
		tk := Task{ID: "t1", NodeID: "n1", Type: TaskRevokeUser, Params: json.RawMessage(`{"username":"alice","allocation_id":"a1"}`),
			ExpiresAt: now.Add(10 * time.Minute), Nonce: "nonce-1", KeyVersion: 1}
		if mut != nil {
			mut(&tk)
		}
		return tk
	}
	newVerifier := func() *Verifier {
		return &Verifier{NodeID: "n1", Keys: map[int]ed25519.PublicKey{1: pub1, 2: pub2}, Now: func() time.Time { return now }, Nonces: &NonceCache{}}
	}
	sign := func(tk Task, key ed25519.PrivateKey) SignedTask {
		st, err := Sign(tk, key)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}

	v := newVerifier()
	good := sign(task(nil), priv1)
	if err := v.Verify(good); err != nil {
		t.Fatalf("good task: %v", err)
	}
	if err := v.Verify(good); !errors.Is(err, ErrReplay) {
		t.Fatalf("replayed task: %v; want ErrReplay", err)
	}
	// The same parameters with keys in another order sign the same bytes.
	reordered := good
	reordered.Task.Params = json.RawMessage(`{ "allocation_id": "a1", "username": "alice" }`)
	reordered.Task.Nonce = "nonce-x"
	reordered.Signature = sign(task(func(tk *Task) { tk.Nonce = "nonce-x" }), priv1).Signature
	if err := newVerifier().Verify(reordered); err != nil {
		t.Fatalf("reordered params: %v", err)
	}

	cases := map[string]struct {
		st   SignedTask
		want error
	}{
		"tampered params": {func() SignedTask {
			st := sign(task(nil), priv1)
			st.Task.Params = json.RawMessage(`{"username":"root","allocation_id":"a1"}`)
			return st
		}(), ErrBadSignature},
		"tampered type": {func() SignedTask {
			st := sign(task(nil), priv1)
			st.Task.Type = TaskWipe
			return st
		}(), ErrBadSignature},
		"other key claims version 1": {sign(task(nil), priv2), ErrBadSignature},
		"version 2":                  {sign(task(func(tk *Task) { tk.KeyVersion = 2 }), priv2), nil},
		"unknown version":            {sign(task(func(tk *Task) { tk.KeyVersion = 3 }), priv1), ErrUnknownKey},
		"retired version":            {sign(task(nil), priv1), ErrKeyRetired}, // with MinKeyVersion 2 below
		"other node":                 {sign(task(func(tk *Task) { tk.NodeID = "n2" }), priv1), ErrWrongNode},
		"expired":                    {sign(task(func(tk *Task) { tk.ExpiresAt = now }), priv1), ErrExpired},
		"too long":                   {sign(task(func(tk *Task) { tk.ExpiresAt = now.Add(2 * time.Hour) }), priv1), ErrTooLong},
		"unknown type":               {sign(task(func(tk *Task) { tk.Type = "shell.exec" }), priv1), ErrUnknownType},
		"no nonce":                   {sign(task(func(tk *Task) { tk.Nonce = "" }), priv1), ErrReplay},
	}
	for name, c := range cases {
		v := newVerifier()
		if name == "retired version" {
			v.MinKeyVersion = 2
		}
		err := v.Verify(c.st)
		if (c.want == nil && err != nil) || (c.want != nil && !errors.Is(err, c.want)) {
			t.Errorf("%s: %v; want %v", name, err, c.want)
		}
	}
}

func TestNonceCacheForgetsExpired(t *testing.T) {
	c := &NonceCache{}
	now := time.Now()
	if !c.Use("a", now.Add(time.Minute), now) || c.Use("a", now.Add(time.Minute), now) {
		t.Fatal("a nonce was accepted twice")
	}
	if !c.Use("b", now.Add(2*time.Minute), now.Add(90*time.Second)) || len(c.seen) != 1 {
		t.Fatalf("expired nonces kept: %v", c.seen)
	}
}

func TestCanonicalSeparatesFields(t *testing.T) {
	a, _ := Canonical(Task{ID: "ab", NodeID: "c", Params: json.RawMessage(`{}`)})
	b, _ := Canonical(Task{ID: "a", NodeID: "bc", Params: json.RawMessage(`{}`)})
	if string(a) == string(b) {
		t.Fatal("fields bleed into each other")
	}
	if _, err := Canonical(Task{Params: json.RawMessage(`{"a":1} {"b":2}`)}); err == nil {
		t.Fatal("trailing params accepted")
	}
}
