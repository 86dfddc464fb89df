-- Each change of a SKU's price takes the next version; prices stored before versions start at 1.
ALTER TABLE prices ADD COLUMN version INTEGER NOT NULL DEFAULT 1 CHECK (version >= 1);
