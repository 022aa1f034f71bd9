//! The issuance ledger of the in-cluster front ends: every certificate the CSR signer or the
//! managed-Secret controller issues is recorded with its requester and the object it was
//! issued for.
//!
//! Writes are batched by one background task ([`LedgerSink`]): a reconcile hands its record
//! over, and the task appends everything queued within [`LINGER`] in one write of the current
//! shard, so a burst of 1,000 CSRs costs a handful of ConfigMap updates rather than 1,000
//! conflicting ones. The ledger never drops a record: a batch that cannot be written is
//! retried with backoff (each failed attempt counted in `meshca_ledger_write_failures_total`)
//! until it is written. The queue is bounded ([`QUEUE`] records, `meshca_ledger_backlog`):
//! while the ledger cannot be written and the queue is full, [`LedgerSink::record`] waits, so
//! issuance stops instead of going on unrecorded. On shutdown the queue is flushed within a
//! bound; what is still queued then (the ledger unreachable) is logged with its serials.
//! Prune does not rely on the ledger alone ([`crate::store::Store::live_certificates`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::mpsc;

use super::metrics::Metrics;
use crate::error::Result;
use crate::issue::LedgerEntry;
use crate::store::Store;

/// Most records written in one batch.
pub const MAX_BATCH: usize = 500;
/// Most records queued; [`LedgerSink::record`] waits beyond.
pub const QUEUE: usize = 4 * MAX_BATCH;
/// How long the writer waits after the first record of a batch for more of the same burst:
/// 1,000 CSRs at 200/s make about 25 shard writes instead of one per record in flight.
pub const LINGER: Duration = Duration::from_millis(200);
/// Longest wait between two attempts at one batch.
const RETRY_CAP: Duration = Duration::from_secs(30);

/// One ledger line of the in-cluster front ends: the common entry plus who asked and for what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IssuedRecord {
    /// The common ledger fields (serial, CA, SANs, validity, fingerprint).
    #[serde(flatten)]
    pub entry: LedgerEntry,
    /// The authenticated requester: a CSR's `spec.username`, or `namespace:<ns>` for a managed
    /// Secret (whoever can write Secrets in that namespace).
    pub requester: String,
    /// The object the certificate was issued for: `csr/<name>` or `secret/<ns>/<name>`.
    pub object: String,
}

/// Where batches of records go.
#[async_trait]
pub trait LedgerWriter: Send + Sync + std::fmt::Debug {
    /// Appends `records` (one line each), all or nothing.
    async fn append(&self, records: &[IssuedRecord]) -> Result<()>;
}

/// Any [`Store`]: records go through [`Store::record`] one by one (the requester and object
/// are logged, since the store's own entry has no place for them). The kube store implements
/// [`LedgerWriter`] itself, with the full line and one write per batch.
#[derive(Debug)]
pub struct StoreLedger(pub Arc<dyn Store>);

#[async_trait]
impl LedgerWriter for StoreLedger {
    async fn append(&self, records: &[IssuedRecord]) -> Result<()> {
        for r in records {
            tracing::debug!(serial = %r.entry.serial, requester = %r.requester, object = %r.object, "ledger");
            self.0.record(&r.entry).await?;
        }
        Ok(())
    }
}

/// The sending side: cheap to clone; waits only while the queue is full.
#[derive(Clone, Debug)]
pub struct LedgerSink {
    tx: mpsc::Sender<IssuedRecord>,
    metrics: Arc<Metrics>,
}

impl LedgerSink {
    /// Starts the writer task. It ends (after writing what is queued) when every sink clone is
    /// dropped.
    pub fn spawn(
        writer: Arc<dyn LedgerWriter>,
        metrics: Arc<Metrics>,
    ) -> (LedgerSink, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            LedgerSink {
                tx,
                metrics: metrics.clone(),
            },
            tokio::spawn(write_loop(writer, metrics, rx)),
        )
    }

    /// Queues one record, waiting while [`QUEUE`] records are already waiting (the ledger
    /// cannot be written): issuance slows down to what the ledger takes, and stops while it
    /// takes nothing.
    pub async fn record(&self, r: IssuedRecord) {
        let r = match self.tx.try_send(r) {
            Ok(()) => {
                self.metrics.ledger_backlog.inc();
                return;
            }
            Err(mpsc::error::TrySendError::Full(r)) => {
                tracing::warn!(
                    queued = QUEUE,
                    "the ledger is behind; issuance waits for it"
                );
                r
            }
            Err(mpsc::error::TrySendError::Closed(r)) => r,
        };
        match self.tx.send(r).await {
            Ok(()) => {
                self.metrics.ledger_backlog.inc();
            }
            Err(e) => {
                tracing::error!(serial = %e.0.entry.serial, "ledger writer stopped; record not written")
            }
        }
    }
}

async fn write_loop(
    writer: Arc<dyn LedgerWriter>,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<IssuedRecord>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        if batch.len() < MAX_BATCH {
            tokio::time::sleep(LINGER).await;
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match writer.append(&batch).await {
                Ok(()) => {
                    metrics.ledger_entries.inc_by(batch.len() as u64);
                    metrics.ledger_backlog.dec_by(batch.len() as i64);
                    break;
                }
                Err(e) => {
                    metrics.ledger_failures.inc();
                    let d = super::backoff::ceiling(attempt).min(RETRY_CAP);
                    if attempt == 1 || attempt % 10 == 0 {
                        let serials: Vec<&str> =
                            batch.iter().map(|r| r.entry.serial.as_str()).collect();
                        tracing::error!(error = %e, attempt, ?serials, retry_in = ?d, "ledger write failed; retrying until it is written");
                    }
                    tokio::time::sleep(d).await;
                }
            }
        }
        batch.clear();
    }
}

