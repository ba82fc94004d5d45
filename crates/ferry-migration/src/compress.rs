//! Optional compression of page data on the stream (zstd), negotiated in the handshake.
//!
//! The source offers a codec in its `Hello`; the destination accepts it or not in its
//! `HelloReply` (a destination may refuse to spend CPU on decompression), and the source
//! compresses only what was accepted. Compression happens on each connection's writer thread,
//! after the migration thread encoded the records, so several connections compress in
//! parallel and the scan never waits on the compressor.
//!
//! Only the page data of a `Pages` record is compressed, as one zstd frame per record
//! (at most 2 MiB of pages), into a `ZstdPages` record. A record whose pages do not get
//! smaller is sent as it was, so incompressible memory costs the destination nothing and the
//! stream never grows. Decompression is bounded by the record's page count: a frame that
//! would produce more or fewer bytes than its pages is a protocol error, never a larger
//! allocation.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::layout::PAGE_SIZE;
use crate::wire::{Kind, HEADER_LEN, PAGES_PER_RECORD_MAX};

const PAGE: usize = PAGE_SIZE as usize;

/// Compression of page data on the migration stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Pages travel as they are.
    #[default]
    None,
    /// zstd at `level` (1 is fastest; 3 is zstd's default). Worth it when the link, not the
    /// CPU, limits the migration.
    Zstd {
        /// zstd compression level, 1 to 19.
        level: i32,
    },
}

/// zstd's levels that suit a live migration (faster than the link at 1, smaller at 19).
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=19;
/// The level `zstd` alone means.
pub const ZSTD_LEVEL_DEFAULT: i32 = 1;

impl Compression {
    /// The codec this compression uses on the wire.
    pub fn codec(self) -> Codec {
        match self {
            Self::None => Codec::None,
            Self::Zstd { .. } => Codec::Zstd,
        }
    }

    /// Checks the level.
    pub fn validate(self) -> Result<Self, String> {
        match self {
            Self::Zstd { level } if !ZSTD_LEVELS.contains(&level) => Err(format!(
                "zstd level {level} is not between {} and {}",
                ZSTD_LEVELS.start(),
                ZSTD_LEVELS.end()
            )),
            c => Ok(c),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

impl FromStr for Compression {
    type Err = String;

    /// `none`, `zstd` (level [`ZSTD_LEVEL_DEFAULT`]) or `zstd:LEVEL`.
    fn from_str(s: &str) -> Result<Self, String> {
        let c = match s.split_once(':') {
            None if s == "none" => Self::None,
            None if s == "zstd" => Self::Zstd {
                level: ZSTD_LEVEL_DEFAULT,
            },
            Some(("zstd", level)) => Self::Zstd {
                level: level
                    .parse()
                    .map_err(|_| format!("zstd level {level:?} is not a number"))?,
            },
            _ => {
                return Err(format!(
                    "unknown compression {s:?}: none, zstd or zstd:LEVEL"
                ))
            }
        };
        c.validate()
    }
}

/// A codec as the handshake names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(u32)]
pub enum Codec {
    /// No compression.
    #[default]
    None = 0,
    /// zstd frames in `ZstdPages` records.
    Zstd = 1,
}

impl Codec {
    /// The codec with wire code `v`, if this build knows it.
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// Rewrites a connection's encoded records, compressing the page data of each `Pages`
/// record that gets smaller (one per writer thread; it keeps its zstd context and buffers).
pub struct PageCompressor {
    zstd: zstd::bulk::Compressor<'static>,
    frame: Vec<u8>,
    out: Vec<u8>,
}

impl fmt::Debug for PageCompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageCompressor").finish_non_exhaustive()
    }
}

impl PageCompressor {
    /// A compressor at `level`.
    pub fn new(level: i32) -> std::io::Result<Self> {
        Ok(Self {
            zstd: zstd::bulk::Compressor::new(level)?,
            frame: Vec::with_capacity(PAGES_PER_RECORD_MAX * PAGE),
            out: Vec::new(),
        })
    }

    /// The records of `records` (whole records, as the encoder built them) with page data
    /// compressed where it got smaller. Borrowed until the next call.
    pub fn compress(&mut self, records: &[u8]) -> std::io::Result<&[u8]> {
        self.out.clear();
        let mut rest = records;
        while !rest.is_empty() {
            let len = record_len(rest)?;
            let (record, tail) = rest.split_at(len);
            rest = tail;
            if record[0] != Kind::Pages as u8 || !self.compress_pages(record)? {
                self.out.extend_from_slice(record);
            }
        }
        Ok(&self.out)
    }

    /// Appends `record` (a `Pages` record) as a `ZstdPages` record if that is smaller;
    /// returns whether it did.
    fn compress_pages(&mut self, record: &[u8]) -> std::io::Result<bool> {
        let payload = &record[HEADER_LEN..record.len() - 4];
        let n = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
        let (data, gpas) = payload[8..].split_at(n * PAGE);
        // The output may not exceed the data: what does not fit is sent uncompressed.
        self.frame.clear();
        self.frame.reserve(data.len());
        let frame_len = match self.zstd.compress_to_buffer(data, &mut self.frame) {
            Ok(len) => len,
            Err(_) => return Ok(false),
        };
        // Header, count, frame length, addresses, frame, crc.
        if HEADER_LEN + 8 + gpas.len() + frame_len + 4 >= record.len() {
            return Ok(false);
        }
        let at = self.out.len();
        let payload_len = (8 + gpas.len() + frame_len) as u32;
        self.out
            .extend_from_slice(&[Kind::ZstdPages as u8, 0, 0, 0]);
        self.out.extend_from_slice(&payload_len.to_le_bytes());
        self.out.extend_from_slice(&(n as u32).to_le_bytes());
        self.out
            .extend_from_slice(&(frame_len as u32).to_le_bytes());
        self.out.extend_from_slice(gpas);
        self.out.extend_from_slice(&self.frame[..frame_len]);
        let crc = crc32fast::hash(&self.out[at..]);
        self.out.extend_from_slice(&crc.to_le_bytes());
        Ok(true)
    }
}

/// The length of the whole record (header, payload, crc) at the start of `b`.
fn record_len(b: &[u8]) -> std::io::Result<usize> {
    let bad = || std::io::Error::other("the encoder's buffer does not hold whole records");
    let header = b.get(..HEADER_LEN).ok_or_else(bad)?;
    let len =
        HEADER_LEN + u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize + 4;
    if len > b.len() {
        return Err(bad());
    }
    Ok(len)
}

/// Decompresses the frames of `ZstdPages` records (one per connection).
pub struct PageDecompressor {
    zstd: zstd::bulk::Decompressor<'static>,
}

impl fmt::Debug for PageDecompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageDecompressor").finish_non_exhaustive()
    }
}

