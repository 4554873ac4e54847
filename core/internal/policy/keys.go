package policy

import "time"

// The platform's keys. Domains add theirs here so Catalog lists every key.
var (
	OutboxMaxAttempts = Int("outbox.max_attempts", 10, 1, 1000,
		"Message-specific publish failures an outbox row may have before it is marked failed.")
	OutboxRetention = Duration("outbox.retention", 24*time.Hour, time.Minute, 90*24*time.Hour,
		"How long published outbox rows and consumer inbox entries are kept.")

	SessionTTL = Duration("auth.session_ttl", time.Hour, time.Minute, 24*time.Hour,
		"Lifetime of a local session's access token.")
	RefreshTTL = Duration("auth.refresh_ttl", 30*24*time.Hour, time.Hour, 365*24*time.Hour,
		"Lifetime of a local session's refresh token (sign in again after it).")
	OIDCLoginTTL = Duration("auth.oidc_login_ttl", 10*time.Minute, time.Minute, time.Hour,
		"How long a browser has to finish an OIDC sign-in it started.")

	RateLimitPerPrincipal = Int("ratelimit.requests_per_minute", 1200, 1, 1_000_000,
		"API requests per minute for one authenticated principal.", ScopeGlobal, ScopeOrg, ScopeProject)
	RateLimitPerIP = Int("ratelimit.anonymous_requests_per_minute", 300, 1, 1_000_000,
		"API requests per minute from one IP address before authentication.")

	BillingWindow = Duration("billing.window", time.Minute, 10*time.Second, time.Hour,
		"How often usage is accrued into the ledger.")
	LowBalanceThreshold = Money("billing.low_balance_threshold_minor", 1000, 0, 1<<40,
		"Balance (minor units) below which the org is warned, once per crossing.", ScopeGlobal, ScopeOrg)
	DepletionGrace = Duration("billing.depletion_grace", 10*time.Minute, 0, 7*24*time.Hour,
		"How long allocations keep running after the balance reaches zero before they are released.", ScopeGlobal, ScopeOrg)
	TopUpMin = Money("billing.topup_min_minor", 500, 1, 1<<40,
		"Smallest top-up (minor units).", ScopeGlobal, ScopeOrg)
	TopUpMax = Money("billing.topup_max_minor", 1_000_000, 1, 1<<40,
		"Largest top-up (minor units).", ScopeGlobal, ScopeOrg)
	DefaultCurrency = String("billing.default_currency", "USD", []string{"USD", "EUR", "GBP", "CHF", "JPY", "CAD", "AUD", "SGD", "INR"},
		"Currency of a new org's billing account.")
	RefundWindow = Duration("billing.refund_window", 30*24*time.Hour, 0, 365*24*time.Hour,
		"How long after payment a top-up may be refunded.", ScopeGlobal, ScopeOrg)

	AllocMaxPerProject = Int("allocations.max_per_project", 8, 0, 100_000,
		"Live allocations one project may hold at once.", ScopeGlobal, ScopeOrg, ScopeProject)
	AllocMaxGPUsPerProject = Int("allocations.max_gpus_per_project", 64, 0, 10_000_000,
		"GPUs one project's live allocations may hold at once.", ScopeGlobal, ScopeOrg, ScopeProject)
	AllocMaxPerOrg = Int("allocations.max_per_org", 32, 0, 1_000_000,
		"Live allocations one organization may hold at once.", ScopeGlobal, ScopeOrg)
	AllocMaxGPUsPerOrg = Int("allocations.max_gpus_per_org", 256, 0, 100_000_000,
		"GPUs one organization's live allocations may hold at once.", ScopeGlobal, ScopeOrg)
	AllocMaxPerRequest = Int("allocations.max_per_request", 8, 1, 64,
		"Nodes one create request may ask for.")
	ProvisionTimeout = Duration("provisioning.timeout", 30*time.Minute, time.Second, 24*time.Hour,
		"How long a node may take to be handed over before the allocation fails.")
	ReleaseTimeout = Duration("provisioning.release_timeout", time.Hour, time.Second, 24*time.Hour,
		"How long a release (revoke, wipe or reimage) may take before it fails.")
	ProvisionPollInterval = Duration("provisioning.poll_interval", 2*time.Second, 10*time.Millisecond, time.Minute,
		"Longest pause between two progress checks of a driver operation (checks start fast and slow down to it).")
	ProvisionHeartbeat = Duration("provisioning.heartbeat_timeout", 30*time.Second, time.Second, 10*time.Minute,
		"A worker that stops reporting progress for this long loses the operation to another worker.")
	ProvisionMaxAttempts = Int("provisioning.max_attempts", 10, 1, 1000,
		"Attempts of a driver call that fails with a transient error before the operation fails.")
	ReconcileInterval = Duration("provisioning.reconcile_interval", time.Minute, time.Second, time.Hour,
		"How often stranded allocations (no running workflow) are looked for and resumed.")
	StrandedAfter = Duration("provisioning.stranded_after", 2*time.Minute, time.Second, 24*time.Hour,
		"How long an allocation may sit in requested, provisioning or releasing before the reconciler checks its workflow.")
	InventorySyncInterval = Duration("inventory.sync_interval", 5*time.Minute, time.Second, 24*time.Hour,
		"How often each provisioner backend that can list its nodes is polled to catch lost webhooks.")

	EnrollmentTokenTTL = Duration("agents.enrollment_token_ttl", time.Hour, time.Minute, 7*24*time.Hour,
		"How long a node agent's single-use enrollment token is valid.")
	TaskKeyMinVersion = Int("agents.min_task_key_version", 0, 0, 1<<20,
		"Task signing key versions below this are retired: agents no longer get their public keys and refuse tasks signed with them (raise it after rotating the key).")

	IdempotencyTTL = Duration("idempotency.ttl", 24*time.Hour, time.Minute, 30*24*time.Hour,
		"How long an Idempotency-Key is remembered.")

	StorageQuota = Int("storage.quota_bytes", 100<<30, 0, 1<<50,
		"Bytes one project may keep in project storage (objects plus uploads in flight).", ScopeGlobal, ScopeOrg, ScopeProject)
	StorageMaxUpload = Int("storage.max_upload_bytes", 1<<40, 1, 5<<40,
		"Largest single upload, also the cap on an upload of unknown length (chunked).", ScopeGlobal, ScopeOrg, ScopeProject)
	StoragePrice = Money("storage.price_per_gb_month_minor", 0, 0, 1<<40,
		"Price of storing one GiB for 30 days (minor units); 0 meters nothing.", ScopeGlobal, ScopeOrg)
	StorageMeterWindow = Duration("storage.metering_window", time.Hour, time.Minute, 24*time.Hour,
		"How often stored bytes are billed (one ledger debit per project and window).")
	StoragePresignExpiry = Duration("storage.presign_expiry", 15*time.Minute, time.Minute, time.Hour,
		"Lifetime of presigned download and upload URLs; an upload not confirmed by then is removed.", ScopeGlobal, ScopeOrg)

	TerminalIdleTimeout = Duration("terminal.idle_timeout", 30*time.Minute, time.Second, 24*time.Hour,
		"A browser terminal session with no input and no output for this long is closed.", ScopeGlobal, ScopeOrg, ScopeProject)
	TerminalKeepalive = Duration("terminal.keepalive_interval", 20*time.Second, time.Second, 10*time.Minute,
		"How often a terminal session pings the browser and the node's sshd; a side silent for three intervals ends the session.")
	TerminalMaxSessionsPerUser = Int("terminal.max_sessions_per_user", 5, 1, 1000,
		"Browser terminal sessions one user or service account may have open at once (across every core and gateway).", ScopeGlobal, ScopeOrg)
	TerminalCertTTL = Duration("terminal.cert_ttl", 2*time.Minute, 30*time.Second, time.Hour,
		"Lifetime of the ephemeral SSH certificate a terminal session logs in with (sshd checks it only at login).")
	TerminalMaxFrameBytes = Int("terminal.max_frame_bytes", 64<<10, 1<<10, 16<<20,
		"Largest WebSocket message a terminal client may send; a larger one closes the session with 1009.")
)

