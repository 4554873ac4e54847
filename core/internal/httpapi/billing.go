package httpapi

import (
	"bufio"
	"context"
	"encoding/csv"
	"net/url"
	"strconv"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/core/internal/authz"
	"github.com/gpuaas/gpuaas/core/internal/billing"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/ledger"
	"github.com/gpuaas/gpuaas/core/internal/payments"
	"github.com/gpuaas/gpuaas/core/internal/policy"
)

// GetBalance returns an org's balance.
func (a *API) GetBalance(c *fiber.Ctx, params apigen.GetBalanceParams) error {
	if _, err := a.allowOrg(c, params.OrgId, authz.BillingRead); err != nil {
		return err
	}
	ctx := c.UserContext()
	b, err := ledger.GetBalance(ctx, a.Pool, params.OrgId)
	if errcode.Of(err) == ledger.CodeAccountNotFound {
		cur, _ := policy.DefaultCurrency.Get(ctx, a.Policy, policy.Target{})
		b, err = ledger.Balance{OrgID: params.OrgId, Currency: cur}, nil
	}
	if err != nil {
		return err
	}
	threshold, err := policy.LowBalanceThreshold.Get(ctx, a.Policy, policy.Target{OrgID: params.OrgId.String()})
	if err != nil {
		return err
	}
	out := apigen.Balance{OrgId: params.OrgId, Currency: b.Currency, BalanceMinor: b.AmountMinor, AsOfEntryId: b.AsOfEntry, LowBalanceThresholdMinor: threshold}
	var since *time.Time
	_ = a.Pool.QueryRow(ctx, `SELECT depleted_since FROM billing_accounts WHERE org_id = $1`, params.OrgId).Scan(&since)
	out.DepletedSince = utcPtr(since)
	return c.JSON(out)
}

func ledgerJSON(e ledger.Entry) apigen.LedgerEntry {
	j := apigen.LedgerEntry{Id: e.ID, OrgId: e.OrgID, Currency: e.Currency, AmountMinor: e.AmountMinor, EntryType: apigen.LedgerEntryEntryType(e.Type),
		Reference: e.Reference, Description: e.Description, CreatedAt: e.CreatedAt.UTC(), CreatedBy: e.CreatedBy}
	if e.CorrelationID != "" {
		j.CorrelationId = &e.CorrelationID
	}
	return j
}

// ListLedger pages an org's ledger, newest first.
func (a *API) ListLedger(c *fiber.Ctx, params apigen.ListLedgerParams) error {
	if _, err := a.allowOrg(c, params.OrgId, authz.BillingRead); err != nil {
		return err
	}
	limit, err := Limit(params.Limit)
	if err != nil {
		return err
	}
	var before int64
	if _, err := DecodeCursor(params.Cursor, &before); err != nil {
		return err
	}
	es, err := ledger.List(c.UserContext(), a.Pool, params.OrgId, before, limit)
	if err != nil {
		return err
	}
	items, next := Page(es, limit, func(e ledger.Entry) any { return e.ID }, ledgerJSON)
	return c.JSON(apigen.LedgerPage{Items: items, NextCursor: next})
}

func usageFilter(org uuid.UUID, project *uuid.UUID, from, to *time.Time) (billing.UsageFilter, error) {
	f := billing.UsageFilter{OrgID: org}
	if project != nil {
		f.ProjectID = *project
	}
	if from != nil {
		f.From = *from
	}
	if to != nil {
		f.To = *to
	}
	if !f.From.IsZero() && !f.To.IsZero() && !f.From.Before(f.To) {
		return f, errcode.New(errcode.ValidationFailed, "from must be before to").WithDetails("field", "from")
	}
	return f, nil
}

func usageJSON(u billing.Usage) apigen.Usage {
	return apigen.Usage{Id: u.ID, OrgId: u.OrgID, ProjectId: u.ProjectID, AllocationId: u.AllocationID, Sku: u.SKU, Gpus: u.GPUs,
		PricePerGpuHourMinor: u.PricePerGPUHourMinor, Currency: u.Currency, StartedAt: u.StartedAt.UTC(), EndedAt: utcPtr(u.EndedAt),
		BilledUntil: u.BilledUntil.UTC(), BilledMinor: u.BilledMinor}
}

