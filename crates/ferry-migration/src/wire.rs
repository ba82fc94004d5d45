//! The migration wire format, version 4. Normative description: `docs/wire-format.md`.
//!
//! Every connection starts with a 16-byte preamble in each direction (magic, format version,
//! reserved), followed by records:
//!
//! ```text
//! +------+-------+----------+-------------------+-------------------------------+----------+
//! | type | flags | reserved | payload_len (le32)| payload (payload_len bytes)   | crc32    |
//! | u8   | u8    | u16 = 0  |                   |                               | (le32)   |
//! +------+-------+----------+-------------------+-------------------------------+----------+
//! ```
//!
//! The CRC-32 (IEEE) covers the 8 header bytes and the payload. Each record type has its own
//! payload length limit, checked before anything is allocated or read, so a hostile peer
//! cannot make the decoder allocate more than [`PAYLOAD_BYTES_MAX`]. Decoding never panics.

use std::io::{self, Read, Write};

use crate::compress::{Codec, PageDecompressor};
use crate::layout::{RegionDesc, PAGE_SIZE, REGIONS_MAX};

/// Source-to-destination preamble magic.
pub const MAGIC_SOURCE: [u8; 8] = *b"FERRYMIG";
/// Destination-to-source preamble magic.
pub const MAGIC_DEST: [u8; 8] = *b"FERRYDST";
/// The format version this build speaks. Independent of the crate version.
pub const FORMAT_VERSION: u32 = 4;
/// Length of the preamble.
pub const PREAMBLE_LEN: usize = 16;
/// Length of a record header.
pub const HEADER_LEN: usize = 8;
/// Pages carried by one `Pages` record at most.
pub const PAGES_PER_RECORD_MAX: usize = 512;
/// Runs carried by one `ZeroRuns` record at most.
pub const ZERO_RUNS_PER_RECORD_MAX: usize = 8192;
/// Device state size limit.
pub const DEVICE_STATE_BYTES_MAX: usize = 16 << 20;
/// Error message size limit.
pub const ERROR_BYTES_MAX: usize = 4096;
/// Size limit of the VM description a `Hello` carries.
pub const DESCRIPTION_BYTES_MAX: usize = 64 << 10;
/// The largest payload any record may have.
pub const PAYLOAD_BYTES_MAX: usize = DEVICE_STATE_BYTES_MAX;

const PAGE: usize = PAGE_SIZE as usize;

/// Errors while encoding or decoding the stream.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The underlying stream failed (or ended early).
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection at a record boundary.
    #[error("the peer closed the connection")]
    Closed,
    /// The connection ended inside a record: the peer stopped (or died) mid-record.
    #[error("the connection ended in the middle of {what}")]
    Truncated {
        /// What was being read, e.g. "a record (pages)".
        what: String,
    },
    /// The preamble's magic is wrong: not a ferry migration stream.
    #[error("not a ferry migration stream (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// The peer speaks TLS (its first bytes are a TLS record) to an end without TLS.
    #[error("the peer speaks TLS and this end does not: give both ends the same --tls-* options")]
    PeerSpeaksTls,
    /// The peer speaks another format version.
    #[error("unsupported migration format version {0} (this build speaks {FORMAT_VERSION})")]
    Version(u32),
    /// Unknown record type.
    #[error("unknown record type {0}")]
    UnknownType(u8),
    /// A payload is longer than its type allows, or has the wrong size for its contents.
    #[error("{kind} record has an invalid length of {len} bytes")]
    BadLength {
        /// Record kind.
        kind: &'static str,
        /// Payload length announced.
        len: usize,
    },
    /// The checksum does not match: the stream is corrupt.
    #[error("checksum mismatch in a {kind} record: the stream is corrupt")]
    Checksum {
        /// Record kind.
        kind: &'static str,
    },
    /// A field holds a value the format does not allow.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// A compressed record on a connection whose compression was not agreed.
    #[error("compressed pages on a connection without compression")]
    NotNegotiated,
    /// A compressed record's frame is corrupt or does not hold exactly its pages.
    #[error("a zstd-pages record's frame is corrupt or does not hold its {pages} pages")]
    BadFrame {
        /// Pages the record announced.
        pages: usize,
    },
}

