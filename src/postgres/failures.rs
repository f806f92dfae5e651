//! Failed authentications counted across replicas.

use std::fmt;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::future::BoxFuture;

use super::{bounded, Expiring};
use crate::token::throttle::Counts;
use crate::token::{FailureCounts, Standing, ThrottlePolicy};

fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Failed authentications per client id and source, in the database (see
/// [`PgState::failure_counts`](super::PgState::failure_counts)): one row each, changed under
/// its row lock, removed once nothing about it matters.
#[derive(Clone)]
pub struct PgFailureCounts {
    pub(super) pool: Pool,
}

impl fmt::Debug for PgFailureCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgFailureCounts").finish_non_exhaustive()
    }
}

/// Counts nothing matters about any more go, at most once a minute from each process.
static FAILURES: Expiring = Expiring::new("tower_fhir_auth_failures");

fn counts(row: &tokio_postgres::Row) -> Counts {
    Counts {
        window_start: row.get(0),
        failures: u32::try_from(row.get::<_, i32>(1)).unwrap_or(0),
        blocks: u32::try_from(row.get::<_, i32>(2)).unwrap_or(0),
        blocked_until: row.get(3),
    }
}

impl FailureCounts for PgFailureCounts {
    fn standing(
        &self,
        client_id: &str,
        source: &str,
        policy: ThrottlePolicy,
    ) -> BoxFuture<'static, Result<Standing, String>> {
        let (pool, client, source) = (self.pool.clone(), client_id.to_owned(), source.to_owned());
        Box::pin(bounded(async move {
            let connection = pool.get().await.map_err(|e| e.to_string())?;
            let statement = connection
                .prepare_cached(
                    "SELECT window_start, failures, blocks, blocked_until
                     FROM tower_fhir_auth_failures WHERE client = $1 AND source = $2",
                )
                .await
                .map_err(|e| e.to_string())?;
            let row = connection
                .query_opt(&statement, &[&client, &source])
                .await
                .map_err(|e| e.to_string())?;
            Ok(row.map_or_else(Standing::default, |row| {
                counts(&row).standing(unix_millis(), policy)
            }))
        }))
    }

    fn failed(
        &self,
        client_id: &str,
        source: &str,
        policy: ThrottlePolicy,
    ) -> BoxFuture<'static, Result<Option<Duration>, String>> {
        let (pool, client, source) = (self.pool.clone(), client_id.to_owned(), source.to_owned());
        Box::pin(bounded(async move {
            let failed = |e: tokio_postgres::Error| e.to_string();
            let mut connection = pool.get().await.map_err(|e| e.to_string())?;
            let transaction = connection.transaction().await.map_err(failed)?;
            let now = unix_millis();
            // The row made if absent and locked in one statement (`DO UPDATE` locks the row
            // it finds, `DO NOTHING` would not): parallel first failures each count, and the
            // sweep of expired rows cannot take it between making and locking.
            let row = transaction
                .query_one(
                    "INSERT INTO tower_fhir_auth_failures
                         (client, source, window_start, failures, blocks, expires_at)
                     VALUES ($1, $2, $3, 0, 0, $3)
                     ON CONFLICT (client, source) DO UPDATE SET client = EXCLUDED.client
                     RETURNING window_start, failures, blocks, blocked_until",
                    &[&client, &source, &now],
                )
                .await
                .map_err(failed)?;
            let mut counts = counts(&row);
            let block = counts.fail(now, policy);
            let as_int = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
            transaction
                .execute(
                    "UPDATE tower_fhir_auth_failures
                     SET window_start = $3, failures = $4, blocks = $5, blocked_until = $6,
                         expires_at = $7
                     WHERE client = $1 AND source = $2",
                    &[
                        &client,
                        &source,
                        &counts.window_start,
                        &as_int(counts.failures),
                        &as_int(counts.blocks),
                        &counts.blocked_until,
                        &counts.expires(policy),
                    ],
                )
                .await
                .map_err(failed)?;
            transaction.commit().await.map_err(failed)?;
            FAILURES.sweep(&pool, now);
            Ok(block)
        }))
    }

    fn succeeded(&self, client_id: &str, source: &str) -> BoxFuture<'static, Result<(), String>> {
        let (pool, client, source) = (self.pool.clone(), client_id.to_owned(), source.to_owned());
        Box::pin(bounded(async move {
            let connection = pool.get().await.map_err(|e| e.to_string())?;
            connection
                .execute(
                    "DELETE FROM tower_fhir_auth_failures WHERE client = $1 AND source = $2",
                    &[&client, &source],
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }))
    }
}
