//! The wholesale phases of the store (companies, price lists, orders on account, invoices and
//! their audit), written once for both stores: the statements are the same text, and only the
//! row locks (PostgreSQL's `FOR UPDATE`; SQLite's single writer needs none) and the invoice
//! number (a sequence; `max + 1` under the single writer) differ. Each store expands
//! [`wholesale_store_methods`] inside its `impl Store`, with its own `decode` module and
//! `confirm_reservations` step.

/// `impl WholesaleStore for <store>`: `lock` is appended to the checkout and invoice
/// reads of a phase, `credit_lock` to the company's credit read, and `insert_invoice` is the
/// invoice insert with `{}` for the returned columns.
macro_rules! wholesale_store_methods {
    ($store:ty, lock: $lock:literal, credit_lock: $credit_lock:literal, insert_invoice: $insert_invoice:literal $(,)?) => {
        #[async_trait::async_trait]
        impl $crate::store::WholesaleStore for $store {
    async fn create_company(
        &self,
        company: &NewCompany,
        now: DateTime<Utc>,
    ) -> Result<Company, StoreError> {
        let row = sqlx::query(&format!(
            "INSERT INTO companies ({COMPANY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             RETURNING {COMPANY_COLUMNS}"
        ))
        .bind(CompanyId::new().uuid())
        .bind(company.name.as_str())
        .bind(company.currency.as_str())
        .bind(company.payment_terms.as_str())
        .bind(company.credit_limit)
        .bind(company.po_number_required)
        .bind(to_millis(now))
        .bind(company.capture_method.map(CaptureMethod::as_str))
        .fetch_one(&self.pool)
        .await?;
        decode::company(&row)
    }

    async fn company(&self, id: CompanyId) -> Result<Option<Company>, StoreError> {
        sqlx::query(&format!(
            "SELECT {COMPANY_COLUMNS} FROM companies WHERE id = $1"
        ))
        .bind(id.uuid())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(decode::company)
        .transpose()
    }

    async fn set_company_price(
        &self,
        company: CompanyId,
        sku: &Sku,
        price: &CompanyPrice,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query_scalar::<_, Uuid>("SELECT id FROM companies WHERE id = $1")
            .bind(company.uuid())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound("company"))?;
        let product: i64 = sqlx::query_scalar("SELECT id FROM products WHERE sku = $1")
            .bind(sku.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound("product"))?;
        sqlx::query(UPSERT_COMPANY_PRICE_SQL)
            .bind(company.uuid())
            .bind(product)
            .bind(price.amount)
            .bind(price.percent_off.map(i64::from))
            .bind(price.tiers.to_json())
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(checkout_id = %id))]
    async fn complete_on_account(
        &self,
        customer: CustomerId,
        id: CheckoutId,
        now: DateTime<Utc>,
    ) -> Result<(Checkout, Invoice), StoreError> {
        let mut tx = self.pool.begin().await?;
        let current = sqlx::query(&format!(
            concat!(
                "SELECT {} FROM checkouts WHERE id = $1 AND customer_id = $2",
                $lock
            ),
            CHECKOUT_COLUMNS
        ))
        .bind(id.uuid())
        .bind(customer.uuid())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound("checkout"))?;
        let current = decode::checkout(&current)?;
        on_account_checkout(&current, now)?;
        let credit = sqlx::query(credit_row_sql!($credit_lock))
            .bind(customer.uuid())
            .bind(to_millis(now))
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(decode_credit)
            .transpose()?;
        let days = on_account_terms(credit.as_ref(), current.total)?;
        let company = credit
            .map(|c| c.company)
            .ok_or(StoreError::OnAccountNotAvailable)?;
        Self::confirm_reservations(&mut tx, id).await?;
        sqlx::query(ON_ACCOUNT_CREDIT_SQL)
            .bind(company.uuid())
            .bind(current.total.amount())
            .execute(&mut *tx)
            .await?;
        let invoice = sqlx::query(&format!($insert_invoice, INVOICE_COLUMNS))
            .bind(InvoiceId::new().uuid())
            .bind(company.uuid())
            .bind(current.order_id.uuid())
            .bind(current.total.amount())
            .bind(current.total.currency().as_str())
            .bind(to_millis(now + chrono::Duration::days(days)))
            .bind(to_millis(now))
            .fetch_one(&mut *tx)
            .await?;
        let invoice = decode::invoice(&invoice)?;
        sqlx::query(ON_ACCOUNT_ORDER_SQL)
            .bind(current.order_id.uuid())
            .bind(invoice.id.uuid())
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?;
        sqlx::query(CART_CHECKED_OUT_SQL)
            .bind(current.cart_id.uuid())
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?;
        let completed = sqlx::query(ON_ACCOUNT_CHECKOUT_SQL)
            .bind(id.uuid())
            .bind(to_millis(now))
            .fetch_one(&mut *tx)
            .await?;
        let completed = decode::checkout(&completed)?;
        let rows = sqlx::query(PAID_ORDER_LINES_SQL)
            .bind(current.order_id.uuid())
            .fetch_all(&mut *tx)
            .await?;
        let po_number: Option<String> = match rows.first() {
            Some(row) => row.try_get("po_number")?,
            None => None,
        };
        let lines = rows
            .iter()
            .map(decode::order_line)
            .collect::<Result<Vec<_>, _>>()?;
        let event = order_paid_event(
            &completed,
            super::Paid::OnAccount(invoice.id),
            lines,
            po_number,
            now,
        );
        sqlx::query(OUTBOX_ORDER_PAID_SQL)
            .bind(event.event_id)
            .bind(completed.order_id.uuid())
            .bind(&event.payload)
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((completed, invoice))
    }

    async fn invoice(&self, id: InvoiceId) -> Result<Option<Invoice>, StoreError> {
        sqlx::query(&format!(
            "SELECT {INVOICE_COLUMNS} FROM invoices WHERE id = $1"
        ))
        .bind(id.uuid())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(decode::invoice)
        .transpose()
    }

    #[tracing::instrument(skip_all, fields(invoice_id = %id))]
    async fn record_invoice_payment(
        &self,
        id: InvoiceId,
        amount: i64,
        now: DateTime<Utc>,
    ) -> Result<Invoice, StoreError> {
        let mut tx = self.pool.begin().await?;
        let current = sqlx::query(&format!(
            concat!("SELECT {} FROM invoices WHERE id = $1", $lock),
            INVOICE_COLUMNS
        ))
        .bind(id.uuid())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound("invoice"))?;
        let current = decode::invoice(&current)?;
        invoice_payment(&current, amount)?;
        let paid = sqlx::query(INVOICE_PAYMENT_SQL)
            .bind(id.uuid())
            .bind(amount)
            .bind(to_millis(now))
            .fetch_one(&mut *tx)
            .await?;
        let paid = decode::invoice(&paid)?;
        sqlx::query(ON_ACCOUNT_CREDIT_SQL)
            .bind(current.company_id.uuid())
            .bind(-amount)
            .execute(&mut *tx)
            .await?;
        if paid.status == "paid" {
            sqlx::query(INVOICE_PAID_ORDER_SQL)
                .bind(paid.order_id.uuid())
                .bind(to_millis(now))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(paid)
    }

    #[tracing::instrument(skip_all, fields(order_id = %order))]
    async fn refund_on_account(
        &self,
        order: OrderId,
        now: DateTime<Utc>,
    ) -> Result<Checkout, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The invoice first, as a payment takes it; then the checkout before its order, as a
        // card refund takes them; the company's credit before the products, as an order on
        // account takes them. So none of them deadlocks with this refund.
        let invoice = sqlx::query(&format!(
            concat!("SELECT {} FROM invoices WHERE order_id = $1", $lock),
            INVOICE_COLUMNS
        ))
        .bind(order.uuid())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound("order"))?;
        let invoice = decode::invoice(&invoice)?;
        let checkout = sqlx::query(&format!(
            concat!("SELECT {} FROM checkouts WHERE order_id = $1", $lock),
            CHECKOUT_COLUMNS
        ))
        .bind(order.uuid())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound("order"))?;
        let checkout = decode::checkout(&checkout)?;
        let status: String =
            sqlx::query_scalar(concat!("SELECT status FROM orders WHERE id = $1", $lock))
                .bind(order.uuid())
                .fetch_one(&mut *tx)
                .await?;
        super::on_account_refundable(&status)?;
        sqlx::query(ON_ACCOUNT_CREDIT_SQL)
            .bind(invoice.company_id.uuid())
            .bind(-invoice.balance())
            .execute(&mut *tx)
            .await?;
        sqlx::query(super::VOID_INVOICE_SQL)
            .bind(invoice.id.uuid())
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?;
        Self::return_stock(&mut tx, checkout.id).await?;
        sqlx::query(super::REFUNDED_ON_ACCOUNT_ORDER_SQL)
            .bind(order.uuid())
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?;
        let refunded = sqlx::query(super::REFUNDED_ON_ACCOUNT_CHECKOUT_SQL)
            .bind(checkout.id.uuid())
            .bind(to_millis(now))
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        decode::checkout(&refunded)
    }

    async fn overdue_invoices(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Invoice>, StoreError> {
        sqlx::query(super::OVERDUE_INVOICES_SQL)
            .bind(to_millis(now))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(decode::invoice)
            .collect()
    }

    async fn line_rules_audit(&self) -> Result<Vec<super::LineRulesRow>, StoreError> {
        sqlx::query(super::LINE_RULES_AUDIT_SQL)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| {
                Ok(super::LineRulesRow {
                    order_id: OrderId::from_uuid(row.try_get("order_id")?),
                    sku: rows::sku(row.try_get("sku")?)?,
                    quantity: rows::quantity(row.try_get("quantity")?)?.get(),
                    rules: rows::rules(
                        row.try_get("min_quantity")?,
                        row.try_get("increment")?,
                        row.try_get("max_quantity")?,
                    )?,
                })
            })
            .collect()
    }

    async fn credit_audit(&self) -> Result<Vec<CreditAuditRow>, StoreError> {
        sqlx::query(CREDIT_AUDIT_SQL)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| {
                Ok(CreditAuditRow {
                    company: CompanyId::from_uuid(row.try_get("id")?),
                    limit: row.try_get("credit_limit")?,
                    outstanding: row.try_get("credit_outstanding")?,
                    invoiced: row.try_get("invoiced")?,
                    voids_astray: row.try_get("voids_astray")?,
                })
            })
            .collect()
    }

    async fn company_prices(
        &self,
        company: CompanyId,
    ) -> Result<Vec<(Sku, CompanyPrice)>, StoreError> {
        sqlx::query(COMPANY_PRICES_SQL)
            .bind(company.uuid())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(decode::company_price_row)
            .collect()
    }

    async fn company_capture_method(
        &self,
        customer: CustomerId,
    ) -> Result<Option<CaptureMethod>, StoreError> {
        let raw: Option<Option<String>> = sqlx::query_scalar(COMPANY_CAPTURE_METHOD_SQL)
            .bind(customer.uuid())
            .fetch_optional(&self.pool)
            .await?;
        raw.flatten()
            .map(|m| {
                CaptureMethod::parse(&m)
                    .ok_or_else(|| StoreError::Corrupt(format!("capture method {m:?}")))
            })
            .transpose()
    }
        }
    };
}
