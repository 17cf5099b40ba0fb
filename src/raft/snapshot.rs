//! The snapshot file format: the state machine's tables as a stream of records.
//!
//! A snapshot used to be the whole state machine serialised as one JSON value,
//! built in memory, kept in the database and sent from memory. With a million
//! aliases that is hundreds of megabytes held at once on the sender and the
//! receiver. This format is written and read one record at a time, so building,
//! sending and installing a snapshot needs memory for one record and one
//! transport chunk, whatever the store's size.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! magic    8 bytes  "TASNAP\r\n"
//! version  u32      FORMAT_VERSION
//! record*  kind u8 (not 0), key_len u32, key, value_len u32, value
//! end      0u8, record count u64
//! crc32    u32      CRC-32 (IEEE) of every byte before it
//! ```
//!
//! Keys and values are copied from the tables as stored (alias records and
//! idempotency claims stay the JSON the state machine wrote), so building a
//! snapshot decodes nothing. A reader refuses a file with another magic, a
//! version it does not know, an unknown record kind, a record larger than the
//! limits, a wrong record count, a wrong checksum or bytes after the
//! checksum, each with its own error, so a node never installs half a
//! snapshot or a snapshot from a build that writes something it cannot read.

use std::io::{self, Read, Write};

/// The first bytes of every snapshot file.
pub const MAGIC: &[u8; 8] = b"TASNAP\r\n";

/// The format version this build writes and the only one it reads. Bump it
/// whenever a record's meaning changes; adding a record kind also needs a
/// bump, because an older reader refuses kinds it does not know.
pub const FORMAT_VERSION: u32 = 1;

/// Longest key accepted (alias ids, SHA-256 hex digests and setting names are
/// far shorter); bounds what a corrupt length field can make a reader allocate.
pub const MAX_KEY_LEN: u32 = 4096;

/// Largest value accepted (an alias record is a few hundred bytes).
pub const MAX_VALUE_LEN: u32 = 16 * 1024 * 1024;

/// Which table a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Alias id -> JSON alias record.
    Alias = 1,
    /// Purged alias id -> replicated time of the purge (u64 little-endian).
    Purged = 2,
    /// SHA-256 of an idempotency key -> JSON claim.
    IdempotencyKey = 3,
    /// Replicated setting name -> JSON value (e.g. `maintenance`).
    Setting = 4,
    /// State-machine metadata other than what openraft's snapshot meta
    /// carries: `last_now` (the replicated clock) -> JSON value.
    StateMeta = 5,
    /// Target key -> JSON target record (confirmation state).
    Target = 6,
    /// Confirmation token digest -> JSON token row.
    ConfirmToken = 7,
    /// `"<target key>\0<alias id>"` -> `valid_until_ms` (u64 little-endian):
    /// the per-target index of live aliases.
    TargetAlias = 8,
}

impl Kind {
    fn from_byte(b: u8) -> Result<Self, SnapshotError> {
        Ok(match b {
            1 => Kind::Alias,
            2 => Kind::Purged,
            3 => Kind::IdempotencyKey,
            4 => Kind::Setting,
            5 => Kind::StateMeta,
            6 => Kind::Target,
            7 => Kind::ConfirmToken,
            8 => Kind::TargetAlias,
            other => return Err(SnapshotError::UnknownKind(other)),
        })
    }
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot i/o: {0}")]
    Io(#[source] io::Error),
    #[error("not a tempalias snapshot (wrong magic bytes; sent by a node of an older release?)")]
    BadMagic,
    #[error(
        "snapshot format version {found} is not supported: this node reads version {}; \
         upgrade the nodes so they run the same release",
        FORMAT_VERSION
    )]
    Version { found: u32 },
    #[error("snapshot is truncated: it ends inside {0}")]
    Truncated(&'static str),
    #[error("snapshot record kind {0} is unknown to this node")]
    UnknownKind(u8),
    #[error("snapshot record {what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: u32,
        max: u32,
    },
    #[error("snapshot announces {announced} records but holds {found}")]
    Count { announced: u64, found: u64 },
    #[error("snapshot checksum mismatch (stored {stored:08x}, computed {computed:08x}): the file is corrupt")]
    Checksum { stored: u32, computed: u32 },
    #[error("snapshot has bytes after its checksum")]
    Trailing,
}

impl From<io::Error> for SnapshotError {
    fn from(e: io::Error) -> Self {
        SnapshotError::Io(e)
    }
}

/// Writes a snapshot one record at a time.
pub struct Writer<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
    records: u64,
}

