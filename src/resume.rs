//! Where a pipeline attempt starts streaming, and keeping walbridge's own record of it
//! (see `cdc::position` for why the slot alone is not enough).

use std::time::Duration;

use anyhow::Context;
use cdc::Lsn;
use cdc::position::{Position, PositionFile};
use tokio::sync::watch;

use crate::config::SourceConfig;

/// The source's identity and the position file that belongs to it.
pub struct Resume {
    pub file: PositionFile,
    pub identity: Position,
    /// What the position file held, if it exists.
    pub stored: Option<Lsn>,
    /// Where to start: the later of the slot's confirmed LSN and the stored one.
    pub start: Lsn,
}

impl Resume {
    /// Stores the final confirmed LSN of an attempt (the writer task may not have caught up).
    pub fn store_final(&self, confirmed: Lsn) {
        if confirmed <= self.start {
            return;
        }
        let mut pos = self.identity.clone();
        pos.confirmed = confirmed;
        if let Err(e) = self.file.store(&pos) {
            tracing::warn!(error = %e, "cannot store the confirmed position");
        }
    }
}

/// Reads the server's identity, checks the stored position against it, and picks the start.
pub async fn resume_point(
    meta: &tokio_postgres::Client,
    source: &SourceConfig,
    slot_confirmed: Lsn,
) -> anyhow::Result<Resume> {
    let row = meta
        .query_one(
            "SELECT system_identifier::text, current_database()::text FROM pg_control_system()",
            &[],
        )
        .await
        .context("reading the source's system identifier")?;
    let identity = Position {
        system_identifier: row.get(0),
        database: row.get(1),
        slot: source.slot.clone(),
        confirmed: Lsn::ZERO,
    };
    let file = PositionFile::new(&source.state_dir, &source.slot);
    let stored = file.load(&identity)?;
    let start = stored.map_or(slot_confirmed, |s| s.max(slot_confirmed));
    if start > slot_confirmed {
        tracing::info!(
            slot_confirmed = %slot_confirmed,
            stored = %start,
            file = %file.path().display(),
            "the slot is behind walbridge's own record (Postgres restarted?); resuming from the record"
        );
    }
    Ok(Resume {
        file,
        identity,
        stored,
        start,
    })
}

/// Stores every newly confirmed LSN, at most once per `every`.
pub fn spawn_position_writer(
    resume: &Resume,
    mut confirmed: watch::Receiver<Lsn>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let file = resume.file.clone();
    let mut pos = resume.identity.clone();
    pos.confirmed = resume.start;
    tokio::spawn(async move {
        loop {
            if confirmed.changed().await.is_err() {
                return;
            }
            let lsn = *confirmed.borrow_and_update();
            if lsn > pos.confirmed {
                pos.confirmed = lsn;
                let (f, p) = (file.clone(), pos.clone());
                match tokio::task::spawn_blocking(move || f.store(&p)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot store the confirmed position"),
                    Err(e) => tracing::warn!(error = %e, "position writer failed"),
                }
            }
            tokio::time::sleep(every).await;
        }
    })
}
