//! The current CRL of each issuer.

use crate::{Conn, Result, Store, Tx};

#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct CrlRecord {
    pub issuer: String,
    pub number: i64,
    pub this_update: i64,
    pub next_update: i64,
    /// Base64 DER.
    pub der: String,
}

async fn get_crl(c: Conn<'_>, issuer: &str) -> sqlx::Result<Option<CrlRecord>> {
    on_conn!(c, c => sqlx::query_as("SELECT * FROM crls WHERE issuer = $1").bind(issuer).fetch_optional(c).await)
}

impl Store {
    pub async fn get_crl(&self, issuer: &str) -> Result<Option<CrlRecord>> {
        Ok(get_crl(self.reader().await?.conn(), issuer).await?)
    }
}

impl Tx {
    pub async fn put_crl(&mut self, r: &CrlRecord) -> Result<()> {
        on_tx!(self, c => sqlx::query(
            "INSERT INTO crls (issuer, number, this_update, next_update, der) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (issuer) DO UPDATE SET number = excluded.number, this_update = excluded.this_update,
                 next_update = excluded.next_update, der = excluded.der")
            .bind(&r.issuer).bind(r.number).bind(r.this_update).bind(r.next_update).bind(&r.der)
            .execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn get_crl(&mut self, issuer: &str) -> Result<Option<CrlRecord>> {
        Ok(get_crl(self.conn(), issuer).await?)
    }
}
