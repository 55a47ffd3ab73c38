//! The writer's disk spool: records are appended (one JSON line each) before the response
//! completes, shipped in order, and deleted once the control plane has stored them. Bounded:
//! when full, a record that cannot be kept is counted, and the next record that fits is
//! preceded by an explicit gap record in the chain — never a silent hole.
//!
//! Group commit: a record is first only chained — serialized once into the group buffer
//! (reused from group to group) and hashed in place, under the lock. Its request then waits
//! ([`Spool::written`], a future; or [`Spool::append`], blocking) until the group holding it is
//! in the file. Whoever waits first writes the whole group with one `write`, outside the lock,
//! while the others wait for that write and records keep chaining into the next group. No
//! thread hand-off, and no delay to gather a bigger group: on this 2-core machine waking a
//! writer thread cost more than the write (27 µs of CPU per record, p50 76 µs), and yielding
//! once before writing made groups of 16 but a request waited for its neighbours' work (p50
//! 45–85 µs). fsync ([`Spool::sync`]) and shipping (and acknowledging) never hold the lock over
//! I/O.

use crate::{AuditRecord, Entry, Head, Kind};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufRead as _, BufReader, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// A segment is closed when it reaches this size.
const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
const ACKED_FILE: &str = "acked";
const HEAD_FILE: &str = "head";

/// Why the spool failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Disk I/O.
    #[error("audit spool {path}: {err}")]
    Io {
        /// Where.
        path: String,
        /// What.
        err: std::io::Error,
    },
    /// The spool is full; the record was counted as lost.
    #[error("audit spool full")]
    Full,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |err| SpoolError::Io {
        path: path.display().to_string(),
        err,
    }
}

#[derive(Debug)]
struct Inner {
    head: Head,
    file: Arc<File>,
    segment: PathBuf,
    segment_bytes: u64,
    total_bytes: u64,
    lost: u64,
    acked: u64,
    /// Read position for shipping from files: (segment, byte offset).
    cursor: Option<(PathBuf, u64)>,
    /// The last record handed out for shipping.
    shipped: u64,
    /// Lines written and not yet acknowledged, newest last, up to [`RECENT_BYTES`]: shipping
    /// reads them from here, and from the files only after a restart or a backlog.
    recent: std::collections::VecDeque<(u64, Arc<str>)>,
    recent_bytes: usize,
    /// Lines chained and not yet written (the next group), newest last.
    group: Vec<u8>,
    /// The last group's buffer, emptied, for the next one.
    spare: Vec<u8>,
    /// Last sequence number written to the file (≤ `head.seq`).
    written: u64,
    /// Whether a thread is writing a group (outside the lock).
    writing: bool,
    /// The chain as of the last record in the file (what is persisted, shipped and signed).
    written_head: Head,
    /// Set when a group could not be written: its first record, and why. The spool is broken
    /// from there on (every later record fails; a restart opens a new epoch), so the chain it
    /// ships never has a hole.
    failed_from: Option<(u64, String)>,
    /// Groups written (`write` calls) since the spool was opened.
    groups: u64,
    /// Tasks waiting for the group being written.
    wakers: Vec<Waker>,
}

/// Most bytes of unacknowledged lines kept in memory for shipping.
const RECENT_BYTES: usize = 2 * 1024 * 1024;

/// The one field shipping reads from a line of the files.
#[derive(serde::Deserialize)]
struct SeqOnly {
    seq: u64,
}

/// A writer's spool.
#[derive(Debug)]
pub struct Spool {
    writer: String,
    epoch: String,
    max_bytes: u64,
    shared: Arc<Shared>,
}

/// The spool's state, shared with the futures waiting for records ([`Written`]).
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Signalled when a group was written.
    written: Condvar,
}

/// Creates `dir` (and missing parents) readable by the owner only: records name users and
/// paths.
pub fn private_dir(dir: &Path) -> Result<(), SpoolError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))
}

fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.jsonl")
}

fn segments(dir: &Path) -> Result<Vec<PathBuf>, SpoolError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seg-") && n.ends_with(".jsonl"))
        })
        .collect();
    v.sort();
    Ok(v)
}

fn last_record(path: &Path) -> Option<AuditRecord> {
    let f = File::open(path).ok()?;
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.is_empty())
        .last()
        .and_then(|l| serde_json::from_str(&l).ok())
}

