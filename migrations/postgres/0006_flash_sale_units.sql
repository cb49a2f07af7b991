-- Flash sales counted in units (DESIGN §5): a sale has a per-buyer limit, and a sale checkout
-- records how many units of the sale's SKU it holds, so the gate can be rebuilt from the
-- database (holders, units sold, what each buyer bought) and a refund gives exactly those
-- units back to the sale.
ALTER TABLE flash_sales ADD COLUMN max_per_buyer BIGINT NOT NULL DEFAULT 1
    CHECK (max_per_buyer > 0);
ALTER TABLE checkouts ADD COLUMN flash_sale_units BIGINT NOT NULL DEFAULT 0
    CHECK (flash_sale_units >= 0);
CREATE INDEX checkouts_flash_sale ON checkouts(flash_sale_id) WHERE flash_sale_id IS NOT NULL;