impl<W: Write> Writer<W> {
    /// Writes the header.
    ///
    /// # Errors
    /// [`SnapshotError::Io`] when `inner` fails.
    pub fn new(inner: W) -> Result<Self, SnapshotError> {
        let mut w = Writer {
            inner,
            crc: crc32fast::Hasher::new(),
            records: 0,
        };
        w.put(MAGIC)?;
        w.put(&FORMAT_VERSION.to_le_bytes())?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.inner.write_all(bytes)
    }

    /// Appends one record.
    ///
    /// # Errors
    /// [`SnapshotError::TooLarge`] for a key or value over the limits a reader
    /// enforces (so a writer never produces a file no node can read), or
    /// [`SnapshotError::Io`].
    pub fn record(&mut self, kind: Kind, key: &[u8], value: &[u8]) -> Result<(), SnapshotError> {
        let key_len = checked_len("key", key.len(), MAX_KEY_LEN)?;
        let value_len = checked_len("value", value.len(), MAX_VALUE_LEN)?;
        self.put(&[kind as u8])?;
        self.put(&key_len.to_le_bytes())?;
        self.put(key)?;
        self.put(&value_len.to_le_bytes())?;
        self.put(value)?;
        self.records += 1;
        Ok(())
    }

    /// Writes the end marker and the checksum and returns the inner writer
    /// (not flushed or synced: that is the caller's).
    ///
    /// # Errors
    /// [`SnapshotError::Io`] when `inner` fails.
    pub fn finish(mut self) -> Result<W, SnapshotError> {
        self.put(&[0])?;
        let records = self.records;
        self.put(&records.to_le_bytes())?;
        let crc = self.crc.clone().finalize();
        self.inner.write_all(&crc.to_le_bytes())?;
        Ok(self.inner)
    }
}

fn checked_len(what: &'static str, len: usize, max: u32) -> Result<u32, SnapshotError> {
    match u32::try_from(len) {
        Ok(l) if l <= max => Ok(l),
        _ => Err(SnapshotError::TooLarge {
            what,
            len: u32::try_from(len).unwrap_or(u32::MAX),
            max,
        }),
    }
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// Reads a snapshot one record at a time. The checksum is only known at the
/// end: a caller writes records into a transaction it commits only after
/// [`Reader::next`] returned `Ok(None)`.
pub struct Reader<R: Read> {
    inner: R,
    crc: crc32fast::Hasher,
    records: u64,
    done: bool,
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header.
    ///
    /// # Errors
    /// [`SnapshotError::BadMagic`], [`SnapshotError::Version`],
    /// [`SnapshotError::Truncated`] or [`SnapshotError::Io`].
    pub fn new(inner: R) -> Result<Self, SnapshotError> {
        let mut r = Reader {
            inner,
            crc: crc32fast::Hasher::new(),
            records: 0,
            done: false,
        };
        let mut magic = [0u8; 8];
        r.take(&mut magic, "the header")?;
        if &magic != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let found = r.u32("the header")?;
        if found != FORMAT_VERSION {
            return Err(SnapshotError::Version { found });
        }
        Ok(r)
    }

    fn take(&mut self, buf: &mut [u8], at: &'static str) -> Result<(), SnapshotError> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => SnapshotError::Truncated(at),
            _ => SnapshotError::Io(e),
        })?;
        self.crc.update(buf);
        Ok(())
    }

    fn u32(&mut self, at: &'static str) -> Result<u32, SnapshotError> {
        let mut b = [0u8; 4];
        self.take(&mut b, at)?;
        Ok(u32::from_le_bytes(b))
    }

    fn bytes(&mut self, what: &'static str, max: u32) -> Result<Vec<u8>, SnapshotError> {
        let len = self.u32("a record")?;
        if len > max {
            return Err(SnapshotError::TooLarge { what, len, max });
        }
        let mut buf = vec![0u8; len as usize];
        self.take(&mut buf, "a record")?;
        Ok(buf)
    }

    /// The next record, or `None` after the end marker once the record count
    /// and the checksum matched and nothing follows them.
    ///
    /// # Errors
    /// Any [`SnapshotError`]; after an error the reader must not be used.
    pub fn next_record(&mut self) -> Result<Option<Record>, SnapshotError> {
        if self.done {
            return Ok(None);
        }
        let mut kind = [0u8; 1];
        self.take(&mut kind, "a record")?;
        if kind[0] == 0 {
            return self.end().map(|()| None);
        }
        let kind = Kind::from_byte(kind[0])?;
        let key = self.bytes("key", MAX_KEY_LEN)?;
        let value = self.bytes("value", MAX_VALUE_LEN)?;
        self.records += 1;
        Ok(Some(Record { kind, key, value }))
    }

    /// The underlying reader (after the end: nothing more to read from it).
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn end(&mut self) -> Result<(), SnapshotError> {
        let mut count = [0u8; 8];
        self.take(&mut count, "the trailer")?;
        let announced = u64::from_le_bytes(count);
        let computed = self.crc.clone().finalize();
        let mut stored = [0u8; 4];
        self.inner
            .read_exact(&mut stored)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => SnapshotError::Truncated("the checksum"),
                _ => SnapshotError::Io(e),
            })?;
        let stored = u32::from_le_bytes(stored);
        if stored != computed {
            return Err(SnapshotError::Checksum { stored, computed });
        }
        if announced != self.records {
            return Err(SnapshotError::Count {
                announced,
                found: self.records,
            });
        }
        let mut extra = [0u8; 1];
        loop {
            match self.inner.read(&mut extra) {
                Ok(0) => break,
                Ok(_) => return Err(SnapshotError::Trailing),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SnapshotError::Io(e)),
            }
        }
        self.done = true;
        Ok(())
    }
}

