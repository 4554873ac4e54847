package httpapi

import (
	"github.com/gofiber/fiber/v2"

	"github.com/gpuaas/gpuaas/core/internal/authz"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/terminal"
)

// CreateTerminalToken mints a single-use token for a browser terminal on an
// active allocation the caller may write to.
func (a *API) CreateTerminalToken(c *fiber.Ctx, id apigen.AllocationID) error {
	if a.Terminal == nil {
		return errcode.New(errcode.ServiceUnavailable, "the browser terminal is not configured")
	}
	if _, _, err := a.allowAllocation(c, id, authz.ResourceWrite); err != nil {
		return err
	}
	tok, err := a.Terminal.Mint(c.UserContext(), id)
	if err != nil {
		return err
	}
	c.Set(fiber.HeaderCacheControl, "no-store")
	return c.Status(fiber.StatusCreated).JSON(apigen.TerminalToken{Token: tok.Value, ExpiresAt: tok.ExpiresAt,
		WebsocketPath: terminal.Path(id), Subprotocol: terminal.Subprotocol})
}
