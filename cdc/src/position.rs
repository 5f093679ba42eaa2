//! walbridge's own record of how far the source has been confirmed, kept beside the slot.
//!
//! Why not trust the slot alone: Postgres (before 17) writes a slot's `confirmed_flush_lsn` to
//! disk only when its `restart_lsn` or `catalog_xmin` moves, so after a server restart the slot
//! can fall back a long way, and everything since would be streamed again. Duplicates are allowed
//! (at-least-once) but a flood of them is not what a user expects. walbridge therefore writes the
//! LSN it confirms to a small file and, on start, streams from the later of the two: starting
//! after the slot's position is safe because everything up to the stored LSN was acked by Kafka
//! before it was stored (it is the same value sent to Postgres as the flush LSN).
//!
//! The file also names the server (`system_identifier`), the database and the slot. A file that
//! names another server or database means the slot on this server is not the one walbridge
//! streamed from (a restored or replaced source), and continuing would silently skip or repeat
//! changes: walbridge refuses and says what to do.
//!
//! Writes are atomic (temporary file, fsync, rename) and never move the position backwards.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::lsn::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum PositionError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a walbridge position file: {reason}; move it away to start without it")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path} was written for {found}, but the source is {expected}: the slot here is not the one walbridge streamed from \
         (a restored or replaced database?). Changes may be missing or repeated. If this is intended, move the file away \
         and re-snapshot the tables"
    )]
    OtherSource {
        path: PathBuf,
        found: String,
        expected: String,
    },
}

/// Where the source is and how far walbridge has confirmed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub system_identifier: String,
    pub database: String,
    pub slot: String,
    pub confirmed: Lsn,
}

impl Position {
    fn source(&self) -> String {
        format!(
            "system {} database {:?} slot {:?}",
            self.system_identifier, self.database, self.slot
        )
    }

    fn render(&self) -> String {
        format!(
            "system_identifier={}\ndatabase={}\nslot={}\nconfirmed_lsn={}\n",
            self.system_identifier, self.database, self.slot, self.confirmed
        )
    }

    fn parse(path: &Path, text: &str) -> Result<Position, PositionError> {
        let corrupt = |reason: String| PositionError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(str::to_owned)
                .ok_or_else(|| corrupt(format!("no {key}")))
        };
        Ok(Position {
            system_identifier: get("system_identifier")?,
            database: get("database")?,
            slot: get("slot")?,
            confirmed: get("confirmed_lsn")?
                .parse()
                .map_err(|e| corrupt(format!("{e}")))?,
        })
    }
}

/// The position file of one slot in a state directory.
#[derive(Debug, Clone)]
pub struct PositionFile {
    path: PathBuf,
}

impl PositionFile {
    pub fn new(state_dir: &Path, slot: &str) -> PositionFile {
        PositionFile {
            path: state_dir.join(format!("{slot}.position")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored position if there is one for this source; an error if the file belongs to
    /// another source.
    pub fn load(&self, expected: &Position) -> Result<Option<Lsn>, PositionError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(PositionError::Io {
                    what: "read",
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let found = Position::parse(&self.path, &text)?;
        if (&found.system_identifier, &found.database, &found.slot)
            != (
                &expected.system_identifier,
                &expected.database,
                &expected.slot,
            )
        {
            return Err(PositionError::OtherSource {
                path: self.path.clone(),
                found: found.source(),
                expected: expected.source(),
            });
        }
        Ok(Some(found.confirmed))
    }

    /// Stores `pos` atomically. The caller only ever passes confirmed, increasing positions.
    pub fn store(&self, pos: &Position) -> Result<(), PositionError> {
        let io = |what, source| PositionError::Io {
            what,
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(|e| io("create the directory of", e))?;
        }
        let tmp = self.path.with_extension("position.tmp");
        let mut f = fs::File::create(&tmp).map_err(|e| io("write", e))?;
        f.write_all(pos.render().as_bytes())
            .map_err(|e| io("write", e))?;
        f.sync_all().map_err(|e| io("sync", e))?;
        fs::rename(&tmp, &self.path).map_err(|e| io("replace", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(lsn: u64) -> Position {
        Position {
            system_identifier: "7301".into(),
            database: "legacy".into(),
            slot: "s".into(),
            confirmed: Lsn(lsn),
        }
    }

    #[test]
    fn stores_and_loads_and_refuses_another_source() {
        let dir = std::env::temp_dir().join(format!("walbridge-position-{}", std::process::id()));
        let f = PositionFile::new(&dir, "s");
        assert_eq!(f.load(&pos(0)).unwrap(), None, "no file yet");
        f.store(&pos(0x1_0000_0042)).unwrap();
        assert_eq!(f.load(&pos(0)).unwrap(), Some(Lsn(0x1_0000_0042)));
        let other = Position {
            system_identifier: "9999".into(),
            ..pos(0)
        };
        let err = f.load(&other).unwrap_err().to_string();
        assert!(
            err.contains("system 7301") && err.contains("system 9999"),
            "{err}"
        );
        fs::write(f.path(), "garbage").unwrap();
        assert!(matches!(
            f.load(&pos(0)),
            Err(PositionError::Corrupt { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }
}
