package httpapi

import (
	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/sshkeys"
)

func sshKeyJSON(k *sshkeys.Key) apigen.SSHKey {
	return apigen.SSHKey{Id: k.ID, Name: k.Name, Type: apigen.SSHKeyType(k.Type), Bits: k.Bits, PublicKey: k.PublicKey,
		Fingerprint: k.Fingerprint, CreatedAt: k.CreatedAt.UTC()}
}

// sshUser is the calling user: service accounts have no SSH keys.
func sshUser(c *fiber.Ctx) (uuid.UUID, error) {
	p, err := caller(c)
	if err != nil {
		return uuid.Nil, err
	}
	if p.Type != principal.User {
		return uuid.Nil, errcode.New(errcode.Forbidden, "service accounts have no SSH keys")
	}
	return p.ID, nil
}

// ListSSHKeys lists the caller's keys.
func (a *API) ListSSHKeys(c *fiber.Ctx, params apigen.ListSSHKeysParams) error {
	user, err := sshUser(c)
	if err != nil {
		return err
	}
	limit, after, err := pageArgs(params.Limit, params.Cursor)
	if err != nil {
		return err
	}
	ks, err := a.SSHKeys.List(c.UserContext(), user, after, limit)
	if err != nil {
		return err
	}
	items, next := Page(ks, limit, func(k *sshkeys.Key) any { return k.ID }, sshKeyJSON)
	return c.JSON(apigen.SSHKeyPage{Items: items, NextCursor: next})
}

// AddSSHKey adds a key for the caller.
func (a *API) AddSSHKey(c *fiber.Ctx, _ apigen.AddSSHKeyParams) error {
	user, err := sshUser(c)
	if err != nil {
		return err
	}
	var req apigen.AddSSHKeyRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	k, err := a.SSHKeys.Add(c.UserContext(), user, req.Name, req.PublicKey)
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(sshKeyJSON(k))
}

// DeleteSSHKey removes one of the caller's keys.
func (a *API) DeleteSSHKey(c *fiber.Ctx, keyID apigen.KeyID) error {
	user, err := sshUser(c)
	if err != nil {
		return err
	}
	if err := a.SSHKeys.Delete(c.UserContext(), user, keyID); err != nil {
		return err
	}
	return c.SendStatus(fiber.StatusNoContent)
}
