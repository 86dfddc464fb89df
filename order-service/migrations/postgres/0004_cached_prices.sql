-- The newest price of each SKU that a `price.changed` event delivered, with its version at
-- pricing: a change is applied only when its version is at least the cached one, so an older
-- event redelivered late, or handled by another replica after a newer one, never overwrites a
-- newer price.

CREATE TABLE IF NOT EXISTS cached_prices (
    sku         TEXT        PRIMARY KEY,
    price_cents BIGINT      NOT NULL CHECK (price_cents >= 0),
    currency    TEXT        NOT NULL,
    version     BIGINT      NOT NULL CHECK (version >= 0),  -- 0: the publisher sent no version
    changed_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
