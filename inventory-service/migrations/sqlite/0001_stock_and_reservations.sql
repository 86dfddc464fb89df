-- Stock levels and the reservations held against them.
--
-- `reserved` is the sum of the quantities of reservations in status `reserved`; it moves only in
-- the same transaction as a reservation's status. `on_hand` is deliberately not checked against
-- `reserved` or zero: an accepted order whose reservation had already expired is still committed
-- (taken from `on_hand`), and losing that order would be worse than showing an oversold level.
CREATE TABLE stock (
    sku      TEXT PRIMARY KEY NOT NULL,
    on_hand  INTEGER NOT NULL,
    reserved INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0)
) STRICT;

CREATE TABLE reservations (
    id              TEXT PRIMARY KEY NOT NULL,
    sku             TEXT NOT NULL REFERENCES stock (sku),
    qty             INTEGER NOT NULL CHECK (qty > 0),
    order_id        TEXT,
    -- The caller's Idempotency-Key: UNIQUE so that a replay can never reserve twice, even if the
    -- write lock were ever bypassed.
    idempotency_key TEXT UNIQUE,
    status          TEXT NOT NULL
                    CHECK (status IN ('reserved', 'committed', 'released', 'expired')),
    -- What `remaining` was when the reservation was made, so a replay answers exactly the same.
    remaining_after INTEGER NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    expires_at_ms   INTEGER NOT NULL
) STRICT;

-- The sweeper's query: reservations still held whose time is up.
CREATE INDEX reservations_due ON reservations (status, expires_at_ms);
