-- The demo catalogue (inventory-service seeds the same SKUs with stock levels).
INSERT INTO prices (sku, name, price_cents, currency) VALUES
    ('BK-12', 'The Rust Book', 3990, 'EUR'),
    ('MG-07', 'Ferris mug', 1250, 'EUR'),
    ('TS-33', 'Crab t-shirt', 1999, 'EUR'),
    ('ST-01', 'Sticker pack', 250, 'EUR'),
    ('HD-44', 'Hoodie', 4900, 'EUR');