impl PageDecompressor {
    /// A decompressor.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            zstd: zstd::bulk::Decompressor::new()?,
        })
    }

    /// Decompresses `frame` into `out`, which it must fill exactly; false if the frame is
    /// corrupt or holds another amount of data.
    pub fn decompress(&mut self, frame: &[u8], out: &mut [u8]) -> bool {
        matches!(self.zstd.decompress_to_buffer(frame, out), Ok(n) if n == out.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_parses_and_prints() {
        assert_eq!("none".parse(), Ok(Compression::None));
        assert_eq!(
            "zstd".parse(),
            Ok(Compression::Zstd {
                level: ZSTD_LEVEL_DEFAULT
            })
        );
        assert_eq!("zstd:7".parse(), Ok(Compression::Zstd { level: 7 }));
        assert_eq!(Compression::Zstd { level: 7 }.to_string(), "zstd:7");
        for bad in ["zstd:0", "zstd:20", "zstd:x", "lz4", "", "zstd:"] {
            let e = bad.parse::<Compression>().unwrap_err();
            assert!(
                e.contains("zstd") || e.contains("compression"),
                "{bad}: {e}"
            );
        }
        let json = serde_json::to_string(&Compression::Zstd { level: 3 }).unwrap();
        assert_eq!(json, r#"{"zstd":{"level":3}}"#);
        assert_eq!(
            serde_json::to_string(&Compression::None).unwrap(),
            r#""none""#
        );
    }

    #[test]
    fn a_corrupt_or_wrongly_sized_frame_is_refused() {
        let data = vec![7u8; 2 * PAGE];
        let frame = zstd::bulk::compress(&data, 1).unwrap();
        let mut d = PageDecompressor::new().unwrap();
        let mut out = vec![0u8; 2 * PAGE];
        assert!(d.decompress(&frame, &mut out));
        assert_eq!(out, data);
        // Fewer pages than the frame holds, more than it holds, garbage.
        assert!(!d.decompress(&frame, &mut vec![0u8; PAGE]));
        assert!(!d.decompress(&frame, &mut vec![0u8; 3 * PAGE]));
        assert!(!d.decompress(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3], &mut out));
    }
}
