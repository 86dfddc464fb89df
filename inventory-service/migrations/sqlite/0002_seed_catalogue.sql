-- The demo catalogue (pricing-service seeds the same SKUs with names and prices).
INSERT INTO stock (sku, on_hand, reserved) VALUES
    ('BK-12', 100, 0),
    ('MG-07', 50, 0),
    ('TS-33', 25, 0),
    ('ST-01', 500, 0),
    ('HD-44', 3, 0);
