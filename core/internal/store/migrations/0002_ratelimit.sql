-- Rate-limit windows shared by every core instance (package ratelimit).
--
-- One row per (key, fixed window). count is the number of tokens claimed in the
-- window by any instance: requests already allowed plus tokens an instance has
-- claimed ahead and not yet spent. A claim of n tokens is all or nothing
-- (count + n <= limit_requests), so count never exceeds the limit and no window
-- ever admits more requests than its limit.
--
-- UNLOGGED: the counts are short-lived and rewritten on every claim; skipping the
-- WAL makes claims cheaper. After a Postgres crash or a failover the table is
-- empty, which resets the current windows (the limiter fails open anyway when the
-- store is away). fillfactor leaves room for HOT updates of count.
CREATE UNLOGGED TABLE rate_limit_windows (
    key            text        NOT NULL CHECK (key <> ''),
    window_start   timestamptz NOT NULL,
    window_end     timestamptz NOT NULL CHECK (window_end > window_start),
    count          bigint      NOT NULL CHECK (count >= 0),
    limit_requests bigint      NOT NULL CHECK (limit_requests >= 0),
    PRIMARY KEY (key, window_start, window_end),
    CHECK (count <= limit_requests)
) WITH (fillfactor = 70);

-- The janitor deletes windows that ended a while ago.
CREATE INDEX rate_limit_windows_end ON rate_limit_windows (window_end);
