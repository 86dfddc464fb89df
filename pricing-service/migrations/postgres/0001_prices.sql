-- Prices (in cents, see shared::money: BIGINT holds every i64 amount exactly), units sold and
-- the price's version per SKU. The primary key is what `ON CONFLICT (sku)` upserts on.
CREATE TABLE prices (
    sku         TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    currency    TEXT NOT NULL,
    units_sold  BIGINT NOT NULL DEFAULT 0 CHECK (units_sold >= 0),
    version     BIGINT NOT NULL DEFAULT 1 CHECK (version >= 1)
);