// Catalog returns every key.
func Catalog() []*Def {
	return []*Def{
		BillingWindow.Def(),
		LowBalanceThreshold.Def(),
		DepletionGrace.Def(),
		TopUpMin.Def(),
		TopUpMax.Def(),
		DefaultCurrency.Def(),
		RefundWindow.Def(),
		SessionTTL.Def(),
		RefreshTTL.Def(),
		OIDCLoginTTL.Def(),
		IdempotencyTTL.Def(),
		EnrollmentTokenTTL.Def(),
		TaskKeyMinVersion.Def(),
		AllocMaxPerProject.Def(),
		AllocMaxGPUsPerProject.Def(),
		AllocMaxPerOrg.Def(),
		AllocMaxGPUsPerOrg.Def(),
		AllocMaxPerRequest.Def(),
		ProvisionTimeout.Def(),
		ReleaseTimeout.Def(),
		ProvisionPollInterval.Def(),
		ProvisionHeartbeat.Def(),
		ProvisionMaxAttempts.Def(),
		ReconcileInterval.Def(),
		StrandedAfter.Def(),
		InventorySyncInterval.Def(),
		OutboxMaxAttempts.Def(),
		OutboxRetention.Def(),
		RateLimitPerIP.Def(),
		RateLimitPerPrincipal.Def(),
		StorageQuota.Def(),
		StorageMaxUpload.Def(),
		StoragePrice.Def(),
		StorageMeterWindow.Def(),
		StoragePresignExpiry.Def(),
		TerminalIdleTimeout.Def(),
		TerminalKeepalive.Def(),
		TerminalMaxSessionsPerUser.Def(),
		TerminalCertTTL.Def(),
		TerminalMaxFrameBytes.Def(),
	}
}
