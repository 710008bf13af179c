//! A reader for classic libpcap files (not pcapng), plain or gzip-compressed.
//!
//! The format is small: a 24-byte file header (magic, version, reserved fields, snap length,
//! link type) followed by records of a 16-byte header (seconds, sub-second fraction, captured
//! length, original length) and the captured bytes. The magic tells the byte order of every
//! later field (the writer's native order) and whether the fraction counts microseconds or
//! nanoseconds.
//!
//! A maintained crate was considered: `pcap-file` 2.0.0 (the last stable release, 2022) rejects
//! every record whose original length exceeds the snap length, which is exactly what a capture
//! taken with a small `-s` contains, and its 3.0 line is still a release candidate needing a
//! newer compiler than this workspace supports. This reader is the small part we need.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use super::CaptureError;

/// Largest captured length accepted for one record. tcpdump's own ceiling for `-s 0` is
/// 262144 bytes; a record claiming more is a corrupt file, and refusing it keeps a bad length
/// field from asking for a huge allocation.
pub const MAX_RECORD_LEN: u32 = 262_144;

/// Size of the pcap file header.
const FILE_HEADER_LEN: usize = 24;
/// Size of each record header.
const RECORD_HEADER_LEN: usize = 16;
/// The two bytes every gzip stream starts with.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Microsecond-resolution magic as it reads in the writer's own byte order.
const MAGIC_MICROS: u32 = 0xa1b2_c3d4;
/// Nanosecond-resolution magic as it reads in the writer's own byte order.
const MAGIC_NANOS: u32 = 0xa1b2_3c4d;
/// A pcapng file starts with a Section Header Block of this type (byte-order independent).
const PCAPNG_MAGIC: u32 = 0x0a0d_0d0a;

/// Byte order of the multi-byte fields of a pcap file (the writer's native order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteOrder {
    /// Least significant byte first (written on x86 and most ARM machines).
    Little,
    /// Most significant byte first.
    Big,
}

impl ByteOrder {
    fn u32(self, b: [u8; 4]) -> u32 {
        match self {
            ByteOrder::Little => u32::from_le_bytes(b),
            ByteOrder::Big => u32::from_be_bytes(b),
        }
    }

    fn u16(self, b: [u8; 2]) -> u16 {
        match self {
            ByteOrder::Little => u16::from_le_bytes(b),
            ByteOrder::Big => u16::from_be_bytes(b),
        }
    }
}

/// Unit of the sub-second timestamp field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsResolution {
    /// Microseconds (magic 0xa1b2c3d4).
    Micro,
    /// Nanoseconds (magic 0xa1b23c4d).
    Nano,
}

/// Link-layer header types this crate can take apart (the `LINKTYPE_*` registry values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkType {
    /// 0: BSD loopback / NULL, a 4-byte address family in the capturing host's byte order.
    Null,
    /// 1: Ethernet II (also what `tcpdump -i lo` writes on Linux).
    Ethernet,
    /// 12, 14 and 101: raw IP, no link header (the version nibble tells IPv4 from IPv6).
    RawIp,
    /// 108: OpenBSD loopback, a 4-byte address family in network byte order.
    Loop,
    /// 113: Linux cooked capture v1 (`tcpdump -i any`), 16-byte header.
    LinuxSll,
    /// 276: Linux cooked capture v2, 20-byte header.
    LinuxSll2,
    /// Anything else, with its registry number.
    Other(u32),
}

impl LinkType {
    /// Maps a `LINKTYPE_*` number to the variant.
    pub fn from_code(code: u32) -> LinkType {
        match code {
            0 => LinkType::Null,
            1 => LinkType::Ethernet,
            12 | 14 | 101 => LinkType::RawIp,
            108 => LinkType::Loop,
            113 => LinkType::LinuxSll,
            276 => LinkType::LinuxSll2,
            other => LinkType::Other(other),
        }
    }
}

/// The file header of a pcap file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcapHeader {
    /// Byte order of the file.
    pub byte_order: ByteOrder,
    /// Timestamp resolution.
    pub resolution: TsResolution,
    /// Format version (2.4 for every current writer).
    pub version: (u16, u16),
    /// Snap length the capture was taken with.
    pub snaplen: u32,
    /// Raw link-type field (the low 16 bits; the upper bits carry FCS information).
    pub link_type_code: u32,
    /// Decoded link type.
    pub link_type: LinkType,
}

