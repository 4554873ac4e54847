package httpapi

import (
	"github.com/gofiber/fiber/v2"

	"github.com/gpuaas/gpuaas/core/internal/catalog"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
)

func skuJSON(s *catalog.SKU) apigen.SKU {
	return apigen.SKU{Id: s.ID, GpuModel: s.GPUModel, GpusPerNode: s.GPUsPerNode, CpuCores: s.CPUCores, MemoryGib: s.MemoryGiB, DiskGib: s.DiskGiB,
		PricePerGpuHourMinor: s.PricePerGPUHourMinor, Currency: s.Currency, Active: s.Active, Description: s.Description}
}

func (a *API) listSKUs(c *fiber.Ctx, all bool, limitP *int, cursor *string) error {
	limit, err := Limit(limitP)
	if err != nil {
		return err
	}
	var after string
	if _, err := DecodeCursor(cursor, &after); err != nil {
		return err
	}
	ss, err := a.Catalog.List(c.UserContext(), all, after, limit)
	if err != nil {
		return err
	}
	items, next := Page(ss, limit, func(s *catalog.SKU) any { return s.ID }, skuJSON)
	return c.JSON(apigen.SKUPage{Items: items, NextCursor: next})
}

// ListSKUs lists the active SKUs (public).
func (a *API) ListSKUs(c *fiber.Ctx, params apigen.ListSKUsParams) error {
	return a.listSKUs(c, false, params.Limit, params.Cursor)
}

// AdminListSKUs lists every SKU.
func (a *API) AdminListSKUs(c *fiber.Ctx, params apigen.AdminListSKUsParams) error {
	if err := a.requireAdmin(c, "sku.read"); err != nil {
		return err
	}
	return a.listSKUs(c, true, params.Limit, params.Cursor)
}

// AdminCreateSKU adds a SKU.
func (a *API) AdminCreateSKU(c *fiber.Ctx, _ apigen.AdminCreateSKUParams) error {
	if err := a.requireAdmin(c, "sku.create"); err != nil {
		return err
	}
	var req apigen.CreateSKURequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	s := catalog.SKU{ID: req.Id, GPUModel: req.GpuModel, GPUsPerNode: req.GpusPerNode, CPUCores: req.CpuCores, MemoryGiB: req.MemoryGib,
		DiskGiB: req.DiskGib, PricePerGPUHourMinor: req.PricePerGpuHourMinor, Currency: req.Currency, Active: true}
	if req.Active != nil {
		s.Active = *req.Active
	}
	if req.Description != nil {
		s.Description = *req.Description
	}
	out, err := a.Catalog.Create(c.UserContext(), s)
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(skuJSON(out))
}

// AdminUpdateSKU changes a SKU.
func (a *API) AdminUpdateSKU(c *fiber.Ctx, id string) error {
	if err := a.requireAdmin(c, "sku.update"); err != nil {
		return err
	}
	var req apigen.UpdateSKURequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	out, err := a.Catalog.Update(c.UserContext(), id, req.PricePerGpuHourMinor, req.Active, req.Description)
	if err != nil {
		return err
	}
	return c.JSON(skuJSON(out))
}