/// Copies everything read through it into a writer: an installed snapshot is
/// verified and kept as this node's own snapshot file in one pass.
pub struct Tee<R, W> {
    pub reader: R,
    pub writer: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.reader.read(buf)?;
        self.writer.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Vec::new()).unwrap();
        w.record(Kind::Alias, b"abc", br#"{"id":"abc"}"#).unwrap();
        w.record(Kind::Purged, b"old", &7u64.to_le_bytes()).unwrap();
        w.record(Kind::Setting, b"maintenance", b"{}").unwrap();
        w.finish().unwrap()
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Record>, SnapshotError> {
        let mut r = Reader::new(bytes)?;
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec);
        }
        Ok(out)
    }

    #[test]
    fn round_trip() {
        let recs = read_all(&sample()).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].kind, Kind::Alias);
        assert_eq!(recs[0].key, b"abc");
        assert_eq!(recs[1].value, 7u64.to_le_bytes());
        assert_eq!(recs[2].kind, Kind::Setting);
    }

    #[test]
    fn empty_snapshot_round_trips() {
        let bytes = Writer::new(Vec::new()).unwrap().finish().unwrap();
        assert!(read_all(&bytes).unwrap().is_empty());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            let err = read_all(&bytes[..cut]).expect_err("a truncated file must not read");
            assert!(
                matches!(err, SnapshotError::Truncated(_)),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_an_error() {
        let bytes = sample();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x5a;
            assert!(read_all(&bad).is_err(), "flipped byte {i} went unnoticed");
        }
    }

    #[test]
    fn corrupt_value_is_a_checksum_error() {
        let mut bytes = sample();
        // Inside the first record's value.
        let at = 8 + 4 + 1 + 4 + 3 + 4 + 2;
        bytes[at] ^= 1;
        assert!(matches!(
            read_all(&bytes),
            Err(SnapshotError::Checksum { .. })
        ));
    }

    #[test]
    fn other_version_is_refused_clearly() {
        let mut bytes = sample();
        bytes[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let err = read_all(&bytes).unwrap_err();
        assert!(matches!(err, SnapshotError::Version { found } if found == FORMAT_VERSION + 1));
        assert!(err.to_string().contains("not supported"), "{err}");
    }

    #[test]
    fn legacy_json_snapshot_is_refused_clearly() {
        let err = read_all(br#"{"last_now":0,"aliases":[]}"#).unwrap_err();
        assert!(matches!(err, SnapshotError::BadMagic), "{err}");
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = sample();
        bytes.push(0);
        assert!(matches!(read_all(&bytes), Err(SnapshotError::Trailing)));
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut w = Writer::new(Vec::new()).unwrap();
        w.record(Kind::Alias, b"k", b"v").unwrap();
        let mut bytes = w.finish().unwrap();
        // The key length of the first record.
        bytes[13..17].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_all(&bytes),
            Err(SnapshotError::TooLarge { what: "key", .. })
        ));
    }

    #[test]
    fn writer_refuses_what_a_reader_would() {
        let mut w = Writer::new(Vec::new()).unwrap();
        let key = vec![b'k'; MAX_KEY_LEN as usize + 1];
        assert!(matches!(
            w.record(Kind::Alias, &key, b""),
            Err(SnapshotError::TooLarge { .. })
        ));
    }
}