/// One captured packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcapRecord {
    /// 1-based position of the record in the file, as Wireshark numbers frames.
    pub number: u64,
    /// Seconds since the epoch.
    pub ts_sec: u32,
    /// Sub-second part, always in nanoseconds (microsecond files are scaled).
    pub ts_nsec: u32,
    /// Length of the packet on the wire (may exceed `data.len()` when the snap length cut it).
    pub orig_len: u32,
    /// The captured bytes.
    pub data: Vec<u8>,
}

/// Streaming reader of a classic pcap file.
pub struct PcapReader<R> {
    reader: R,
    header: PcapHeader,
    next_number: u64,
    finished: bool,
}

impl<R> std::fmt::Debug for PcapReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcapReader")
            .field("header", &self.header)
            .field("next_number", &self.next_number)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

/// Opens a pcap file, transparently decompressing it when it is gzip-compressed (detected
/// by content, not by the file name).
pub fn open(path: &Path) -> Result<PcapReader<Box<dyn Read>>, CaptureError> {
    let file = File::open(path).map_err(|source| CaptureError::Open {
        path: path.display().to_string(),
        source,
    })?;
    from_reader(BufReader::new(file))
}

/// Wraps any buffered byte source holding a pcap file, plain or gzip-compressed.
pub fn from_reader<R: BufRead + 'static>(
    mut reader: R,
) -> Result<PcapReader<Box<dyn Read>>, CaptureError> {
    let head = reader.fill_buf().map_err(CaptureError::Io)?;
    let gzip = head.len() >= 2 && head[..2] == GZIP_MAGIC;
    let boxed: Box<dyn Read> = if gzip {
        Box::new(flate2::bufread::MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    PcapReader::new(boxed)
}

/// Reads until `buf` is full or the source ends; returns how many bytes were read.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn arr4(b: &[u8], at: usize) -> [u8; 4] {
    let mut out = [0u8; 4];
    if let Some(src) = b.get(at..at + 4) {
        out.copy_from_slice(src);
    }
    out
}

fn arr2(b: &[u8], at: usize) -> [u8; 2] {
    let mut out = [0u8; 2];
    if let Some(src) = b.get(at..at + 2) {
        out.copy_from_slice(src);
    }
    out
}

impl<R: Read> PcapReader<R> {
    /// Reads and checks the file header.
    pub fn new(mut reader: R) -> Result<Self, CaptureError> {
        let mut hdr = [0u8; FILE_HEADER_LEN];
        let got = read_full(&mut reader, &mut hdr).map_err(CaptureError::Io)?;
        if got < 4 {
            return Err(CaptureError::NotPcap(format!(
                "file is too short ({got} bytes) to hold a pcap header"
            )));
        }
        let raw_magic = arr4(&hdr, 0);
        let (byte_order, resolution) = if u32::from_le_bytes(raw_magic) == MAGIC_MICROS {
            (ByteOrder::Little, TsResolution::Micro)
        } else if u32::from_be_bytes(raw_magic) == MAGIC_MICROS {
            (ByteOrder::Big, TsResolution::Micro)
        } else if u32::from_le_bytes(raw_magic) == MAGIC_NANOS {
            (ByteOrder::Little, TsResolution::Nano)
        } else if u32::from_be_bytes(raw_magic) == MAGIC_NANOS {
            (ByteOrder::Big, TsResolution::Nano)
        } else if u32::from_be_bytes(raw_magic) == PCAPNG_MAGIC {
            return Err(CaptureError::NotPcap(
                "this is a pcapng file; only classic pcap is read (convert it with \
                 `editcap -F pcap IN OUT`)"
                    .to_string(),
            ));
        } else {
            return Err(CaptureError::NotPcap(format!(
                "unknown magic {:02x}{:02x}{:02x}{:02x} (expected a libpcap file, plain or gzip)",
                raw_magic[0], raw_magic[1], raw_magic[2], raw_magic[3]
            )));
        };
        if got < FILE_HEADER_LEN {
            return Err(CaptureError::NotPcap(format!(
                "pcap file header is truncated ({got} of {FILE_HEADER_LEN} bytes)"
            )));
        }
        let version = (byte_order.u16(arr2(&hdr, 4)), byte_order.u16(arr2(&hdr, 6)));
        if version.0 != 2 {
            return Err(CaptureError::NotPcap(format!(
                "unsupported pcap version {}.{}",
                version.0, version.1
            )));
        }
        let snaplen = byte_order.u32(arr4(&hdr, 16));
        // The upper bits of the link-type field hold FCS length information; the type is in
        // the low 16 bits.
        let link_type_code = byte_order.u32(arr4(&hdr, 20)) & 0xffff;
        Ok(PcapReader {
            reader,
            header: PcapHeader {
                byte_order,
                resolution,
                version,
                snaplen,
                link_type_code,
                link_type: LinkType::from_code(link_type_code),
            },
            next_number: 1,
            finished: false,
        })
    }

    /// The file header.
    pub fn header(&self) -> &PcapHeader {
        &self.header
    }

    /// Reads the next record; `Ok(None)` at a clean end of file. A record cut short by the end
    /// of the file, or a record header with an impossible length, is an error, after which the
    /// reader reports the end of the file.
    pub fn next_record(&mut self) -> Result<Option<PcapRecord>, CaptureError> {
        if self.finished {
            return Ok(None);
        }
        let number = self.next_number;
        let mut rh = [0u8; RECORD_HEADER_LEN];
        let got = read_full(&mut self.reader, &mut rh).map_err(|e| {
            self.finished = true;
            CaptureError::Io(e)
        })?;
        if got == 0 {
            self.finished = true;
            return Ok(None);
        }
        if got < RECORD_HEADER_LEN {
            self.finished = true;
            return Err(CaptureError::TruncatedRecord { frame: number });
        }
        let bo = self.header.byte_order;
        let ts_sec = bo.u32(arr4(&rh, 0));
        let frac = bo.u32(arr4(&rh, 4));
        let incl_len = bo.u32(arr4(&rh, 8));
        let orig_len = bo.u32(arr4(&rh, 12));
        if incl_len > MAX_RECORD_LEN {
            self.finished = true;
            return Err(CaptureError::RecordTooLong {
                frame: number,
                len: incl_len,
            });
        }
        let ts_nsec = match self.header.resolution {
            TsResolution::Micro => frac.saturating_mul(1000),
            TsResolution::Nano => frac,
        };
        // Bounded by MAX_RECORD_LEN above, so this allocation is at most 256 KiB.
        let mut data = vec![0u8; incl_len as usize];
        let got = read_full(&mut self.reader, &mut data).map_err(|e| {
            self.finished = true;
            CaptureError::Io(e)
        })?;
        if got < data.len() {
            self.finished = true;
            return Err(CaptureError::TruncatedRecord { frame: number });
        }
        self.next_number += 1;
        Ok(Some(PcapRecord {
            number,
            ts_sec,
            ts_nsec,
            orig_len,
            data,
        }))
    }
}

impl<R: Read> Iterator for PcapReader<R> {
    type Item = Result<PcapRecord, CaptureError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// Test-support API: writes a classic pcap file in memory (the integration tests in
/// `tests/captures.rs` build synthetic captures with it): the given byte order, timestamp
/// resolution and link type, snap length [`MAX_RECORD_LEN`].
#[derive(Debug, Clone)]
pub struct PcapWriter {
    byte_order: ByteOrder,
    resolution: TsResolution,
    out: Vec<u8>,
}

impl PcapWriter {
    /// Starts a file with the given byte order, timestamp resolution and link-type number.
    pub fn new(byte_order: ByteOrder, resolution: TsResolution, link_type: u32) -> Self {
        let mut w = PcapWriter {
            byte_order,
            resolution,
            out: Vec::new(),
        };
        let magic = match resolution {
            TsResolution::Micro => MAGIC_MICROS,
            TsResolution::Nano => MAGIC_NANOS,
        };
        w.put32(magic);
        w.put16(2);
        w.put16(4);
        w.put32(0);
        w.put32(0);
        w.put32(MAX_RECORD_LEN);
        w.put32(link_type);
        w
    }

    fn put32(&mut self, v: u32) {
        let b = match self.byte_order {
            ByteOrder::Little => v.to_le_bytes(),
            ByteOrder::Big => v.to_be_bytes(),
        };
        self.out.extend_from_slice(&b);
    }

    fn put16(&mut self, v: u16) {
        let b = match self.byte_order {
            ByteOrder::Little => v.to_le_bytes(),
            ByteOrder::Big => v.to_be_bytes(),
        };
        self.out.extend_from_slice(&b);
    }

    /// Appends one record (timestamp in seconds and nanoseconds; stored in the file's unit).
    /// Data longer than [`MAX_RECORD_LEN`] is cut to it, with `orig_len` keeping the length.
    pub fn push(&mut self, ts_sec: u32, ts_nsec: u32, data: &[u8]) {
        let kept = &data[..data.len().min(MAX_RECORD_LEN as usize)];
        let frac = match self.resolution {
            TsResolution::Micro => ts_nsec / 1000,
            TsResolution::Nano => ts_nsec,
        };
        self.put32(ts_sec);
        self.put32(frac);
        self.put32(u32::try_from(kept.len()).unwrap_or(MAX_RECORD_LEN));
        self.put32(u32::try_from(data.len()).unwrap_or(u32::MAX));
        self.out.extend_from_slice(kept);
    }

    /// The file bytes written so far.
    pub fn bytes(&self) -> &[u8] {
        &self.out
    }

    /// Consumes the writer, returning the file bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    fn sample(order: ByteOrder, res: TsResolution) -> Vec<u8> {
        let mut w = PcapWriter::new(order, res, 1);
        w.push(10, 123_456_000, &[1, 2, 3]);
        w.push(11, 999_000, &[4; 70]);
        w.into_bytes()
    }

    fn read_all(bytes: Vec<u8>) -> (PcapHeader, Vec<PcapRecord>) {
        let r = from_reader(Cursor::new(bytes)).expect("header");
        let h = *r.header();
        let recs: Result<Vec<_>, _> = r.collect();
        (h, recs.expect("records"))
    }

    #[test]
    fn both_byte_orders_and_resolutions() {
        for order in [ByteOrder::Little, ByteOrder::Big] {
            for res in [TsResolution::Micro, TsResolution::Nano] {
                let (h, recs) = read_all(sample(order, res));
                assert_eq!(h.byte_order, order);
                assert_eq!(h.resolution, res);
                assert_eq!(h.link_type, LinkType::Ethernet);
                assert_eq!(h.version, (2, 4));
                assert_eq!(recs.len(), 2);
                assert_eq!(recs[0].number, 1);
                assert_eq!(recs[0].data, vec![1, 2, 3]);
                assert_eq!(recs[0].ts_sec, 10);
                assert_eq!(recs[0].ts_nsec, 123_456_000);
                assert_eq!(recs[1].number, 2);
                assert_eq!(recs[1].data.len(), 70);
                assert_eq!(recs[1].orig_len, 70);
            }
        }
    }

    #[test]
    fn gzip_is_detected_by_content() {
        let plain = sample(ByteOrder::Little, TsResolution::Micro);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&plain).expect("gzip");
        let gz = enc.finish().expect("gzip");
        assert_eq!(read_all(gz), read_all(plain));
    }

    #[test]
    fn not_pcap_is_a_clear_error() {
        let err = from_reader(Cursor::new(b"hello world, this is text\n".to_vec()))
            .expect_err("text is no pcap");
        assert!(matches!(err, CaptureError::NotPcap(_)), "{err}");
        let err = from_reader(Cursor::new(Vec::new())).expect_err("empty");
        assert!(matches!(err, CaptureError::NotPcap(_)), "{err}");
        let ng = [
            0x0a, 0x0d, 0x0d, 0x0a, 0, 0, 0, 0x1c, 0x4d, 0x3c, 0x2b, 0x1a,
        ];
        let err = from_reader(Cursor::new(ng.to_vec())).expect_err("pcapng");
        assert!(err.to_string().contains("pcapng"), "{err}");
    }

    #[test]
    fn truncated_and_oversized_records() {
        let mut bytes = sample(ByteOrder::Little, TsResolution::Micro);
        bytes.truncate(bytes.len() - 5);
        let mut r = from_reader(Cursor::new(bytes)).expect("header");
        assert!(r.next_record().expect("first").is_some());
        assert!(matches!(
            r.next_record(),
            Err(CaptureError::TruncatedRecord { frame: 2 })
        ));
        assert!(r.next_record().expect("end").is_none());

        let mut w = PcapWriter::new(ByteOrder::Big, TsResolution::Micro, 1);
        w.push(1, 0, &[0; 4]);
        let mut bytes = w.into_bytes();
        // Claim a captured length far beyond the limit.
        bytes[FILE_HEADER_LEN + 8..FILE_HEADER_LEN + 12].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut r = from_reader(Cursor::new(bytes)).expect("header");
        assert!(matches!(
            r.next_record(),
            Err(CaptureError::RecordTooLong { frame: 1, .. })
        ));
    }
}