// ListUsage pages an org's usage records.
func (a *API) ListUsage(c *fiber.Ctx, params apigen.ListUsageParams) error {
	if _, err := a.allowOrg(c, params.OrgId, authz.BillingRead); err != nil {
		return err
	}
	limit, before, err := pageArgs(params.Limit, params.Cursor)
	if err != nil {
		return err
	}
	f, err := usageFilter(params.OrgId, params.ProjectId, params.From, params.To)
	if err != nil {
		return err
	}
	f.Before, f.Limit = before, limit
	us, err := billing.ListUsage(c.UserContext(), a.Pool, f)
	if err != nil {
		return err
	}
	items, next := Page(us, limit, func(u billing.Usage) any { return u.ID }, usageJSON)
	return c.JSON(apigen.UsagePage{Items: items, NextCursor: next})
}

// ExportUsage streams usage records as CSV.
func (a *API) ExportUsage(c *fiber.Ctx, params apigen.ExportUsageParams) error {
	if _, err := a.allowOrg(c, params.OrgId, authz.BillingRead); err != nil {
		return err
	}
	f, err := usageFilter(params.OrgId, params.ProjectId, params.From, params.To)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(c.UserContext()), 30*time.Minute)
	c.Set(fiber.HeaderContentType, "text/csv; charset=utf-8")
	c.Set(fiber.HeaderContentDisposition, `attachment; filename="usage.csv"`)
	log := a.Log
	c.Context().SetBodyStreamWriter(func(w *bufio.Writer) {
		defer cancel()
		cw := csv.NewWriter(w)
		_ = cw.Write([]string{"id", "project_id", "allocation_id", "sku", "gpus", "price_per_gpu_hour_minor", "currency", "started_at", "ended_at", "billed_until", "billed_minor"})
		n := 0
		err := billing.EachUsage(ctx, a.Pool, f, func(u billing.Usage) error {
			ended := ""
			if u.EndedAt != nil {
				ended = u.EndedAt.UTC().Format(time.RFC3339)
			}
			if err := cw.Write([]string{u.ID.String(), u.ProjectID.String(), u.AllocationID.String(), u.SKU, strconv.Itoa(u.GPUs),
				strconv.FormatInt(u.PricePerGPUHourMinor, 10), u.Currency, u.StartedAt.UTC().Format(time.RFC3339), ended,
				u.BilledUntil.UTC().Format(time.RFC3339), strconv.FormatInt(u.BilledMinor, 10)}); err != nil {
				return err
			}
			if n++; n%500 == 0 {
				cw.Flush()
				return cw.Error()
			}
			return nil
		})
		cw.Flush()
		if err != nil && log != nil {
			log.Warn("usage export ended early", "error", err)
		}
	})
	return nil
}

func sessionJSON(s *payments.Session) apigen.PaymentSession {
	j := apigen.PaymentSession{Id: s.ID, OrgId: s.OrgID, AmountMinor: s.AmountMinor, Currency: s.Currency, Status: apigen.PaymentSessionStatus(s.Status),
		CheckoutUrl: s.CheckoutURL, CreatedAt: s.CreatedAt.UTC(), ExpiresAt: utcPtr(s.ExpiresAt)}
	j.StatusReason, j.RefundedMinor, j.ProviderInstance = &s.StatusReason, &s.RefundedMinor, &s.ProviderInstance
	return j
}

// CreateCheckoutSession starts a top-up.
func (a *API) CreateCheckoutSession(c *fiber.Ctx, _ apigen.CreateCheckoutSessionParams) error {
	var req apigen.CheckoutRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	if _, err := a.allowOrg(c, req.OrgId, authz.BillingManage); err != nil {
		return err
	}
	if err := validURL("success_url", req.SuccessUrl); err != nil {
		return err
	}
	if err := validURL("cancel_url", req.CancelUrl); err != nil {
		return err
	}
	s, err := a.Payments.CreateCheckout(c.UserContext(), payments.CheckoutRequest{OrgID: req.OrgId, AmountMinor: req.AmountMinor, SuccessURL: req.SuccessUrl, CancelURL: req.CancelUrl})
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(sessionJSON(s))
}

