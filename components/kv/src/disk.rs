//! The disk tier: KV blocks in files below the host tier, one file per block, LRU within a
//! byte capacity, surviving restarts.
//!
//! **File format** (`<dir>/<sequence hash, 16 hex digits>.kvb`, little endian): a 72-byte
//! header, then the block's contents.
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `DYNKVBLK` |
//! | 8..12 | format version (1) |
//! | 12..16 | flags (bit 0: has a parent) |
//! | 16..24 | layout fingerprint (model, KV layout, block size: whoever may read the block) |
//! | 24..32 | sequence hash |
//! | 32..40 | parent sequence hash (0 without one) |
//! | 40..48 | local (tokens) hash |
//! | 48..52 | position in the sequence |
//! | 52..56 | uses (requests that used the block) |
//! | 56..64 | contents length |
//! | 64..72 | checksum: XXH3-64 of the header (checksum zeroed) and the contents |
//!
//! A block is written to a temporary name and renamed into place, so a reader (or a restart
//! after a kill) sees a whole file or none. Nothing is fsynced: a power loss may lose recent
//! blocks, which the checksum then refuses; the tier is a cache.
//!
//! **Verification.** [`DiskTier::open`] rescans the directory: a file whose header is not
//! ours, whose length is not its header's, or whose name is not its hash is dropped as
//! *truncated/corrupt*; one written for another layout fingerprint (another model, block
//! size or dtype) is dropped as *foreign*. Contents are checksummed on every read
//! ([`DiskTier::get`]): a mismatch drops the file and is never served. Each drop is counted
//! in [`DiskCounts`]; the directory is locked (`.lock`, exclusive) so two workers never share
//! one.
//!
//! Costs: lookups are in memory (an index of the files, rebuilt by the scan); `put` writes one
//! file and deletes one per evicted block; `get` reads one file.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use dynamo_protocols::kv::{LocalBlockHash, SequenceHash};

use crate::tier::{block_size, ByteLru, TierBlock};

const MAGIC: &[u8; 8] = b"DYNKVBLK";
const VERSION: u32 = 1;
/// Bytes of a file's header.
pub const HEADER: usize = 72;
const EXT: &str = "kvb";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(
        "the disk KV tier cannot use {dir}: {source}; give --disk-kv-dir a writable directory"
    )]
    Open {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("the disk KV tier {dir} is in use by another process; give each worker its own --disk-kv-dir")]
    InUse { dir: PathBuf },
    #[error("cannot write KV block file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read KV block file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("KV block file {path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
}

/// Where the tier lives and what it may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSettings {
    pub dir: PathBuf,
    /// Bytes of block contents held at most (headers not counted).
    pub capacity: usize,
    /// Identifies the model and KV layout; files of another fingerprint are not served.
    pub fingerprint: u64,
    /// Bytes a block without contents counts (a simulated engine).
    pub nominal: usize,
}

/// Files dropped, by reason (since the tier opened).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskCounts {
    /// Found at the start and kept.
    pub recovered: u64,
    /// Truncated, unreadable or failing the checksum.
    pub corrupt: u64,
    /// Written for another layout fingerprint.
    pub foreign: u64,
    /// Writes that failed (a full disk, a vanished directory).
    pub write_errors: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    parent: Option<SequenceHash>,
    local: LocalBlockHash,
    position: u32,
    /// Bytes counted against the capacity.
    size: usize,
}

/// What a [`DiskTier::put`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DiskChange {
    /// Newly held (`false`: held already, or not written).
    pub stored: bool,
    /// Blocks whose files were deleted to make room, least recently used first.
    pub evicted: Vec<SequenceHash>,
}

#[derive(Debug)]
pub struct DiskTier {
    settings: DiskSettings,
    blocks: ByteLru<Entry>,
    counts: DiskCounts,
    /// Holds the directory's lock while open.
    _lock: File,
}

struct Header {
    flags: u32,
    fingerprint: u64,
    hash: u64,
    parent: u64,
    local: u64,
    position: u32,
    uses: u32,
    len: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.flags.to_le_bytes());
        h[16..24].copy_from_slice(&self.fingerprint.to_le_bytes());
        h[24..32].copy_from_slice(&self.hash.to_le_bytes());
        h[32..40].copy_from_slice(&self.parent.to_le_bytes());
        h[40..48].copy_from_slice(&self.local.to_le_bytes());
        h[48..52].copy_from_slice(&self.position.to_le_bytes());
        h[52..56].copy_from_slice(&self.uses.to_le_bytes());
        h[56..64].copy_from_slice(&self.len.to_le_bytes());
        h
    }

    fn decode(h: &[u8; HEADER]) -> Result<Self, String> {
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        if &h[0..8] != MAGIC {
            return Err("not a KV block file (bad magic)".into());
        }
        if u32_at(8) != VERSION {
            return Err(format!(
                "format version {} (this build reads {VERSION})",
                u32_at(8)
            ));
        }
        Ok(Self {
            flags: u32_at(12),
            fingerprint: u64_at(16),
            hash: u64_at(24),
            parent: u64_at(32),
            local: u64_at(40),
            position: u32_at(48),
            uses: u32_at(52),
            len: u64_at(56),
        })
    }
}

