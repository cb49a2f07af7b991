-- SQLite shape of migrations/postgres/0004_flash_sale_units.sql.
ALTER TABLE flash_sales ADD COLUMN max_per_buyer BIGINT NOT NULL DEFAULT 1
    CHECK (max_per_buyer > 0);
ALTER TABLE checkouts ADD COLUMN flash_sale_units BIGINT NOT NULL DEFAULT 0
    CHECK (flash_sale_units >= 0);
CREATE INDEX checkouts_flash_sale ON checkouts(flash_sale_id) WHERE flash_sale_id IS NOT NULL;
