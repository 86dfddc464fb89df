-- Orders, their lines, and the idempotency keys that map client retries to one order: the
-- SQLite schema in PostgreSQL's native types. Several replicas share these tables; what keeps
-- them correct together is the primary keys below and the conditional statements of the store.

CREATE TABLE IF NOT EXISTS orders (
    id                UUID        PRIMARY KEY,        -- generated before any downstream call
    status            TEXT        NOT NULL CHECK (status IN ('placed', 'cancelled')),
    total_cents       BIGINT      NOT NULL CHECK (total_cents >= 0),
    currency          TEXT        NOT NULL,
    priced_from_cache BOOLEAN     NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL,
    cancelled_at      TIMESTAMPTZ                     -- set once
);

CREATE TABLE IF NOT EXISTS order_lines (
    order_id         UUID    NOT NULL REFERENCES orders (id),
    line_no          INTEGER NOT NULL,                -- position in the request, from 0
    sku              TEXT    NOT NULL,
    qty              BIGINT  NOT NULL CHECK (qty > 0),
    unit_price_cents BIGINT  NOT NULL CHECK (unit_price_cents >= 0),
    price_source     TEXT    NOT NULL CHECK (price_source IN ('live', 'cache')),
    reservation_id   UUID    NOT NULL,
    PRIMARY KEY (order_id, line_no)
);

-- One row per Idempotency-Key. The row is claimed with INSERT .. ON CONFLICT before any work, so
-- exactly one request of all replicas owns a key; it names the order that request is building.
-- A failed attempt deletes its row so the client can retry with the same key.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key         TEXT        PRIMARY KEY,
    fingerprint TEXT        NOT NULL,                 -- SHA-256 of the canonical request body
    order_id    UUID        NOT NULL,
    claimed_at  TIMESTAMPTZ NOT NULL                  -- for stale-claim takeover
);
