//! Group commit of workload records: one writer task commits whatever records are waiting
//! when the previous commit ends as one transaction with one audit record listing them all, so
//! a restart storm costs a few transactions per second, not one per workload.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ca_store::{AuditEvent, Store, WorkloadRecord};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::error::{ErrorCode, ServiceError};

pub(crate) enum Entry {
    Issued { record: WorkloadRecord, sha256: String },
    Denied(serde_json::Value),
}

struct Pending {
    entry: Entry,
    done: oneshot::Sender<Result<(), ()>>,
}

/// Hands records to the writer task and waits until they are committed.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Pending>,
}

impl Recorder {
    pub(crate) fn spawn(
        store: Store,
        queue: usize,
        batch_max: usize,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Recorder {
        // Bounded: under overload requests wait for room rather than growing memory.
        let (tx, rx) = mpsc::channel(queue);
        tokio::spawn(record_loop(store, rx, batch_max, metrics));
        Recorder { tx }
    }

    pub(crate) async fn record(&self, entry: Entry) -> Result<(), ServiceError> {
        let (done, wait) = oneshot::channel();
        let failed = || ServiceError::new(ErrorCode::NotRecorded, "the certificate could not be recorded; try again");
        self.tx.send(Pending { entry, done }).await.map_err(|_| failed())?;
        wait.await.map_err(|_| failed())?.map_err(|_| failed())
    }
}

async fn record_loop(
    store: Store,
    mut rx: mpsc::Receiver<Pending>,
    batch_max: usize,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(batch_max);
    while rx.recv_many(&mut batch, batch_max).await > 0 {
        let started = Instant::now();
        let count = batch.len();
        let (entries, waiting): (Vec<Entry>, Vec<_>) = batch.drain(..).map(|p| (p.entry, p.done)).unzip();
        let result = write_batch(&store, entries).await;
        let took = started.elapsed();
        metrics.workload_commit.observe(took.as_secs_f64());
        if took > Duration::from_millis(100) {
            // Every waiting request waits this long: worth a line when it happens.
            tracing::warn!(ms = took.as_millis() as u64, count, "slow workload commit");
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, count, "writing a batch of workload records failed; the requests fail");
        }
        metrics.workload_batch.observe(count as f64);
        for done in waiting {
            let _ = done.send(result.as_ref().map(|_| ()).map_err(|_| ()));
        }
    }
}

async fn write_batch(store: &Store, batch: Vec<Entry>) -> Result<(), ca_store::StoreError> {
    let mut issued = Vec::with_capacity(batch.len());
    let mut listed = Vec::with_capacity(batch.len());
    let mut denied = Vec::new();
    for entry in batch {
        match entry {
            Entry::Issued { record, sha256 } => {
                listed.push(json!({"serial": record.serial, "cluster": record.cluster, "identity": record.identity,
                    "not_after": record.not_after, "sha256": sha256}));
                issued.push(record);
            }
            Entry::Denied(v) => denied.push(v),
        }
    }
    let mut tx = store.write().await?;
    let action = if issued.is_empty() { "workload.denied" } else { "workload.issued" };
    let subject = format!("{} issued, {} denied", issued.len(), denied.len());
    let mut details = json!({"issued": listed});
    if !denied.is_empty() {
        details["denied"] = serde_json::Value::Array(denied);
    }
    let rec = tx.audit(AuditEvent::new("istio-api", action, subject, details)).await?;
    tx.insert_workload_certificates(&issued, rec.seq).await?;
    tx.commit().await
}