/// Waits (at most `timeout`) for the writer task to flush after its sinks are dropped. The
/// writer keeps its failing batch in the log lines it writes at each retry, so what a
/// timeout loses is named there.
pub async fn flush(task: tokio::task::JoinHandle<()>, timeout: Duration) {
    let abort = task.abort_handle();
    if tokio::time::timeout(timeout, task).await.is_err() {
        abort.abort();
        tracing::error!("ledger writer did not finish in time (the ledger cannot be written); the records still queued are not in the ledger");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct Fake {
        batches: Mutex<Vec<usize>>,
        fail_first: Mutex<u32>,
    }

    #[async_trait]
    impl LedgerWriter for Fake {
        async fn append(&self, records: &[IssuedRecord]) -> Result<()> {
            {
                let mut f = self.fail_first.lock().unwrap();
                if *f > 0 {
                    *f -= 1;
                    return Err(crate::error::Error::Store("injected".into()));
                }
            }
            self.batches.lock().unwrap().push(records.len());
            Ok(())
        }
    }

    pub(crate) fn record(serial: &str) -> IssuedRecord {
        let t = time::OffsetDateTime::UNIX_EPOCH;
        IssuedRecord {
            entry: LedgerEntry {
                serial: serial.into(),
                ca: "mesh".into(),
                subject: String::new(),
                sans: vec!["DNS:a.example.com".into()],
                not_after: t,
                issued_at: t,
                sha256: String::new(),
                aki: None,
            },
            requester: "system:serviceaccount:app:blue".into(),
            object: "csr/c1".into(),
        }
    }

    /// Issue 17: a batch that failed 5 writes used to be dropped (and prune then trusted a
    /// ledger without it). A long outage only delays the records.
    #[tokio::test(start_paused = true)]
    async fn a_long_ledger_outage_delays_records_and_never_drops_them() {
        let fake = Arc::new(Fake::default());
        *fake.fail_first.lock().unwrap() = 40;
        let m = Arc::new(Metrics::new());
        let (sink, task) = LedgerSink::spawn(fake.clone(), m.clone());
        for i in 0..3 {
            sink.record(record(&format!("{i:x}"))).await;
        }
        drop(sink);
        flush(task, Duration::from_secs(3600)).await;
        let batches = fake.batches.lock().unwrap().clone();
        assert_eq!(
            batches.iter().sum::<usize>(),
            3,
            "every record written: {batches:?}"
        );
        assert_eq!(m.ledger_entries.get(), 3);
    }

    /// The queue is bounded: while the ledger cannot be written, issuance waits instead of
    /// queueing without end (or dropping).
    #[tokio::test(start_paused = true)]
    async fn a_full_queue_holds_issuance_back() {
        let fake = Arc::new(Fake::default());
        *fake.fail_first.lock().unwrap() = u32::MAX;
        let m = Arc::new(Metrics::new());
        let (sink, task) = LedgerSink::spawn(fake.clone(), m.clone());
        // The writer holds one batch; the queue holds QUEUE more.
        for i in 0..(QUEUE + MAX_BATCH) {
            tokio::time::timeout(
                Duration::from_secs(1),
                sink.record(record(&format!("{i:x}"))),
            )
            .await
            .expect("room in the queue");
        }
        assert!(
            tokio::time::timeout(Duration::from_secs(600), sink.record(record("full")))
                .await
                .is_err(),
            "a record beyond the queue waits"
        );
        assert_eq!(m.ledger_backlog.get(), (QUEUE + MAX_BATCH) as i64);
        assert!(
            m.ledger_failures.get() > 1,
            "every failed attempt is counted"
        );
        assert!(fake.batches.lock().unwrap().is_empty());
        task.abort();
    }

    #[tokio::test]
    async fn batches_retries_and_flushes_on_drop() {
        let fake = Arc::new(Fake::default());
        *fake.fail_first.lock().unwrap() = 1;
        let m = Arc::new(Metrics::new());
        let (sink, task) = LedgerSink::spawn(fake.clone(), m.clone());
        for i in 0..(MAX_BATCH + 3) {
            sink.record(record(&format!("{i:x}"))).await;
        }
        drop(sink);
        flush(task, Duration::from_secs(30)).await;
        let batches = fake.batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), MAX_BATCH + 3, "{batches:?}");
        assert!(batches.len() <= 2, "batched: {batches:?}");
        assert_eq!(m.ledger_entries.get(), (MAX_BATCH + 3) as u64);
        assert_eq!(m.ledger_failures.get(), 1, "the failed attempt is counted");
        assert_eq!(m.ledger_backlog.get(), 0);
        // The line carries the requester and the object next to the common fields.
        let line = serde_json::to_value(record("ab")).unwrap();
        assert_eq!(line["serial"], "ab");
        assert_eq!(line["requester"], "system:serviceaccount:app:blue");
        assert_eq!(line["object"], "csr/c1");
        let back: LedgerEntry = serde_json::from_value(line).unwrap();
        assert_eq!(
            back.serial, "ab",
            "the store's reader still parses the line"
        );
    }
}
