-- Prices (in cents, see shared::money) and units sold per SKU.
CREATE TABLE prices (
    sku         TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    currency    TEXT NOT NULL,
    units_sold  INTEGER NOT NULL DEFAULT 0 CHECK (units_sold >= 0)
) STRICT;