// CreatePortalSession opens the provider's customer portal.
func (a *API) CreatePortalSession(c *fiber.Ctx) error {
	var req apigen.PortalRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	if _, err := a.allowOrg(c, req.OrgId, authz.BillingManage); err != nil {
		return err
	}
	if err := validURL("return_url", req.ReturnUrl); err != nil {
		return err
	}
	url, err := a.Payments.Portal(c.UserContext(), req.OrgId, req.ReturnUrl)
	if err != nil {
		return err
	}
	return c.JSON(apigen.PortalSession{Url: url})
}

// PaymentsWebhook hands the raw request to the instance's driver.
func (a *API) PaymentsWebhook(c *fiber.Ctx, instance string) error {
	header := map[string][]string{}
	c.Request().Header.VisitAll(func(k, v []byte) { header[string(k)] = append(header[string(k)], string(v)) })
	body := append([]byte(nil), c.Body()...)
	res, err := a.Payments.HandleWebhook(c.UserContext(), instance, body, header)
	if err != nil {
		return err
	}
	return c.JSON(apigen.WebhookReceipt{Events: res.Events, Duplicates: res.Duplicates, Credited: res.Credited})
}

// AdminListPaymentSessions lists sessions by status.
func (a *API) AdminListPaymentSessions(c *fiber.Ctx, params apigen.AdminListPaymentSessionsParams) error {
	if err := a.requireAdmin(c, "payment.read"); err != nil {
		return err
	}
	limit, before, err := pageArgs(params.Limit, params.Cursor)
	if err != nil {
		return err
	}
	f := payments.ListFilter{Before: before, Limit: limit}
	if params.Status != nil {
		f.Statuses = []string{string(*params.Status)}
	}
	if params.OrgId != nil {
		f.OrgID = *params.OrgId
	}
	ss, err := a.Payments.List(c.UserContext(), f)
	if err != nil {
		return err
	}
	items, next := Page(ss, limit, func(s *payments.Session) any { return s.ID }, sessionJSON)
	return c.JSON(apigen.PaymentSessionPage{Items: items, NextCursor: next})
}

// AdminRefundPayment refunds a credited top-up.
func (a *API) AdminRefundPayment(c *fiber.Ctx, sessionID uuid.UUID, params apigen.AdminRefundPaymentParams) error {
	if err := a.requireAdmin(c, "payment.refund"); err != nil {
		return err
	}
	var req apigen.RefundRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	op := ""
	if params.IdempotencyKey != nil {
		op = "idem:" + PrincipalOf(c).Actor() + ":" + *params.IdempotencyKey
	}
	r, err := a.Payments.Refund(c.UserContext(), payments.RefundRequest{SessionID: sessionID, AmountMinor: req.AmountMinor, Reason: req.Reason, OperationID: op})
	if err != nil {
		return err
	}
	return c.JSON(apigen.RefundResult{Session: sessionJSON(r.Session), LedgerEntryId: r.EntryID, RefundId: r.RefundID, Status: r.Status})
}

// AdminAdjustBalance posts an admin adjustment or promotional credit.
func (a *API) AdminAdjustBalance(c *fiber.Ctx, params apigen.AdminAdjustBalanceParams) error {
	if err := a.requireAdmin(c, "billing.adjust"); err != nil {
		return err
	}
	var req apigen.AdjustmentRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	op := ""
	if params.IdempotencyKey != nil {
		op = "idem:" + PrincipalOf(c).Actor() + ":" + *params.IdempotencyKey
	}
	e, err := a.Payments.Adjust(c.UserContext(), payments.AdjustRequest{OrgID: req.OrgId, AmountMinor: req.AmountMinor, Type: string(req.Type), Reason: req.Reason, OperationID: op})
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(ledgerJSON(e))
}

// validURL accepts absolute http(s) URLs only (they are shown to payers).
func validURL(field, v string) error {
	u, err := url.Parse(v)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return errcode.New(errcode.ValidationFailed, "%s must be an absolute http(s) URL", field).WithDetails("field", field)
	}
	return nil
}
