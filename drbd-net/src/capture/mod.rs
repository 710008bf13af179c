//! Reading packet captures of DRBD traffic: classic libpcap files (plain or gzip), TCP
//! reassembly by sequence number, and decoding of every DRBD packet with the wire codec.
//!
//! This is how the codec is checked against real kernel traffic: the captures in
//! `shared/captures` were taken next to two in-kernel DRBD 8.4 nodes, and every packet in
//! them must decode and re-encode to the very same bytes.
//!
//! Layers, each usable alone:
//! * [`pcap`]: the file format (both byte orders, micro- and nanosecond timestamps, gzip).
//! * [`packet`]: link layer, IPv4/IPv6 and TCP headers of one frame.
//! * [`reassembly`]: per-direction TCP byte streams, in order, with gaps reported.
//! * [`drbd`]: DRBD stream detection, handshake context tracking and decoding with
//!   [`crate::wire::Decoder`], giving [`DrbdRecord`]s in capture order (all at once, or as
//!   they become final with [`RecordStream`]).
//! * [`summary`]: the one-line text form of a record (what `drbd-wiredump` prints).

pub mod drbd;
pub mod packet;
pub mod pcap;
pub mod reassembly;
pub mod summary;

pub use drbd::{
    analyze, analyze_file, Analysis, AnalyzeOptions, Analyzer, DecodeFailure, DrbdRecord,
    FailureReason, Notice, RecordStream,
};
pub use reassembly::Direction;

use thiserror::Error;

/// Errors reading a capture file.
#[derive(Debug, Error)]
pub enum CaptureError {
    /// The file could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path given.
        path: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Reading failed (including a corrupt gzip stream).
    #[error("read error: {0}")]
    Io(#[source] std::io::Error),
    /// The bytes are not a classic pcap file.
    #[error("not a pcap file: {0}")]
    NotPcap(String),
    /// The file ends in the middle of a record.
    #[error("the capture is cut short in the middle of frame {frame}")]
    TruncatedRecord {
        /// 1-based number of the incomplete record.
        frame: u64,
    },
    /// A record claims more captured bytes than any capture tool writes.
    #[error(
        "frame {frame} claims {len} captured bytes (more than {max}): corrupt file",
        max = pcap::MAX_RECORD_LEN
    )]
    RecordTooLong {
        /// 1-based number of the record.
        frame: u64,
        /// The captured length it claims.
        len: u32,
    },
}