fn checksum(header: &[u8; HEADER], data: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&header[..HEADER - 8]);
    h.update(data);
    h.digest()
}

fn file_name(hash: SequenceHash) -> String {
    format!("{:016x}.{EXT}", hash.0)
}

impl DiskTier {
    /// Opens (creating it if needed) and locks the tier's directory, then rescans it: every
    /// file is checked (see the module header) and the survivors are held, least recently
    /// written out first when they exceed the capacity.
    pub fn open(settings: DiskSettings) -> Result<Self, DiskError> {
        let dir = settings.dir.clone();
        let open_err = |source| DiskError::Open {
            dir: dir.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(open_err)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))
            .map_err(open_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(DiskError::InUse { dir }),
            Err(fs::TryLockError::Error(e)) => return Err(open_err(e)),
        }
        let mut tier = Self {
            blocks: ByteLru::new(settings.capacity),
            settings,
            counts: DiskCounts::default(),
            _lock: lock,
        };
        tier.scan().map_err(open_err)?;
        Ok(tier)
    }

    fn scan(&mut self) -> std::io::Result<()> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.settings.dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".tmp-") {
                // A write the previous run did not finish.
                let _ = fs::remove_file(&path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some(EXT) {
                continue;
            }
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            match self.check_file(&path, &name) {
                Ok(Some((hash, e))) => found.push((modified, hash, e)),
                Ok(None) => {
                    self.counts.foreign += 1;
                    let _ = fs::remove_file(&path);
                }
                Err(_) => {
                    self.counts.corrupt += 1;
                    let _ = fs::remove_file(&path);
                }
            }
        }
        // Oldest first into the LRU; over capacity, the oldest go.
        found.sort_by_key(|(m, _, e)| (*m, e.position));
        let mut kept: Vec<(SequenceHash, Entry)> = Vec::new();
        let mut bytes = 0usize;
        for (_, hash, e) in found.into_iter().rev() {
            if bytes + e.size > self.settings.capacity {
                let _ = fs::remove_file(self.path(hash));
                continue;
            }
            bytes += e.size;
            kept.push((hash, e));
        }
        for (hash, e) in kept.into_iter().rev() {
            let size = e.size;
            self.blocks.insert(hash, e, size);
            self.counts.recovered += 1;
        }
        Ok(())
    }

    /// Checks a file's header and length: `Ok(None)` for another fingerprint.
    fn check_file(&self, path: &Path, name: &str) -> Result<Option<(SequenceHash, Entry)>, String> {
        let mut f = File::open(path).map_err(|e| e.to_string())?;
        let mut raw = [0u8; HEADER];
        f.read_exact(&mut raw)
            .map_err(|_| "shorter than a header".to_string())?;
        let h = Header::decode(&raw)?;
        if h.fingerprint != self.settings.fingerprint {
            return Ok(None);
        }
        let len = f.metadata().map_err(|e| e.to_string())?.len();
        if len != HEADER as u64 + h.len {
            return Err(format!(
                "{len} bytes, the header says {}",
                HEADER as u64 + h.len
            ));
        }
        let hash = SequenceHash(h.hash);
        if name != file_name(hash) {
            return Err("file name is not its hash".into());
        }
        let size = if h.len == 0 {
            self.settings.nominal
        } else {
            h.len as usize
        };
        Ok(Some((
            hash,
            Entry {
                parent: (h.flags & 1 != 0).then_some(SequenceHash(h.parent)),
                local: LocalBlockHash(h.local),
                position: h.position,
                size,
            },
        )))
    }

    fn path(&self, hash: SequenceHash) -> PathBuf {
        self.settings.dir.join(file_name(hash))
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.len() == 0
    }

    /// Bytes held.
    pub fn used(&self) -> usize {
        self.blocks.used()
    }

    pub fn capacity(&self) -> usize {
        self.blocks.capacity()
    }

    pub fn counts(&self) -> DiskCounts {
        self.counts
    }

    pub fn contains(&self, hash: &SequenceHash) -> bool {
        self.blocks.contains(hash)
    }

    /// How many of the leading `hashes` are held.
    pub fn match_prefix(&self, hashes: &[SequenceHash]) -> usize {
        self.blocks.match_prefix(hashes)
    }

    /// Forgets `hash` and deletes its file.
    fn forget(&mut self, hash: SequenceHash) {
        self.blocks.remove(&hash);
        let _ = fs::remove_file(self.path(hash));
    }

    /// Writes `block` (or refreshes it when held already), deleting least recently used
    /// files while over capacity. A block larger than the tier is not written. A failed
    /// write is counted and returned; the tier stays consistent (the file is not held).
    pub fn put(&mut self, block: &TierBlock) -> Result<DiskChange, DiskError> {
        let mut change = DiskChange::default();
        if self.blocks.contains(&block.hash) {
            self.blocks.touch(block.hash);
            return Ok(change);
        }
        let size = block_size(block, self.settings.nominal);
        if size > self.settings.capacity {
            return Ok(change);
        }
        for (victim, _) in self.blocks.make_room(size) {
            let _ = fs::remove_file(self.path(victim));
            change.evicted.push(victim);
        }
        if let Err(e) = self.write(block) {
            self.counts.write_errors += 1;
            // What was evicted stays evicted (its files are gone): report it with the error.
            return if change.evicted.is_empty() {
                Err(e)
            } else {
                Ok(change)
            };
        }
        self.blocks.insert(
            block.hash,
            Entry {
                parent: block.parent,
                local: block.local,
                position: block.position,
                size,
            },
            size,
        );
        change.stored = true;
        Ok(change)
    }

    fn write(&self, block: &TierBlock) -> Result<(), DiskError> {
        let path = self.path(block.hash);
        let tmp = self
            .settings
            .dir
            .join(format!(".tmp-{}", file_name(block.hash)));
        let mut header = Header {
            flags: u32::from(block.parent.is_some()),
            fingerprint: self.settings.fingerprint,
            hash: block.hash.0,
            parent: block.parent.map_or(0, |p| p.0),
            local: block.local.0,
            position: block.position,
            uses: block.uses,
            len: block.data.len() as u64,
        }
        .encode();
        let sum = checksum(&header, &block.data);
        header[64..72].copy_from_slice(&sum.to_le_bytes());
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&header)?;
            f.write_all(&block.data)?;
            fs::rename(&tmp, &path)
        })();
        written.map_err(|source| {
            let _ = fs::remove_file(&tmp);
            DiskError::Write { path, source }
        })
    }

    /// The block of `hash`, read and verified, made most recent. A file that fails the
    /// check is deleted, forgotten and counted, and the error returned: never served.
    pub fn get(&mut self, hash: &SequenceHash) -> Result<Option<TierBlock>, DiskError> {
        if !self.blocks.contains(hash) {
            return Ok(None);
        }
        let path = self.path(*hash);
        match self.read(&path, *hash) {
            Ok(b) => {
                self.blocks.touch(*hash);
                Ok(Some(b))
            }
            Err(e) => {
                self.counts.corrupt += 1;
                self.forget(*hash);
                Err(e)
            }
        }
    }

    fn read(&self, path: &Path, hash: SequenceHash) -> Result<TierBlock, DiskError> {
        let corrupt = |why: String| DiskError::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        let mut f = File::open(path).map_err(|source| DiskError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut raw = [0u8; HEADER];
        f.read_exact(&mut raw)
            .map_err(|_| corrupt("shorter than a header".into()))?;
        let h = Header::decode(&raw).map_err(corrupt)?;
        if h.fingerprint != self.settings.fingerprint || h.hash != hash.0 {
            return Err(corrupt("header names another block or layout".into()));
        }
        let mut data = Vec::with_capacity(h.len as usize);
        f.read_to_end(&mut data).map_err(|source| DiskError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if data.len() as u64 != h.len {
            return Err(corrupt(format!(
                "{} content bytes, the header says {}",
                data.len(),
                h.len
            )));
        }
        let stored = u64::from_le_bytes(raw[64..72].try_into().expect("8 bytes"));
        if checksum(&raw, &data) != stored {
            return Err(corrupt("checksum mismatch".into()));
        }
        Ok(TierBlock {
            hash,
            parent: (h.flags & 1 != 0).then_some(SequenceHash(h.parent)),
            local: LocalBlockHash(h.local),
            position: h.position,
            data,
            uses: h.uses,
        })
    }

    /// The held blocks' identities, parents before children (for announcements and dumps).
    pub fn identities(&self) -> Vec<(Option<SequenceHash>, SequenceHash, LocalBlockHash)> {
        let mut v: Vec<(&SequenceHash, &Entry)> = self.blocks.iter().collect();
        v.sort_by_key(|(_, e)| e.position);
        v.into_iter()
            .map(|(h, e)| (e.parent, *h, e.local))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(h: u64, bytes: usize) -> TierBlock {
        TierBlock {
            hash: SequenceHash(h),
            parent: h.checked_sub(1).map(SequenceHash),
            local: LocalBlockHash(h * 7),
            position: h as u32,
            data: (0..bytes).map(|i| (i as u64 ^ h) as u8).collect(),
            uses: 3,
        }
    }

    fn settings(dir: &Path, capacity: usize) -> DiskSettings {
        DiskSettings {
            dir: dir.to_path_buf(),
            capacity,
            fingerprint: 42,
            nominal: 0,
        }
    }

    #[test]
    fn blocks_come_back_whole_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut t = DiskTier::open(settings(dir.path(), 1000)).unwrap();
            for h in 0..3 {
                assert!(t.put(&block(h, 100)).unwrap().stored);
            }
            assert_eq!(t.get(&SequenceHash(1)).unwrap().unwrap(), block(1, 100));
            assert_eq!(t.used(), 300);
        }
        let mut t = DiskTier::open(settings(dir.path(), 1000)).unwrap();
        assert_eq!(t.counts().recovered, 3);
        assert_eq!(
            t.match_prefix(&[SequenceHash(0), SequenceHash(1), SequenceHash(2)]),
            3
        );
        assert_eq!(t.get(&SequenceHash(2)).unwrap().unwrap(), block(2, 100));
        assert_eq!(
            t.identities().iter().map(|i| i.1 .0).collect::<Vec<_>>(),
            [0, 1, 2],
            "parents first"
        );
    }

    #[test]
    fn the_least_recently_used_file_is_deleted_within_the_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = DiskTier::open(settings(dir.path(), 300)).unwrap();
        for h in 0..3 {
            t.put(&block(h, 100)).unwrap();
        }
        t.get(&SequenceHash(0)).unwrap();
        let change = t.put(&block(3, 100)).unwrap();
        assert_eq!(change.evicted, [SequenceHash(1)]);
        assert!(!dir.path().join(file_name(SequenceHash(1))).exists());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            4,
            "3 blocks and the lock"
        );
    }

    #[test]
    fn a_corrupted_file_is_refused_on_read_and_a_truncated_one_at_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = DiskTier::open(settings(dir.path(), 1000)).unwrap();
        for h in 0..3 {
            t.put(&block(h, 100)).unwrap();
        }
        // One flipped content byte.
        let p1 = dir.path().join(file_name(SequenceHash(1)));
        let mut bytes = fs::read(&p1).unwrap();
        bytes[HEADER + 10] ^= 0xff;
        fs::write(&p1, bytes).unwrap();
        let err = t.get(&SequenceHash(1)).unwrap_err();
        assert!(matches!(err, DiskError::Corrupt { .. }), "{err}");
        assert!(!t.contains(&SequenceHash(1)) && !p1.exists());
        assert_eq!(t.counts().corrupt, 1);
        drop(t);
        // A truncated file is dropped by the next scan.
        let p2 = dir.path().join(file_name(SequenceHash(2)));
        let len = fs::metadata(&p2).unwrap().len();
        File::options()
            .write(true)
            .open(&p2)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let t = DiskTier::open(settings(dir.path(), 1000)).unwrap();
        assert_eq!((t.counts().recovered, t.counts().corrupt), (1, 1));
        assert!(!p2.exists());
    }

    #[test]
    fn files_of_another_layout_are_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = DiskTier::open(settings(dir.path(), 1000)).unwrap();
        t.put(&block(0, 100)).unwrap();
        drop(t);
        let t = DiskTier::open(DiskSettings {
            fingerprint: 7,
            ..settings(dir.path(), 1000)
        })
        .unwrap();
        assert_eq!((t.len(), t.counts().foreign), (0, 1));
    }

    #[test]
    fn a_directory_in_use_or_unusable_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let _held = DiskTier::open(settings(dir.path(), 1000)).unwrap();
        assert!(matches!(
            DiskTier::open(settings(dir.path(), 1000)),
            Err(DiskError::InUse { .. })
        ));
        let file = dir.path().join("plain-file");
        fs::write(&file, b"x").unwrap();
        let err = DiskTier::open(settings(&file.join("sub"), 1000)).unwrap_err();
        assert!(matches!(err, DiskError::Open { .. }), "{err}");
        assert!(err.to_string().contains("--disk-kv-dir"), "{err}");
    }

    #[test]
    fn a_failed_write_is_counted_and_nothing_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = DiskTier::open(settings(dir.path(), 1000)).unwrap();
        // The temporary name taken by a directory: the write fails as on a full disk.
        fs::create_dir(
            dir.path()
                .join(format!(".tmp-{}", file_name(SequenceHash(5)))),
        )
        .unwrap();
        assert!(matches!(
            t.put(&block(5, 100)),
            Err(DiskError::Write { .. })
        ));
        assert_eq!((t.len(), t.used(), t.counts().write_errors), (0, 0, 1));
        assert!(
            t.put(&block(6, 100)).unwrap().stored,
            "the tier keeps working"
        );
    }
}
