-- Stock levels and the reservations held against them, on PostgreSQL: the same rules as the
-- SQLite schema (../sqlite/0001_stock_and_reservations.sql), in native types.
--
-- `reserved` is the sum of the quantities of reservations in status `reserved`; it moves only in
-- the same transaction as a reservation's status. `on_hand` is deliberately not checked against
-- `reserved` or zero: an accepted order whose reservation had already expired is still committed
-- (taken from `on_hand`), and losing that order would be worse than showing an oversold level.
-- The CHECK on `reserved` is the last line of defence across replicas: a unit given back twice
-- would fail its statement instead of inflating `available`.
CREATE TABLE stock (
    sku      TEXT PRIMARY KEY,
    on_hand  BIGINT NOT NULL,
    reserved BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0)
);

CREATE TABLE reservations (
    id              UUID PRIMARY KEY,
    sku             TEXT NOT NULL REFERENCES stock (sku),
    -- BIGINT: a quantity is a u32, which INTEGER cannot hold in full.
    qty             BIGINT NOT NULL CHECK (qty > 0),
    order_id        UUID,
    -- The caller's Idempotency-Key: UNIQUE so that replicas racing with one key make one
    -- reservation (the second insert waits for the first and then does nothing).
    idempotency_key TEXT UNIQUE,
    status          TEXT NOT NULL
                    CHECK (status IN ('reserved', 'committed', 'released', 'expired')),
    -- What `remaining` was when the reservation was made, so a replay answers exactly the same.
    remaining_after BIGINT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    expires_at      TIMESTAMPTZ NOT NULL
);

-- The sweeper's query: reservations still held whose time is up. Partial, so the index holds only
-- the few reservations in flight rather than every one ever made.
CREATE INDEX reservations_due ON reservations (expires_at) WHERE status = 'reserved';
