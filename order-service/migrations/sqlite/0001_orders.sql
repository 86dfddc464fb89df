-- Orders, their lines, and the idempotency keys that map client retries to one order.

CREATE TABLE IF NOT EXISTS orders (
    id                TEXT    PRIMARY KEY,            -- UUID, generated before any downstream call
    status            TEXT    NOT NULL CHECK (status IN ('placed', 'cancelled')),
    total_cents       INTEGER NOT NULL CHECK (total_cents >= 0),
    currency          TEXT    NOT NULL,
    priced_from_cache INTEGER NOT NULL CHECK (priced_from_cache IN (0, 1)),
    created_at        TEXT    NOT NULL,               -- RFC 3339, UTC
    cancelled_at      TEXT                            -- RFC 3339, UTC; set once
) STRICT;

CREATE TABLE IF NOT EXISTS order_lines (
    order_id         TEXT    NOT NULL REFERENCES orders (id),
    line_no          INTEGER NOT NULL,                -- position in the request, from 0
    sku              TEXT    NOT NULL,
    qty              INTEGER NOT NULL CHECK (qty > 0),
    unit_price_cents INTEGER NOT NULL CHECK (unit_price_cents >= 0),
    price_source     TEXT    NOT NULL CHECK (price_source IN ('live', 'cache')),
    reservation_id   TEXT    NOT NULL,
    PRIMARY KEY (order_id, line_no)
) STRICT;

-- One row per Idempotency-Key. The row is claimed with INSERT .. ON CONFLICT before any work, so
-- exactly one request owns a key; it names the order that request is building. A failed attempt
-- deletes its row so the client can retry with the same key.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key           TEXT    PRIMARY KEY,
    fingerprint   TEXT    NOT NULL,                   -- SHA-256 of the canonical request body
    order_id      TEXT    NOT NULL,
    claimed_at_ms INTEGER NOT NULL                    -- Unix milliseconds, for stale-claim takeover
) STRICT;