fn first_seq_of(path: &Path) -> u64 {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("seg-"))
        .and_then(|n| n.strip_suffix(".jsonl"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, Inner>, SpoolError> {
        self.inner.lock().map_err(|_| SpoolError::Full)
    }

    /// Writes the gathered group with one `write`, the lock released meanwhile; wakes the
    /// threads waiting for their records.
    fn write_group<'a>(&'a self, mut inner: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        let first = inner.written + 1;
        let last = inner.head.seq;
        let head_after = inner.head.clone();
        if inner.segment_bytes >= SEGMENT_BYTES {
            let next = self.dir.join(segment_name(first));
            match OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&next)
            {
                Ok(f) => {
                    inner.file = Arc::new(f);
                    inner.segment = next;
                    inner.segment_bytes = 0;
                }
                Err(e) => {
                    Self::fail(&mut inner, first, format!("{}: {e}", next.display()));
                    return self.wake(inner);
                }
            }
        }
        inner.writing = true;
        let spare = std::mem::take(&mut inner.spare);
        let mut group = std::mem::replace(&mut inner.group, spare);
        let (file, segment, before) = (
            inner.file.clone(),
            inner.segment.clone(),
            inner.segment_bytes,
        );
        drop(inner);
        let result = (&*file).write_all(&group);
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.writing = false;
        inner.written = last;
        inner.groups += 1;
        match result {
            Ok(()) => {
                let n = group.len() as u64;
                inner.segment_bytes += n;
                inner.total_bytes += n;
                inner.written_head = head_after;
            }
            Err(e) => {
                // No partial line stays behind for the next record to be glued onto.
                let _ = file.set_len(before);
                Self::fail(&mut inner, first, format!("{}: {e}", segment.display()));
            }
        }
        group.clear();
        inner.spare = group;
        self.wake(inner)
    }

    /// Records from `first` on cannot be in the file: each of their waiters gets the error,
    /// none is handed out for shipping, and the spool takes no more records. The file and the
    /// chain it holds end at the last record written, whole.
    fn fail(inner: &mut Inner, first: u64, why: String) {
        if inner.failed_from.is_none() {
            inner.failed_from = Some((first, why));
        }
        inner.group.clear();
        inner.written = inner.head.seq;
        inner.recent.retain(|(seq, _)| *seq < first);
        inner.recent_bytes = inner.recent.iter().map(|(_, l)| l.len()).sum();
    }

    /// Wakes whoever waits for a group: blocked threads, and tasks (outside the lock).
    fn wake<'a>(&'a self, mut inner: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        self.written.notify_all();
        if inner.wakers.is_empty() {
            return inner;
        }
        let wakers = std::mem::take(&mut inner.wakers);
        drop(inner);
        for w in wakers {
            w.wake();
        }
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether record `seq` is in the file (`Some`: the outcome), or not yet (`None`).
    fn outcome(&self, inner: &Inner, seq: u64) -> Option<Result<(), SpoolError>> {
        if inner.written < seq {
            return None;
        }
        Some(match &inner.failed_from {
            Some((first, why)) if seq >= *first => Err(self.broken(why)),
            _ => Ok(()),
        })
    }

    fn broken(&self, why: &str) -> SpoolError {
        SpoolError::Io {
            path: self.dir.display().to_string(),
            err: std::io::Error::other(format!(
                "a write failed, the spool takes no more records: {why}"
            )),
        }
    }
}

/// Resolves once a record is in the spool file ([`Spool::written`]).
#[derive(Debug)]
pub struct Written {
    shared: Arc<Shared>,
    seq: u64,
}

impl Future for Written {
    type Output = Result<(), SpoolError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.into_ref().get_ref();
        let shared = &this.shared;
        let mut inner = match shared.lock() {
            Ok(i) => i,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if let Some(out) = shared.outcome(&inner, this.seq) {
            return Poll::Ready(out);
        }
        if inner.writing {
            // Woken when that group is written; then ours is written, or we write it.
            if !inner.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                inner.wakers.push(cx.waker().clone());
            }
            return Poll::Pending;
        }
        let inner = shared.write_group(inner);
        Poll::Ready(shared.outcome(&inner, this.seq).unwrap_or(Ok(())))
    }
}

