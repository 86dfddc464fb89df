-- Whole-order reservations (`POST /reserve` with `items`) made under an Idempotency-Key: one row
-- per key. Each line's reservation keeps its own key (`<key>:<sku>`, what a one-line call for the
-- same order uses); this row is what makes the *request* unique, so a second request with the key
-- but other SKUs inserts nothing and is refused instead of reserving beside the first, and a
-- replay knows how many lines the first request had.
CREATE TABLE order_reservations (
    idempotency_key TEXT PRIMARY KEY NOT NULL,
    order_id        TEXT NOT NULL,
    lines           INTEGER NOT NULL CHECK (lines > 0),
    created_at_ms   INTEGER NOT NULL
) STRICT;
