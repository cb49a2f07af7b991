-- A company's capture method: 'automatic' (charged at checkout) or 'manual' (authorized at
-- checkout, captured by the shipments). NULL: its checkouts follow the shop's
-- --capture-method. Read once when a buyer's checkout starts and kept with the checkout.
ALTER TABLE companies ADD COLUMN capture_method TEXT
    CHECK (capture_method IS NULL OR capture_method IN ('automatic', 'manual'));