impl Spool {
    /// Opens (creating) the spool of `writer` in `dir`, at most `max_bytes` on disk, continuing
    /// the chain where it stopped.
    pub fn open(
        dir: &Path,
        writer: &str,
        epoch: &str,
        max_bytes: u64,
    ) -> Result<Spool, SpoolError> {
        private_dir(dir)?;
        let acked = std::fs::read_to_string(dir.join(ACKED_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let mut head: Head = std::fs::read_to_string(dir.join(HEAD_FILE))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let segs = segments(dir)?;
        for s in segs.iter().rev() {
            if let Some(r) = last_record(s) {
                if r.seq > head.seq {
                    head = Head {
                        seq: r.seq,
                        hash: r.hash,
                    };
                }
                break;
            }
        }
        let total_bytes = segs
            .iter()
            .filter_map(|s| std::fs::metadata(s).ok())
            .map(|m| m.len())
            .sum();
        let segment = segs
            .last()
            .cloned()
            .unwrap_or_else(|| dir.join(segment_name(head.seq + 1)));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&segment)
            .map_err(io(&segment))?;
        let segment_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        let written = head.seq;
        let written_head = head.clone();
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            inner: Mutex::new(Inner {
                head,
                file: Arc::new(file),
                segment,
                segment_bytes,
                total_bytes,
                lost: 0,
                acked,
                cursor: None,
                shipped: acked,
                recent: std::collections::VecDeque::new(),
                recent_bytes: 0,
                group: Vec::with_capacity(64 * 1024),
                spare: Vec::with_capacity(64 * 1024),
                written,
                writing: false,
                written_head,
                failed_from: None,
                groups: 0,
                wakers: Vec::new(),
            }),
            written: Condvar::new(),
        });
        Ok(Spool {
            writer: writer.to_owned(),
            epoch: epoch.to_owned(),
            max_bytes,
            shared,
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, SpoolError> {
        self.shared.lock()
    }

    /// Chains a record into the group being gathered (and into `recent`, for shipping once it
    /// is written); returns its sequence number.
    fn chain(&self, inner: &mut Inner, kind: Kind, e: Entry, lost: u64) -> Result<u64, SpoolError> {
        let start = inner.group.len();
        let seq =
            match inner
                .head
                .chain_into(&self.writer, &self.epoch, kind, e, lost, &mut inner.group)
            {
                Ok(seq) => seq,
                Err(e) => {
                    inner.group.truncate(start);
                    return Err(SpoolError::Io {
                        path: self.shared.dir.display().to_string(),
                        err: e.into(),
                    });
                }
            };
        let line = inner
            .group
            .get(start..inner.group.len() - 1)
            .unwrap_or_default();
        let text: Arc<str> = std::str::from_utf8(line)
            .map_or_else(|_| String::from_utf8_lossy(line).into(), Arc::from);
        inner.recent_bytes += text.len();
        inner.recent.push_back((seq, text));
        while inner.recent_bytes > RECENT_BYTES {
            let Some((_, old)) = inner.recent.pop_front() else {
                break;
            };
            inner.recent_bytes -= old.len();
        }
        Ok(seq)
    }

    /// Chains a decision record into the group written next; returns its sequence number. The
    /// record is in the file once [`Spool::written`] resolves for it.
    pub fn enqueue(&self, e: Entry) -> Result<u64, SpoolError> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        if let Some((_, why)) = &inner.failed_from {
            return Err(self.shared.broken(why));
        }
        // Room for this record (and a gap record before it, if records were lost)?
        let need = 1024 * if inner.lost > 0 { 2 } else { 1 };
        if inner.total_bytes + inner.group.len() as u64 + need > self.max_bytes {
            inner.lost += 1;
            return Err(SpoolError::Full);
        }
        if inner.lost > 0 {
            let lost = inner.lost;
            let gap = Entry {
                time_ms: e.time_ms,
                ..Entry::default()
            };
            self.chain(inner, Kind::Gap, gap, lost)?;
            inner.lost = 0;
        }
        self.chain(inner, Kind::Decision, e, 0)
    }

    /// Resolves once record `seq` (and every record before it) is in the spool file —
    /// written to the OS: it survives the process being killed; [`Spool::sync`] makes it
    /// survive power loss.
    pub fn written(&self, seq: u64) -> Written {
        Written {
            shared: self.shared.clone(),
            seq,
        }
    }

    /// Blocks until every record chained so far is in the spool file (records whose request
    /// went away without waiting, e.g. hyper's own refusals, are written too).
    pub fn flush(&self) -> Result<(), SpoolError> {
        let seq = {
            let inner = self.lock()?;
            if inner.failed_from.is_some() {
                return Ok(()); // nothing more is written; each lost record was reported
            }
            inner.head.seq
        };
        self.wait_written(seq)
    }

    /// [`Spool::enqueue`], then blocks until the record is in the spool file.
    pub fn append(&self, e: Entry) -> Result<u64, SpoolError> {
        let seq = self.enqueue(e)?;
        self.wait_written(seq)?;
        Ok(seq)
    }

    /// Blocks until record `seq` is in the spool file ([`Spool::written`] for threads).
    pub fn wait_written(&self, seq: u64) -> Result<(), SpoolError> {
        let mut inner = self.lock()?;
        loop {
            if let Some(out) = self.shared.outcome(&inner, seq) {
                return out;
            }
            inner = if inner.writing {
                self.shared
                    .written
                    .wait(inner)
                    .map_err(|_| SpoolError::Full)?
            } else {
                self.shared.write_group(inner)
            };
        }
    }

    /// The writer (proxy id) of this spool's chain.
    pub fn writer(&self) -> &str {
        &self.writer
    }

    /// The epoch (process start) of this spool's chain.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The directory holding this spool.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The chain's head: the last record written.
    pub fn head(&self) -> Head {
        self.shared
            .inner
            .lock()
            .map(|i| i.written_head.clone())
            .unwrap_or_default()
    }

    /// Whether every record written has been acknowledged.
    pub fn drained(&self) -> bool {
        self.shared
            .inner
            .lock()
            .is_ok_and(|i| i.acked >= i.head.seq && i.lost == 0 && i.group.is_empty())
    }

    /// Flushes written records to the disk.
    pub fn sync(&self) -> Result<(), SpoolError> {
        // fsync outside the lock: appends (on the request path) must not wait for the disk.
        let (file, segment) = {
            let inner = self.lock()?;
            (inner.file.clone(), inner.segment.clone())
        };
        file.sync_data().map_err(io(&segment))
    }

    /// Records lost to a full spool and not yet reported by a gap record.
    pub fn lost(&self) -> u64 {
        self.shared.inner.lock().map_or(0, |i| i.lost)
    }

    /// Bytes on disk.
    pub fn depth_bytes(&self) -> u64 {
        self.shared.inner.lock().map_or(0, |i| i.total_bytes)
    }

    /// Groups written to the file (one `write` each) since the spool was opened.
    pub fn groups(&self) -> u64 {
        self.shared.inner.lock().map_or(0, |i| i.groups)
    }

    /// Last sequence number written and last acknowledged.
    pub fn positions(&self) -> (u64, u64) {
        self.shared
            .inner
            .lock()
            .map_or((0, 0), |i| (i.written_head.seq, i.acked))
    }

    /// Up to `max` records after the last one handed out (or after the acknowledged position
    /// when `from_acked`), as JSON lines. One shipper per spool calls this and [`Spool::ack`].
    pub fn next_batch(&self, max: usize, from_acked: bool) -> Result<Vec<String>, SpoolError> {
        let mut inner = self.lock()?;
        if from_acked {
            inner.cursor = None;
            inner.shipped = inner.acked;
        }
        let after = inner.shipped.max(inner.acked);
        let written = inner.written;
        if after >= written {
            return Ok(Vec::new()); // caught up: nothing to read, from memory or the files
        }
        // From memory when it holds the next record to ship (the usual case).
        if inner
            .recent
            .front()
            .is_some_and(|(first, _)| *first <= after + 1)
        {
            // Shared under the lock; copied out of it.
            let out: Vec<(u64, Arc<str>)> = inner
                .recent
                .iter()
                .filter(|(seq, _)| *seq > after)
                .take_while(|(seq, _)| *seq <= written)
                .take(max)
                .cloned()
                .collect();
            if let Some((last, _)) = out.last() {
                inner.shipped = *last;
            }
            drop(inner);
            return Ok(out.into_iter().map(|(_, l)| l.to_string()).collect());
        }
        // From the files (after a restart, or a backlog larger than memory keeps), without the
        // lock: appends go on meanwhile, and only the shipper moves the cursor.
        let cursor = inner.cursor.clone();
        drop(inner);
        let segs = segments(&self.shared.dir)?;
        let (mut seg_idx, mut offset) = match &cursor {
            Some((p, off)) => (segs.iter().position(|s| s == p).unwrap_or(0), *off),
            None => (0, 0),
        };
        let mut out = Vec::new();
        let mut last = after;
        while out.len() < max {
            let Some(path) = segs.get(seg_idx) else { break };
            let mut f = File::open(path).map_err(io(path))?;
            f.seek(SeekFrom::Start(offset)).map_err(io(path))?;
            let mut reader = BufReader::new(f);
            let mut line = String::new();
            loop {
                line.clear();
                let n = reader.read_line(&mut line).map_err(io(path))?;
                if n == 0 || !line.ends_with('\n') {
                    break; // end, or a line still being written
                }
                let seq = serde_json::from_str::<SeqOnly>(&line).map_or(0, |s| s.seq);
                if seq > written {
                    break; // in a group still being written: shipped once it is
                }
                offset += n as u64;
                if seq > after {
                    out.push(line.trim_end().to_owned());
                    last = last.max(seq);
                    if out.len() >= max {
                        break;
                    }
                }
            }
            if out.len() >= max || seg_idx + 1 >= segs.len() {
                break;
            }
            seg_idx += 1;
            offset = 0;
        }
        let mut inner = self.lock()?;
        if let Some(p) = segs.get(seg_idx) {
            inner.cursor = Some((p.clone(), offset));
        }
        inner.shipped = last;
        Ok(out)
    }

    /// The control plane stored everything through `seq`: remember it and delete segments that
    /// hold nothing newer.
    pub fn ack(&self, seq: u64) -> Result<(), SpoolError> {
        // File I/O happens outside the lock: appends (on the request path) never wait for it.
        // Only the shipper acknowledges, so acks do not race each other.
        let (head, current) = {
            let mut inner = self.lock()?;
            if seq <= inner.acked {
                return Ok(());
            }
            inner.acked = seq;
            while inner.recent.front().is_some_and(|(s, _)| *s <= seq) {
                if let Some((_, old)) = inner.recent.pop_front() {
                    inner.recent_bytes -= old.len();
                }
            }
            (inner.written_head.clone(), inner.segment.clone())
        };
        write_private(
            &self.shared.dir.join(ACKED_FILE),
            seq.to_string().as_bytes(),
        )?;
        let head = serde_json::to_string(&head).unwrap_or_default();
        write_private(&self.shared.dir.join(HEAD_FILE), head.as_bytes())?;
        // Segments holding nothing newer than `seq` (never the open one).
        let mut freed = 0;
        let mut removed = Vec::new();
        for pair in segments(&self.shared.dir)?.windows(2) {
            if let [this, next] = pair
                && first_seq_of(next) <= seq + 1
                && *this != current
            {
                let len = std::fs::metadata(this).map(|m| m.len()).unwrap_or(0);
                if std::fs::remove_file(this).is_ok() {
                    freed += len;
                    removed.push(this.clone());
                }
            }
        }
        let mut inner = self.lock()?;
        inner.total_bytes = inner.total_bytes.saturating_sub(freed);
        if inner
            .cursor
            .as_ref()
            .is_some_and(|(p, _)| removed.contains(p))
        {
            inner.cursor = None;
        }
        // The open segment holds only acknowledged records and is large: start a new one.
        if inner.written_head.seq == seq
            && !inner.writing
            && inner.group.is_empty()
            && (inner.segment_bytes >= SEGMENT_BYTES / 4 || inner.total_bytes * 2 >= self.max_bytes)
        {
            let old = inner.segment.clone();
            let next = self.shared.dir.join(segment_name(seq + 1));
            inner.file = Arc::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(&next)
                    .map_err(io(&next))?,
            );
            inner.segment = next;
            inner.total_bytes = inner.total_bytes.saturating_sub(inner.segment_bytes);
            inner.segment_bytes = 0;
            inner.cursor = None;
            drop(inner);
            let _ = std::fs::remove_file(old);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify_chain;

    fn e(i: u64) -> Entry {
        Entry {
            decision_id: format!("d{i}"),
            status: 200,
            path: "/x".repeat(10),
            ..Entry::default()
        }
    }

    #[test]
    fn survives_reopen_ships_in_order_and_reports_loss_as_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), "w", "e1", 1 << 20).unwrap();
        for i in 0..10 {
            s.append(e(i)).unwrap();
        }
        drop(s);
        // Reopened (a restarted proxy): the chain continues.
        let s = Spool::open(dir.path(), "w", "e1", 1 << 20).unwrap();
        for i in 10..20 {
            s.append(e(i)).unwrap();
        }
        let batch = s.next_batch(15, true).unwrap();
        assert_eq!(batch.len(), 15);
        let rest = s.next_batch(100, false).unwrap();
        assert_eq!(rest.len(), 5);
        let all: Vec<AuditRecord> = batch
            .iter()
            .chain(&rest)
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(verify_chain(&all), Ok(20));
        s.ack(15).unwrap();
        let again = s.next_batch(100, true).unwrap();
        assert_eq!(again.len(), 5, "acknowledged records are not shipped again");

