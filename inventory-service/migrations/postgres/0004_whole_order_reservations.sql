-- Whole-order reservations (`POST /reserve` with `items`) made under an Idempotency-Key, as in
-- ../sqlite/0004_whole_order_reservations.sql: one row per key. Each line's reservation keeps its
-- own key (`<key>:<sku>`); this row makes the *request* unique, so two replicas racing with one
-- key (or a replay with other SKUs) cannot both reserve: the second insert waits for the first
-- transaction and then inserts nothing.
CREATE TABLE order_reservations (
    idempotency_key TEXT PRIMARY KEY,
    order_id        UUID NOT NULL,
    lines           INTEGER NOT NULL CHECK (lines > 0),
    created_at      TIMESTAMPTZ NOT NULL
);
