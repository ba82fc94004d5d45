//! The machine state on the wire: a versioned, checksummed envelope around the encoded
//! [`MachineState`], carried by the migration stream's `DeviceState` record.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "FERRYVMS"
//!      8     4  format version (le32): 2 = postcard payload (written), 1 = JSON (read)
//!     12     4  flags (le32, must be 0)
//!     16     8  payload length in bytes (le64, at most PAYLOAD_BYTES_MAX)
//!     24     4  CRC-32 (IEEE) of bytes 0..24 followed by the payload (le32)
//!     28     n  payload: MachineState, postcard (version 2) or JSON (version 1)
//! ```
//!
//! The state is decoded on the destination and encoded on the source while the guest is
//! paused, so its encoding is part of the downtime. Version 1 was JSON: KVM's structures
//! (the 4 KiB XSAVE area, the 1 KiB LAPIC page) became arrays of decimal numbers, ~80 KiB for
//! two vCPUs, and parsing them took ~4.9 ms of a 4 GiB guest's ~26 ms downtime in the lab
//! (encoding ~2.4 ms on the source). Version 2 is postcard (serde's data model, positional,
//! byte strings kept as bytes): 38 KB, decoded in 0.5-0.8 ms and encoded in 0.5-0.9 ms
//! there. Firecracker keeps its
//! snapshots in a serde binary format for the same reason. Version 1 is still read, so that
//! a destination can take a VM from a source older than version 2.
//!
//! A decoder checks, in this order and before parsing anything: the length of the header,
//! the magic, the version, the flags, the declared length against the limit and against
//! the bytes present, then the checksum. Only then is the payload parsed (all of it: bytes
//! left over are an error), and the machine state's own layout version checked. Every
//! violation is a distinct [`StateFormatError`]. The layout is pinned by golden files
//! (`tests/golden/`, `tests/state_format.rs`).
#![forbid(unsafe_code)]

use crate::vmm::{MachineState, MACHINE_STATE_VERSION};

/// First bytes of every encoded machine state.
pub const MAGIC: [u8; 8] = *b"FERRYVMS";
/// Version of the envelope this build writes: a postcard payload.
pub const FORMAT_VERSION: u32 = 2;
/// The envelope version whose payload is JSON, read from sources older than version 2.
pub const FORMAT_VERSION_JSON: u32 = 1;

/// Whether this build reads envelopes of `version`.
pub fn reads(version: u32) -> bool {
    version == FORMAT_VERSION || version == FORMAT_VERSION_JSON
}
/// Bytes before the payload.
pub const HEADER_BYTES: usize = 28;
/// Largest payload accepted: the envelope must fit the migration stream's device-state
/// record (16 MiB).
pub const PAYLOAD_BYTES_MAX: usize = ferry_migration::wire::DEVICE_STATE_BYTES_MAX - HEADER_BYTES;

/// Why a machine state cannot be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum StateFormatError {
    /// Fewer bytes than a header.
    #[error("machine state of {0} bytes is shorter than its {HEADER_BYTES}-byte header")]
    Truncated(usize),
    /// Not a ferry machine state.
    #[error("not a ferry machine state (magic {0:02x?})")]
    Magic([u8; 8]),
    /// An envelope version this build does not read.
    #[error(
        "machine state format version {found} (this ferry reads versions {FORMAT_VERSION_JSON} \
         and {FORMAT_VERSION})"
    )]
    Version {
        /// The version found.
        found: u32,
    },
    /// Flags this build does not know.
    #[error("machine state flags {0:#x} are not supported")]
    Flags(u32),
    /// A declared payload larger than the limit.
    #[error("machine state payload of {0} bytes exceeds the limit of {PAYLOAD_BYTES_MAX}")]
    TooLong(u64),
    /// The declared payload length differs from the bytes present.
    #[error("machine state declares {declared} payload bytes but carries {actual}")]
    Length {
        /// Declared.
        declared: u64,
        /// Present.
        actual: usize,
    },
    /// The checksum does not match: the state was damaged.
    #[error("machine state checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// In the header.
        stored: u32,
        /// Over the bytes received.
        computed: u32,
    },
    /// The payload is not a machine state.
    #[error("machine state payload: {0}")]
    Payload(#[source] postcard::Error),
    /// The payload decoded, with bytes left over: not what a source writes.
    #[error("machine state payload has {0} bytes after the state")]
    Trailing(usize),
    /// A version 1 (JSON) payload is not a machine state.
    #[error("machine state payload (JSON): {0}")]
    JsonPayload(#[source] serde_json::Error),
    /// The machine state's own layout version is not the one this build reads.
    #[error("machine state layout version {found} (this ferry reads {MACHINE_STATE_VERSION})")]
    Layout {
        /// The version found.
        found: u32,
    },
    /// Serializing the machine state failed.
    #[error("encoding the machine state: {0}")]
    Encode(#[source] postcard::Error),
}

fn checksum(header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..24]);
    h.update(payload);
    h.finalize()
}

/// Wraps `payload` in an envelope of this build's [`FORMAT_VERSION`].
pub fn seal(payload: &[u8]) -> Result<Vec<u8>, StateFormatError> {
    seal_version(FORMAT_VERSION, payload)
}

