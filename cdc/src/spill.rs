//! Disk spill for transactions that Postgres streams while they are still in progress
//! (pgoutput protocol 2, `streaming 'on'`).
//!
//! Why spill at all: a streamed transaction may still abort, wholly or one subtransaction at a
//! time, and an aborted change must never reach Kafka; it also has to reach Kafka in commit
//! order with the other transactions. So its changes are kept until `StreamCommit` and then
//! handed on as one ordinary transaction (Begin, changes, Commit), exactly as protocol 1 would
//! have sent it. Keeping them in memory would make memory grow with the transaction; on disk it
//! stays bounded (one small buffered writer per open streamed transaction, one reader while a
//! committed one is replayed).
//!
//! Format of a spill file, one per top-level xid: records of `[subxid u32][len u32][message]`,
//! the message being pgoutput's own bytes (with their xid prefix), decoded again at replay.
//! A crash loses the files, which is fine: the transaction has not committed, so the slot
//! still holds it and Postgres streams it again after the restart. Files left by a crash are
//! removed when the reader starts.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;

use bytes::Bytes;

struct Open {
    path: PathBuf,
    file: BufWriter<File>,
    aborted: HashSet<u32>,
    bytes: u64,
}

/// The spill files of the transactions being streamed.
pub struct Spill {
    dir: PathBuf,
    open: HashMap<u32, Open>,
}

impl Spill {
    /// Uses `dir` (created if missing), removing files left there by an earlier run.
    pub fn new(dir: PathBuf) -> io::Result<Spill> {
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "spill") {
                fs::remove_file(&path)?;
            }
        }
        Ok(Spill {
            dir,
            open: HashMap::new(),
        })
    }

    /// Appends one streamed message of top-level transaction `top`, made by (sub)transaction
    /// `sub`.
    pub fn append(&mut self, top: u32, sub: u32, message: &[u8]) -> io::Result<()> {
        let open = match self.open.entry(top) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let path = self.dir.join(format!("{top}.spill"));
                let file = BufWriter::with_capacity(64 * 1024, File::create(&path)?);
                v.insert(Open {
                    path,
                    file,
                    aborted: HashSet::new(),
                    bytes: 0,
                })
            }
        };
        let len = u32::try_from(message.len())
            .map_err(|_| io::Error::other("a pgoutput message over 4 GiB"))?;
        open.file.write_all(&sub.to_be_bytes())?;
        open.file.write_all(&len.to_be_bytes())?;
        open.file.write_all(message)?;
        open.bytes += 8 + u64::from(len);
        Ok(())
    }

    /// `StreamAbort`: the whole transaction (`sub == top`) or one subtransaction is gone.
    pub fn abort(&mut self, top: u32, sub: u32) -> io::Result<()> {
        if sub == top {
            if let Some(open) = self.open.remove(&top) {
                drop(open.file);
                fs::remove_file(&open.path)?;
            }
        } else if let Some(open) = self.open.get_mut(&top) {
            open.aborted.insert(sub);
        }
        Ok(())
    }

    /// `StreamCommit`: the transaction's surviving messages, in the order they were streamed.
    /// `None` when nothing of it was streamed (every change was in aborted subtransactions).
    pub fn take(&mut self, top: u32) -> io::Result<Option<Replay>> {
        let Some(open) = self.open.remove(&top) else {
            return Ok(None);
        };
        let Open {
            path,
            file,
            aborted,
            bytes,
        } = open;
        file.into_inner().map_err(io::IntoInnerError::into_error)?;
        let reader = BufReader::with_capacity(64 * 1024, File::open(&path)?);
        tracing::debug!(
            xid = top,
            bytes,
            aborted_subtransactions = aborted.len(),
            "replaying a streamed transaction"
        );
        Ok(Some(Replay {
            path,
            reader,
            aborted,
            bytes,
        }))
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Transactions being streamed right now.
    pub fn open_transactions(&self) -> usize {
        self.open.len()
    }
}

/// A committed streamed transaction being read back; removes its file when dropped.
pub struct Replay {
    path: PathBuf,
    reader: BufReader<File>,
    aborted: HashSet<u32>,
    /// Size of the spill file.
    pub bytes: u64,
}

impl Replay {
    /// The next message not made by an aborted subtransaction; `None` at the end.
    pub fn next_message(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            let mut head = [0u8; 8];
            match self.reader.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            }
            let sub = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
            let mut message = vec![0u8; len];
            self.reader.read_exact(&mut message)?;
            if !self.aborted.contains(&sub) {
                return Ok(Some(Bytes::from(message)));
            }
        }
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_in_order_without_aborted_subtransactions_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("walbridge-spill-{}", std::process::id()));
        let mut s = Spill::new(dir.clone()).unwrap();
        s.append(10, 10, b"a").unwrap();
        s.append(10, 11, b"b").unwrap();
        s.append(20, 20, b"other").unwrap();
        s.append(10, 12, b"c").unwrap();
        s.append(10, 10, b"d").unwrap();
        s.abort(10, 11).unwrap();
        s.abort(20, 20).unwrap();
        assert!(
            s.take(20).unwrap().is_none(),
            "an aborted transaction leaves nothing"
        );
        let mut r = s.take(10).unwrap().unwrap();
        let mut got = Vec::new();
        while let Some(m) = r.next_message().unwrap() {
            got.push(m);
        }
        assert_eq!(got, vec![&b"a"[..], b"c", b"d"]);
        drop(r);
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            0,
            "spill files removed"
        );
        // Files of a crashed run are removed at start.
        fs::write(dir.join("7.spill"), b"junk").unwrap();
        let _ = Spill::new(dir.clone()).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        let _ = fs::remove_dir_all(&dir);
    }
}
