-- The newest price of each SKU that a `price.changed` event delivered, with its version at
-- pricing: a change is applied only when its version is at least the cached one, so an older
-- event redelivered late (or overtaken on the queue) never overwrites a newer price.

CREATE TABLE IF NOT EXISTS cached_prices (
    sku         TEXT    PRIMARY KEY,
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    currency    TEXT    NOT NULL,
    version     INTEGER NOT NULL CHECK (version >= 0),  -- 0: the publisher sent no version
    changed_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;