        // A tiny spool fills: records are lost, counted, and reported by a gap record.
        let dir2 = tempfile::tempdir().unwrap();
        let small = Spool::open(dir2.path(), "w", "e1", 4096).unwrap();
        let mut kept = 0;
        for i in 0..20 {
            if small.append(e(i)).is_ok() {
                kept += 1;
            }
        }
        assert!(kept < 20 && small.lost() == 20 - kept);
        let mut shipped: Vec<AuditRecord> = small
            .next_batch(100, true)
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        small.ack(shipped.last().unwrap().seq).unwrap();
        // Room again: the next record is preceded by a gap record in the chain.
        small.append(e(99)).unwrap();
        shipped.extend(
            small
                .next_batch(100, true)
                .unwrap()
                .iter()
                .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap()),
        );
        assert_eq!(
            verify_chain(&shipped),
            Err(crate::ChainError::Gap {
                seq: kept + 1,
                lost: 20 - kept
            })
        );
        assert_eq!(small.lost(), 0);
    }

    #[test]
    fn concurrent_appends_return_once_written_and_share_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Spool::open(dir.path(), "w", "e1", 1 << 30).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let seq = s.append(e(t * 1000 + i)).unwrap();
                        // Its line is in the file when append returns.
                        let seg = segments(s.dir()).unwrap();
                        let text = std::fs::read_to_string(seg.last().unwrap()).unwrap();
                        assert!(
                            text.contains(&format!("\"seq\":{seq},")),
                            "record {seq} not in the file after append"
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Every record once, in chain order.
        let mut got = Vec::new();
        loop {
            let b = s.next_batch(300, false).unwrap();
            if b.is_empty() {
                break;
            }
            got.extend(
                b.iter()
                    .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap()),
            );
        }
        assert_eq!(got.len(), 2000);
        verify_chain(&got).unwrap();
        assert!(s.groups() <= 2000);
    }

    #[test]
    fn a_task_resumes_only_once_its_record_is_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Spool::open(dir.path(), "w", "e1", 1 << 30).unwrap());
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        let tasks: Vec<_> = (0..8)
                            .map(|k| {
                                let s = s.clone();
                                tokio::spawn(async move {
                                    for i in 0..100 {
                                        let seq = s.enqueue(e(t * 10_000 + k * 100 + i)).unwrap();
                                        s.written(seq).await.unwrap();
                                        let seg = segments(s.dir()).unwrap();
                                        let text =
                                            std::fs::read_to_string(seg.last().unwrap()).unwrap();
                                        assert!(text.contains(&format!("\"seq\":{seq},")));
                                        tokio::task::yield_now().await;
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                    });
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.positions().0, 1600);
        let mut got = Vec::new();
        loop {
            let b = s.next_batch(500, false).unwrap();
            if b.is_empty() {
                break;
            }
            got.extend(
                b.iter()
                    .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap()),
            );
        }
        assert_eq!(got.len(), 1600);
        verify_chain(&got).unwrap();
    }

    #[test]
    fn flush_writes_records_nobody_waits_for() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), "w", "e1", 1 << 30).unwrap();
        let seq = s.enqueue(e(1)).unwrap();
        assert_eq!(s.positions().0, 0, "chained, not yet written");
        s.flush().unwrap();
        assert_eq!(s.positions().0, seq);
        let seg = segments(s.dir()).unwrap();
        let text = std::fs::read_to_string(seg.last().unwrap()).unwrap();
        assert!(text.contains("\"seq\":1,"));
    }
}