/// Record type codes.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Source -> destination: the migration's parameters.
    Hello = 1,
    /// Destination -> source: accepts the parameters.
    HelloReply = 2,
    /// A batch of full pages.
    Pages = 3,
    /// Runs of pages that are all zero.
    ZeroRuns = 4,
    /// The VMM's vCPU and device state.
    DeviceState = 5,
    /// The end of a precopy round on this connection.
    EndOfRound = 6,
    /// The source finished; totals for the destination to check.
    Complete = 7,
    /// Destination -> source: everything arrived and was applied.
    Ack = 8,
    /// Either side: the migration failed, with a reason.
    Error = 9,
    /// Destination -> source: every connection's records up to its end of a round are in
    /// guest memory.
    RoundApplied = 10,
    /// Pages whose data is one zstd frame (only when the handshake agreed on zstd).
    ZstdPages = 11,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::HelloReply,
            3 => Self::Pages,
            4 => Self::ZeroRuns,
            5 => Self::DeviceState,
            6 => Self::EndOfRound,
            7 => Self::Complete,
            8 => Self::Ack,
            9 => Self::Error,
            10 => Self::RoundApplied,
            11 => Self::ZstdPages,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Hello => "hello",
            Self::HelloReply => "hello-reply",
            Self::Pages => "pages",
            Self::ZeroRuns => "zero-runs",
            Self::DeviceState => "device-state",
            Self::EndOfRound => "end-of-round",
            Self::Complete => "complete",
            Self::Ack => "ack",
            Self::Error => "error",
            Self::RoundApplied => "round-applied",
            Self::ZstdPages => "zstd-pages",
        }
    }

    /// The largest payload this record type may have.
    fn payload_max(self) -> usize {
        match self {
            Self::Hello => HELLO_FIXED + REGIONS_MAX * 16 + DESCRIPTION_BYTES_MAX,
            Self::HelloReply => 8,
            Self::Pages => 8 + PAGES_PER_RECORD_MAX * (PAGE + 8),
            Self::ZeroRuns => 8 + ZERO_RUNS_PER_RECORD_MAX * 16,
            Self::DeviceState => DEVICE_STATE_BYTES_MAX,
            Self::EndOfRound => 8,
            Self::Complete => 32,
            Self::Ack => 40,
            Self::Error => ERROR_BYTES_MAX,
            Self::RoundApplied => 8,
            // Never larger than the `Pages` record it replaces.
            Self::ZstdPages => 8 + PAGES_PER_RECORD_MAX * (PAGE + 8),
        }
    }
}

/// The parameters the source announces on each connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Index of this connection, `0..connections`.
    pub connection: u16,
    /// Number of connections of this migration.
    pub connections: u16,
    /// Page size; must be [`PAGE_SIZE`].
    pub page_size: u32,
    /// Guest RAM layout; the destination must have the same.
    pub regions: Vec<RegionDesc>,
    /// What the destination needs to build the empty VM the migration goes into, in a form
    /// only the VMMs at both ends know (the engine carries it, it does not read it). Sent on
    /// connection 0; at most [`DESCRIPTION_BYTES_MAX`] bytes.
    pub description: Vec<u8>,
    /// The compression the source offers for page data.
    pub compression: Codec,
}

/// Bytes of a `Hello` payload before its regions.
const HELLO_FIXED: usize = 24;

/// What the destination answers to [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloReply {
    /// The destination's guest RAM is all zero, so zero pages need not be sent.
    pub zeroed: bool,
    /// The compression the destination accepts: the source's offer, or none.
    pub compression: Codec,
}

/// Totals per connection, sent by the source in `Complete` and checked by the destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// `Pages` records.
    pub page_records: u64,
    /// Pages carried with data.
    pub pages: u64,
    /// Pages carried as zero runs.
    pub zero_pages: u64,
    /// Rounds ended.
    pub rounds: u64,
}

/// What the destination acknowledges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ack {
    /// The totals over every connection.
    pub summary: Summary,
    /// Microseconds the destination took from the last `Complete` to this `Ack` (restoring
    /// the VM there): the destination's share of the downtime.
    pub destination_us: u64,
}

/// A decoded record, borrowing from the reader's buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloReply`].
    HelloReply(HelloReply),
    /// Full pages: `data` holds one page per address in `gpas`, in order.
    Pages {
        /// Little-endian u64 guest-physical addresses, 8 bytes each.
        gpas: GpaList<'a>,
        /// Page contents, `PAGE_SIZE` bytes per page.
        data: &'a [u8],
    },
    /// Runs of zero pages.
    ZeroRuns(RunList<'a>),
    /// The VMM's state blob.
    DeviceState(&'a [u8]),
    /// End of round `round` on this connection.
    EndOfRound(u32),
    /// The source's totals for this connection.
    Complete(Summary),
    /// The destination applied everything.
    Ack(Ack),
    /// The peer failed.
    Error(String),
    /// The destination applied round `n` on every connection.
    RoundApplied(u32),
}

/// A list of little-endian u64 guest-physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpaList<'a>(&'a [u8]);

impl GpaList<'_> {
    /// Number of addresses.
    pub fn len(&self) -> usize {
        self.0.len() / 8
    }
    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The addresses.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.chunks_exact(8).map(le64)
    }
}