/// Wraps `payload` in an envelope that says `version` (tests write older versions with it).
pub fn seal_version(version: u32, payload: &[u8]) -> Result<Vec<u8>, StateFormatError> {
    if payload.len() > PAYLOAD_BYTES_MAX {
        return Err(StateFormatError::TooLong(payload.len() as u64));
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let crc = checksum(&out, payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// An envelope's payload, checked, and the version that says how to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed<'a> {
    /// The envelope version ([`FORMAT_VERSION`] or [`FORMAT_VERSION_JSON`]).
    pub version: u32,
    /// The payload.
    pub payload: &'a [u8],
}

/// Checks the envelope and returns its payload.
pub fn open(bytes: &[u8]) -> Result<Sealed<'_>, StateFormatError> {
    if bytes.len() < HEADER_BYTES {
        return Err(StateFormatError::Truncated(bytes.len()));
    }
    let (header, payload) = bytes.split_at(HEADER_BYTES);
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&header[..8]);
    if magic != MAGIC {
        return Err(StateFormatError::Magic(magic));
    }
    let version = le32(&header[8..12]);
    if !reads(version) {
        return Err(StateFormatError::Version { found: version });
    }
    let flags = le32(&header[12..16]);
    if flags != 0 {
        return Err(StateFormatError::Flags(flags));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[16..24]);
    let declared = u64::from_le_bytes(len);
    if declared > PAYLOAD_BYTES_MAX as u64 {
        return Err(StateFormatError::TooLong(declared));
    }
    if declared != payload.len() as u64 {
        return Err(StateFormatError::Length {
            declared,
            actual: payload.len(),
        });
    }
    let stored = le32(&header[24..28]);
    let computed = checksum(header, payload);
    if stored != computed {
        return Err(StateFormatError::Checksum { stored, computed });
    }
    Ok(Sealed { version, payload })
}

/// Encodes `state` for the migration stream.
pub fn encode(state: &MachineState) -> Result<Vec<u8>, StateFormatError> {
    let payload = postcard::to_stdvec(state).map_err(StateFormatError::Encode)?;
    seal(&payload)
}

/// Decodes a machine state received from a source, refusing anything damaged or foreign.
pub fn decode(bytes: &[u8]) -> Result<MachineState, StateFormatError> {
    let sealed = open(bytes)?;
    let state: MachineState = if sealed.version == FORMAT_VERSION_JSON {
        serde_json::from_slice(sealed.payload).map_err(StateFormatError::JsonPayload)?
    } else {
        let (state, rest) =
            postcard::take_from_bytes(sealed.payload).map_err(StateFormatError::Payload)?;
        if !rest.is_empty() {
            return Err(StateFormatError::Trailing(rest.len()));
        }
        state
    };
    if state.version != MACHINE_STATE_VERSION {
        return Err(StateFormatError::Layout {
            found: state.version,
        });
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open_returns_the_payload() {
        let sealed = seal(b"{}").unwrap();
        assert_eq!(sealed.len(), HEADER_BYTES + 2);
        assert_eq!(&sealed[..8], b"FERRYVMS");
        let opened = open(&sealed).unwrap();
        assert_eq!(
            (opened.version, opened.payload),
            (FORMAT_VERSION, b"{}".as_slice())
        );
        assert_eq!(open(&seal(b"").unwrap()).unwrap().payload, b"");
        let json = seal_version(FORMAT_VERSION_JSON, b"{}").unwrap();
        assert_eq!(open(&json).unwrap().version, 1);
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let sealed = seal(br#"{"version":1}"#).unwrap();
        for i in 0..sealed.len() {
            for bit in 0..8 {
                let mut bad = sealed.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    open(&bad).is_err(),
                    "flip of bit {bit} in byte {i} accepted"
                );
            }
        }
    }

    #[test]
    fn header_violations_have_their_own_errors() {
        let sealed = seal(b"abc").unwrap();
        assert!(matches!(
            open(&sealed[..27]),
            Err(StateFormatError::Truncated(27))
        ));
        assert!(matches!(
            open(&sealed[..30]),
            Err(StateFormatError::Length {
                declared: 3,
                actual: 2
            })
        ));
        for unknown in [0u8, 3] {
            let mut other = sealed.clone();
            other[8] = unknown;
            assert!(matches!(
                open(&other),
                Err(StateFormatError::Version { found }) if found == u32::from(unknown)
            ));
        }
        let mut flags = sealed.clone();
        flags[12] = 1;
        assert!(matches!(open(&flags), Err(StateFormatError::Flags(1))));
        let mut huge = sealed.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            open(&huge),
            Err(StateFormatError::TooLong(u64::MAX))
        ));
        let mut payload = sealed.clone();
        payload[HEADER_BYTES] ^= 0x20;
        assert!(matches!(
            open(&payload),
            Err(StateFormatError::Checksum { .. })
        ));
        let mut magic = sealed;
        magic[0] = b'X';
        assert!(matches!(open(&magic), Err(StateFormatError::Magic(_))));
    }

    #[test]
    fn oversized_payloads_are_refused_before_sealing() {
        let big = vec![b' '; PAYLOAD_BYTES_MAX + 1];
        assert!(matches!(seal(&big), Err(StateFormatError::TooLong(_))));
    }

    #[test]
    fn a_sealed_non_state_is_a_payload_error() {
        let err = decode(&seal(&[1, 2, 3]).unwrap()).unwrap_err();
        assert!(matches!(err, StateFormatError::Payload(_)), "{err}");
        let json = seal_version(FORMAT_VERSION_JSON, b"[1,2,3]").unwrap();
        let err = decode(&json).unwrap_err();
        assert!(matches!(err, StateFormatError::JsonPayload(_)), "{err}");
    }
}