/// A list of `(gpa, pages)` runs, little-endian u64 pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunList<'a>(&'a [u8]);

impl RunList<'_> {
    /// Number of runs.
    pub fn len(&self) -> usize {
        self.0.len() / 16
    }
    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The runs as `(gpa, pages)`.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0
            .chunks_exact(16)
            .map(|c| (le64(&c[..8]), le64(&c[8..])))
    }
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Writes the preamble for one direction.
pub fn write_preamble(w: &mut impl Write, magic: [u8; 8]) -> io::Result<()> {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..8].copy_from_slice(&magic);
    p[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    w.write_all(&p)
}

/// Reads and checks the preamble for one direction.
pub fn read_preamble(r: &mut impl Read, magic: [u8; 8]) -> Result<(), WireError> {
    // A TLS record (handshake or alert) starts with its type and major version 3; a TLS
    // alert is shorter than a preamble, so the check also applies to a cut one.
    let speaks_tls = |b: &[u8]| matches!(b, [0x15 | 0x16, 0x03, 0x01..=0x04, ..]);
    let mut p = [0u8; PREAMBLE_LEN];
    let mut filled = 0;
    while filled < PREAMBLE_LEN {
        match r.read(&mut p[filled..]) {
            Ok(0) if speaks_tls(&p[..filled]) => return Err(WireError::PeerSpeaksTls),
            Ok(0) => {
                return Err(WireError::Truncated {
                    what: "the stream's preamble".into(),
                })
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut got = [0u8; 8];
    got.copy_from_slice(&p[..8]);
    if got != magic {
        if speaks_tls(&got) {
            return Err(WireError::PeerSpeaksTls);
        }
        return Err(WireError::BadMagic(got));
    }
    match le32(&p[8..12]) {
        FORMAT_VERSION => Ok(()),
        v => Err(WireError::Version(v)),
    }
}

/// Builds records into a reusable byte buffer.
///
/// `Pages` records are built incrementally ([`begin_pages`](Self::begin_pages),
/// [`page_slot`](Self::page_slot), [`finish_pages`](Self::finish_pages)) so that page data
/// is read from guest memory straight into the outgoing buffer.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
    gpas: Vec<u64>,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// The encoded bytes so far.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Takes the encoded bytes, leaving the encoder empty (its buffer is handed over).
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Takes the encoded bytes and continues in `next` (cleared), e.g. a buffer that was
    /// written out and came back, so steady-state encoding does not allocate.
    pub fn take_into(&mut self, mut next: Vec<u8>) -> Vec<u8> {
        next.clear();
        std::mem::replace(&mut self.buf, next)
    }

    fn start(&mut self, kind: Kind) -> usize {
        let at = self.buf.len();
        self.buf
            .extend_from_slice(&[kind as u8, 0, 0, 0, 0, 0, 0, 0]);
        at
    }

    fn finish(&mut self, at: usize) {
        let len = (self.buf.len() - at - HEADER_LEN) as u32;
        self.buf[at + 4..at + 8].copy_from_slice(&len.to_le_bytes());
        let crc = crc32fast::hash(&self.buf[at..]);
        self.buf.extend_from_slice(&crc.to_le_bytes());
    }

    fn simple(&mut self, kind: Kind, payload: &[u8]) {
        let at = self.start(kind);
        self.buf.extend_from_slice(payload);
        self.finish(at);
    }

    /// Appends a `Hello`.
    pub fn hello(&mut self, h: &Hello) {
        debug_assert!(h.description.len() <= DESCRIPTION_BYTES_MAX);
        let mut p = Vec::with_capacity(HELLO_FIXED + h.regions.len() * 16 + h.description.len());
        p.extend_from_slice(&h.connection.to_le_bytes());
        p.extend_from_slice(&h.connections.to_le_bytes());
        p.extend_from_slice(&h.page_size.to_le_bytes());
        p.extend_from_slice(&(h.regions.len() as u32).to_le_bytes());
        p.extend_from_slice(&(h.description.len() as u32).to_le_bytes());
        p.extend_from_slice(&(h.compression as u32).to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for r in &h.regions {
            p.extend_from_slice(&r.gpa.to_le_bytes());
            p.extend_from_slice(&r.size.to_le_bytes());
        }
        p.extend_from_slice(&h.description);
        self.simple(Kind::Hello, &p);
    }

    /// Appends a `HelloReply`.
    pub fn hello_reply(&mut self, r: HelloReply) {
        let mut p = [0u8; 8];
        p[..4].copy_from_slice(&u32::from(r.zeroed).to_le_bytes());
        p[4..].copy_from_slice(&(r.compression as u32).to_le_bytes());
        self.simple(Kind::HelloReply, &p);
    }

    /// Starts a `Pages` record; add pages with [`page_slot`](Self::page_slot).
    pub fn begin_pages(&mut self) -> usize {
        self.gpas.clear();
        let at = self.start(Kind::Pages);
        self.buf.extend_from_slice(&[0u8; 8]);
        at
    }

    /// Number of pages in the open `Pages` record.
    pub fn pages_in_record(&self) -> usize {
        self.gpas.len()
    }

    /// Appends room for one page at `gpa` to the open `Pages` record and returns it to be
    /// filled. [`unpage`](Self::unpage) takes it back out (e.g. when it turned out all zero).
    pub fn page_slot(&mut self, gpa: u64) -> &mut [u8] {
        debug_assert!(self.gpas.len() < PAGES_PER_RECORD_MAX);
        self.gpas.push(gpa);
        let at = self.buf.len();
        self.buf.resize(at + PAGE, 0);
        &mut self.buf[at..]
    }

    /// Removes the page most recently added with [`page_slot`](Self::page_slot).
    pub fn unpage(&mut self) {
        if self.gpas.pop().is_some() {
            self.buf.truncate(self.buf.len() - PAGE);
        }
    }

    /// Closes the `Pages` record started at `at`; an empty record is removed entirely.
    pub fn finish_pages(&mut self, at: usize) {
        if self.gpas.is_empty() {
            self.buf.truncate(at);
            return;
        }
        let count = self.gpas.len() as u32;
        self.buf[at + HEADER_LEN..at + HEADER_LEN + 4].copy_from_slice(&count.to_le_bytes());
        for g in &self.gpas {
            self.buf.extend_from_slice(&g.to_le_bytes());
        }
        self.gpas.clear();
        self.finish(at);
    }

    /// Appends a `ZeroRuns` record. At most [`ZERO_RUNS_PER_RECORD_MAX`] runs.
    pub fn zero_runs(&mut self, runs: &[(u64, u64)]) {
        debug_assert!(runs.len() <= ZERO_RUNS_PER_RECORD_MAX);
        let at = self.start(Kind::ZeroRuns);
        self.buf
            .extend_from_slice(&(runs.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        for &(gpa, pages) in runs {
            self.buf.extend_from_slice(&gpa.to_le_bytes());
            self.buf.extend_from_slice(&pages.to_le_bytes());
        }
        self.finish(at);
    }

    /// Appends a `DeviceState` record. The caller keeps `state` under the size limit.
    pub fn device_state(&mut self, state: &[u8]) {
        self.simple(Kind::DeviceState, state);
    }

    /// Appends a `RoundApplied`.
    pub fn round_applied(&mut self, round: u32) {
        self.simple(Kind::RoundApplied, &u64::from(round).to_le_bytes());
    }

    /// Appends an `EndOfRound`.
    pub fn end_of_round(&mut self, round: u32) {
        self.simple(Kind::EndOfRound, &u64::from(round).to_le_bytes());
    }

    fn summary(s: Summary) -> [u8; 32] {
        let mut p = [0u8; 32];
        for (i, v) in [s.page_records, s.pages, s.zero_pages, s.rounds]
            .iter()
            .enumerate()
        {
            p[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        p
    }

    /// Appends a `Complete`.
    pub fn complete(&mut self, s: Summary) {
        self.simple(Kind::Complete, &Self::summary(s));
    }

    /// Appends an `Ack`.
    pub fn ack(&mut self, a: Ack) {
        let mut p = [0u8; 40];
        p[..32].copy_from_slice(&Self::summary(a.summary));
        p[32..].copy_from_slice(&a.destination_us.to_le_bytes());
        self.simple(Kind::Ack, &p);
    }

    /// Appends an `Error`, truncating the message to the limit.
    pub fn error(&mut self, msg: &str) {
        let mut end = msg.len().min(ERROR_BYTES_MAX);
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        self.simple(Kind::Error, &msg.as_bytes()[..end]);
    }
}

/// Reads records from a stream into a reusable, bounded buffer.
#[derive(Debug)]
pub struct Decoder<R> {
    r: R,
    buf: Vec<u8>,
    /// With zstd agreed: the decompressor and the pages of the last `ZstdPages` record.
    zstd: Option<(PageDecompressor, Vec<u8>)>,
}

impl<R: Read> Decoder<R> {
    /// A decoder reading from `r` (after the preamble).
    pub fn new(r: R) -> Self {
        Self {
            r,
            buf: Vec::new(),
            zstd: None,
        }
    }

    /// Accepts records compressed with `codec` (agreed in the handshake); they are returned
    /// as the `Pages` records they stand for. Without this, a compressed record is an error.
    pub fn accept(mut self, codec: Codec) -> io::Result<Self> {
        self.zstd = match codec {
            Codec::None => None,
            Codec::Zstd => Some((PageDecompressor::new()?, Vec::new())),
        };
        Ok(self)
    }

    /// The underlying reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }

    /// Reads the next record. A clean end of stream before a record header is
    /// [`WireError::Closed`].
    pub fn next_record(&mut self) -> Result<Record<'_>, WireError> {
        let Self { r, buf, zstd } = self;
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match r.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Err(WireError::Closed),
                Ok(0) => {
                    return Err(WireError::Truncated {
                        what: "a record header".into(),
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let kind = Kind::from_u8(header[0]).ok_or(WireError::UnknownType(header[0]))?;
        if header[1] != 0 || header[2] != 0 || header[3] != 0 {
            return Err(WireError::Invalid("record flags"));
        }
        let len = le32(&header[4..]) as usize;
        if len > kind.payload_max() {
            return Err(WireError::BadLength {
                kind: kind.name(),
                len,
            });
        }
        // The buffer only grows (up to the largest record seen, itself bounded), so steady
        // state reads do not clear or reallocate it.
        if buf.len() < len + 4 {
            buf.resize(len + 4, 0);
        }
        let buf = &mut buf[..len + 4];
        r.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => WireError::Truncated {
                what: format!("a record ({})", kind.name()),
            },
            _ => e.into(),
        })?;
        let (payload, crc) = buf.split_at(len);
        let mut h = crc32fast::Hasher::new();
        h.update(&header);
        h.update(payload);
        if h.finalize() != le32(crc) {
            return Err(WireError::Checksum { kind: kind.name() });
        }
        if kind == Kind::ZstdPages {
            let (z, pages) = zstd.as_mut().ok_or(WireError::NotNegotiated)?;
            return zstd_pages(payload, z, pages);
        }
        parse(kind, payload)
    }
}

/// Decompresses a checksummed `ZstdPages` payload into `pages` (grown as needed, up to one
/// record's worth) and returns it as the `Pages` record it stands for.
fn zstd_pages<'a>(
    p: &'a [u8],
    z: &mut PageDecompressor,
    pages: &'a mut Vec<u8>,
) -> Result<Record<'a>, WireError> {
    let bad = || WireError::BadLength {
        kind: Kind::ZstdPages.name(),
        len: p.len(),
    };
    if p.len() < 8 {
        return Err(bad());
    }
    let n = le32(p) as usize;
    let frame_len = le32(&p[4..]) as usize;
    if n == 0 || n > PAGES_PER_RECORD_MAX || p.len() != 8 + n * 8 + frame_len {
        return Err(bad());
    }
    let (gpas, frame) = p[8..].split_at(n * 8);
    if pages.len() < n * PAGE {
        pages.resize(n * PAGE, 0);
    }
    let data = &mut pages[..n * PAGE];
    if !z.decompress(frame, data) {
        return Err(WireError::BadFrame { pages: n });
    }
    Ok(Record::Pages {
        gpas: GpaList(gpas),
        data,
    })
}

/// Parses a checksummed payload of `kind`.
fn parse(kind: Kind, p: &[u8]) -> Result<Record<'_>, WireError> {
    let bad = || WireError::BadLength {
        kind: kind.name(),
        len: p.len(),
    };
    Ok(match kind {
        Kind::Hello => {
            if p.len() < HELLO_FIXED {
                return Err(bad());
            }
            let n = le32(&p[8..12]) as usize;
            let d = le32(&p[12..16]) as usize;
            if n > REGIONS_MAX || d > DESCRIPTION_BYTES_MAX || p.len() != HELLO_FIXED + n * 16 + d {
                return Err(bad());
            }
            let compression =
                Codec::from_u32(le32(&p[16..20])).ok_or(WireError::Invalid("compression"))?;
            if le32(&p[20..24]) != 0 {
                return Err(WireError::Invalid("hello reserved field"));
            }
            let (regions, description) = p[HELLO_FIXED..].split_at(n * 16);
            let regions = regions
                .chunks_exact(16)
                .map(|c| RegionDesc {
                    gpa: le64(&c[..8]),
                    size: le64(&c[8..]),
                })
                .collect();
            Record::Hello(Hello {
                connection: u16::from_le_bytes([p[0], p[1]]),
                connections: u16::from_le_bytes([p[2], p[3]]),
                page_size: le32(&p[4..8]),
                regions,
                description: description.to_vec(),
                compression,
            })
        }
        Kind::HelloReply => {
            if p.len() != 8 {
                return Err(bad());
            }
            let zeroed = match le32(p) {
                0 => false,
                1 => true,
                _ => return Err(WireError::Invalid("hello-reply flags")),
            };
            let compression =
                Codec::from_u32(le32(&p[4..])).ok_or(WireError::Invalid("compression"))?;
            Record::HelloReply(HelloReply {
                zeroed,
                compression,
            })
        }
        Kind::Pages => {
            if p.len() < 8 {
                return Err(bad());
            }
            let n = le32(p) as usize;
            if n == 0 || n > PAGES_PER_RECORD_MAX || p.len() != 8 + n * (PAGE + 8) {
                return Err(bad());
            }
            let (data, gpas) = p[8..].split_at(n * PAGE);
            Record::Pages {
                gpas: GpaList(gpas),
                data,
            }
        }
        Kind::ZeroRuns => {
            if p.len() < 8 {
                return Err(bad());
            }
            let n = le32(p) as usize;
            if n > ZERO_RUNS_PER_RECORD_MAX || p.len() != 8 + n * 16 {
                return Err(bad());
            }
            Record::ZeroRuns(RunList(&p[8..]))
        }
        Kind::DeviceState => Record::DeviceState(p),
        Kind::EndOfRound | Kind::RoundApplied => {
            if p.len() != 8 {
                return Err(bad());
            }
            let round = u32::try_from(le64(p)).map_err(|_| WireError::Invalid("round number"))?;
            if kind == Kind::EndOfRound {
                Record::EndOfRound(round)
            } else {
                Record::RoundApplied(round)
            }
        }
        Kind::Complete | Kind::Ack => {
            let want = if kind == Kind::Ack { 40 } else { 32 };
            if p.len() != want {
                return Err(bad());
            }
            let s = Summary {
                page_records: le64(&p[0..]),
                pages: le64(&p[8..]),
                zero_pages: le64(&p[16..]),
                rounds: le64(&p[24..]),
            };
            if kind == Kind::Ack {
                Record::Ack(Ack {
                    summary: s,
                    destination_us: le64(&p[32..]),
                })
            } else {
                Record::Complete(s)
            }
        }
        Kind::Error => Record::Error(String::from_utf8_lossy(p).into_owned()),
        // Decoded by the decoder, which holds the decompressor.
        Kind::ZstdPages => return Err(WireError::NotNegotiated),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(bytes: &[u8]) -> Vec<String> {
        let mut d = Decoder::new(bytes);
        let mut out = Vec::new();
        loop {
            match d.next_record() {
                Ok(r) => out.push(format!("{r:?}")),
                Err(WireError::Closed) => return out,
                Err(e) => {
                    out.push(format!("error: {e}"));
                    return out;
                }
            }
        }
    }

    #[test]
    fn every_record_round_trips() {
        let mut e = Encoder::new();
        let hello = Hello {
            connection: 1,
            connections: 2,
            page_size: 4096,
            regions: vec![RegionDesc {
                gpa: 0,
                size: 1 << 20,
            }],
            description: b"{\"vcpus\":2}".to_vec(),
            compression: Codec::Zstd,
        };
        e.hello(&hello);
        let reply = HelloReply {
            zeroed: true,
            compression: Codec::Zstd,
        };
        e.hello_reply(reply);
        let at = e.begin_pages();
        e.page_slot(0x1000).fill(7);
        e.page_slot(0x3000).fill(9);
        e.page_slot(0x5000).fill(0);
        e.unpage();
        e.finish_pages(at);
        let at = e.begin_pages();
        e.finish_pages(at); // empty: vanishes
        e.zero_runs(&[(0x2000, 3)]);
        e.device_state(b"state");
        e.end_of_round(4);
        let s = Summary {
            page_records: 1,
            pages: 2,
            zero_pages: 3,
            rounds: 5,
        };
        e.complete(s);
        let ack = Ack {
            summary: s,
            destination_us: 1234,
        };
        e.ack(ack);
        e.error("boom");
        e.round_applied(3);
        let bytes = e.take();
        let mut d = Decoder::new(&bytes[..]);
        assert_eq!(d.next_record().unwrap(), Record::Hello(hello));
        assert_eq!(d.next_record().unwrap(), Record::HelloReply(reply));
        match d.next_record().unwrap() {
            Record::Pages { gpas, data } => {
                assert_eq!(gpas.iter().collect::<Vec<_>>(), vec![0x1000, 0x3000]);
                assert!(data[..4096].iter().all(|&b| b == 7));
                assert!(data[4096..].iter().all(|&b| b == 9));
            }
            r => panic!("expected pages, got {r:?}"),
        }
        match d.next_record().unwrap() {
            Record::ZeroRuns(runs) => assert_eq!(runs.iter().collect::<Vec<_>>(), [(0x2000, 3)]),
            r => panic!("expected zero runs, got {r:?}"),
        }
        assert_eq!(d.next_record().unwrap(), Record::DeviceState(b"state"));
        assert_eq!(d.next_record().unwrap(), Record::EndOfRound(4));
        assert_eq!(d.next_record().unwrap(), Record::Complete(s));
        assert_eq!(d.next_record().unwrap(), Record::Ack(ack));
        assert_eq!(d.next_record().unwrap(), Record::Error("boom".into()));
        assert_eq!(d.next_record().unwrap(), Record::RoundApplied(3));
        assert!(matches!(d.next_record(), Err(WireError::Closed)));
    }

    #[test]
    fn corruption_is_detected() {
        let mut e = Encoder::new();
        e.end_of_round(1);
        let mut bytes = e.take();
        bytes[9] ^= 1;
        assert!(matches!(
            Decoder::new(&bytes[..]).next_record(),
            Err(WireError::Checksum {
                kind: "end-of-round"
            })
        ));
    }

    #[test]
    fn a_hello_description_must_fit_its_length_and_limit() {
        let hello = |regions: u32, description: u32, extra: usize| {
            let mut p = vec![0u8; 8];
            p.extend_from_slice(&regions.to_le_bytes());
            p.extend_from_slice(&description.to_le_bytes());
            p.extend_from_slice(&[0u8; 8]); // no compression, reserved
            p.resize(p.len() + regions as usize * 16 + extra, 0);
            let mut e = Encoder::new();
            e.simple(Kind::Hello, &p);
            e.take()
        };
        let parse = |b: Vec<u8>| match Decoder::new(&b[..]).next_record() {
            Ok(Record::Hello(h)) => Ok(h.description.len()),
            Ok(r) => panic!("{r:?}"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(parse(hello(1, 3, 3)), Ok(3));
        assert_eq!(parse(hello(1, 0, 0)), Ok(0));
        // Announced and carried lengths disagree.
        for (n, d, extra) in [(1, 3, 2), (1, 3, 4), (1, 0, 1)] {
            assert!(parse(hello(n, d, extra))
                .unwrap_err()
                .contains("invalid length"));
        }
        // Over the limit, even if the bytes are there.
        let over = DESCRIPTION_BYTES_MAX as u32 + 1;
        assert!(parse(hello(0, over, over as usize))
            .unwrap_err()
            .contains("invalid length"));
        assert_eq!(
            parse(hello(
                0,
                DESCRIPTION_BYTES_MAX as u32,
                DESCRIPTION_BYTES_MAX
            )),
            Ok(DESCRIPTION_BYTES_MAX)
        );
    }

    #[test]
    fn oversized_lengths_are_refused_before_reading() {
        let mut header = vec![Kind::DeviceState as u8, 0, 0, 0];
        header.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Decoder::new(&header[..]).next_record(),
            Err(WireError::BadLength {
                kind: "device-state",
                ..
            })
        ));
    }

    #[test]
    fn preamble_checks_magic_and_version() {
        let mut v = Vec::new();
        write_preamble(&mut v, MAGIC_SOURCE).unwrap();
        assert!(read_preamble(&mut &v[..], MAGIC_SOURCE).is_ok());
        assert_eq!(
            read_preamble(&mut &v[..5], MAGIC_SOURCE)
                .unwrap_err()
                .to_string(),
            "the connection ended in the middle of the stream's preamble"
        );
        assert!(matches!(
            read_preamble(&mut &v[..], MAGIC_DEST),
            Err(WireError::BadMagic(_))
        ));
        // A TLS peer's first bytes (a ClientHello, or an alert) are named as such.
        // A ClientHello, and an alert (7 bytes, then the connection ends).
        let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00];
        hello.resize(PREAMBLE_LEN, 0);
        let alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32];
        for t in [&hello[..], &alert[..]] {
            assert!(matches!(
                read_preamble(&mut &t[..], MAGIC_DEST),
                Err(WireError::PeerSpeaksTls)
            ));
        }
        // A peer of the first format (before the Hello carried a VM description).
        v[8] = 1;
        assert!(matches!(
            read_preamble(&mut &v[..], MAGIC_SOURCE),
            Err(WireError::Version(1))
        ));
    }

    #[test]
    fn truncation_is_an_error_not_a_clean_close() {
        let mut e = Encoder::new();
        e.end_of_round(1);
        let bytes = e.take();
        for cut in 1..bytes.len() {
            let out = decode_all(&bytes[..cut]);
            assert_eq!(out.len(), 1, "cut at {cut}");
            let want = if cut < HEADER_LEN {
                "error: the connection ended in the middle of a record header"
            } else {
                "error: the connection ended in the middle of a record (end-of-round)"
            };
            assert_eq!(out, [want], "cut at {cut}");
        }
    }

    /// Records with three `Pages` records: compressible, incompressible, compressible.
    fn page_records() -> Vec<u8> {
        let mut e = Encoder::new();
        let mut noise = 0x9e37_79b9_7f4a_7c15u64;
        for (record, first) in [(0u64, 0u64), (1, 100), (2, 200)] {
            let at = e.begin_pages();
            for p in first..first + 3 {
                let slot = e.page_slot(p * PAGE_SIZE);
                for (i, b) in slot.iter_mut().enumerate() {
                    *b = if record == 1 {
                        noise ^= noise << 13;
                        noise ^= noise >> 7;
                        noise ^= noise << 17;
                        noise as u8
                    } else {
                        (i % 7) as u8 + p as u8
                    };
                }
            }
            e.finish_pages(at);
        }
        e.zero_runs(&[(0x10_0000, 2)]);
        e.end_of_round(0);
        e.take()
    }

    fn compressed(plain: &[u8]) -> Vec<u8> {
        crate::compress::PageCompressor::new(1)
            .unwrap()
            .compress(plain)
            .unwrap()
            .to_vec()
    }

    #[test]
    fn compressed_pages_decode_to_the_records_they_replace() {
        let plain = page_records();
        let zipped = compressed(&plain);
        assert!(
            zipped.len() < plain.len() * 2 / 3,
            "compressible pages shrink: {} of {} bytes",
            zipped.len(),
            plain.len()
        );
        // Compressible records became zstd-pages, the incompressible one stayed as it was.
        let kinds: Vec<u8> = {
            let mut at = 0;
            let mut kinds = Vec::new();
            while at < zipped.len() {
                kinds.push(zipped[at]);
                at += HEADER_LEN + le32(&zipped[at + 4..]) as usize + 4;
            }
            kinds
        };
        let (z, p) = (Kind::ZstdPages as u8, Kind::Pages as u8);
        assert_eq!(&kinds[..3], &[z, p, z]);
        let mut d = Decoder::new(&zipped[..]).accept(Codec::Zstd).unwrap();
        assert_eq!(
            decode_all(&plain),
            std::iter::from_fn(|| match d.next_record() {
                Ok(r) => Some(format!("{r:?}")),
                Err(WireError::Closed) => None,
                Err(e) => Some(format!("error: {e}")),
            })
            .collect::<Vec<_>>()
        );
    }

    #[test]
    fn compressed_pages_need_the_handshake_and_an_honest_frame() {
        let zipped = compressed(&page_records());
        let out = decode_all(&zipped);
        assert_eq!(
            out.first().map(String::as_str),
            Some("error: compressed pages on a connection without compression")
        );
        // A frame holding one page more than the record announces, checksummed correctly.
        let mut e = Encoder::new();
        e.simple(Kind::ZstdPages, &{
            let frame = zstd::bulk::compress(&[5u8; 2 * PAGE], 1).unwrap();
            let mut p = Vec::new();
            p.extend_from_slice(&1u32.to_le_bytes());
            p.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            p.extend_from_slice(&0u64.to_le_bytes());
            p.extend_from_slice(&frame);
            p
        });
        let bytes = e.take();
        let mut d = Decoder::new(&bytes[..]).accept(Codec::Zstd).unwrap();
        assert!(matches!(
            d.next_record(),
            Err(WireError::BadFrame { pages: 1 })
        ));
    }

    proptest! {
        #[test]
        fn mutated_compressed_streams_never_panic(idx in 0usize..40_000, val in any::<u8>()) {
            let mut bytes = compressed(&page_records());
            let i = idx % bytes.len();
            bytes[i] = val;
            let mut d = Decoder::new(&bytes[..]).accept(Codec::Zstd).unwrap();
            while d.next_record().is_ok() {}
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            decode_all(&bytes);
        }

        #[test]
        fn mutated_valid_streams_never_panic(idx in 0usize..200, val in any::<u8>()) {
            let mut e = Encoder::new();
            e.hello(&Hello { connection: 0, connections: 1, page_size: 4096,
                regions: vec![RegionDesc { gpa: 0, size: 8192 }], description: vec![1, 2],
                compression: Codec::None });
            e.zero_runs(&[(0, 1), (4096, 1)]);
            e.end_of_round(0);
            let mut bytes = e.take();
            let i = idx % bytes.len();
            bytes[i] = val;
            decode_all(&bytes);
        }
    }
}
