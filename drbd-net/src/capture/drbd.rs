//! Finding and decoding the DRBD traffic of a capture.
//!
//! Every TCP direction whose first payload bytes start with one of the three DRBD header
//! magics is a DRBD stream; its bytes are decoded with the wire codec's [`Decoder`], frame
//! after frame. The codec needs the connection's [`WireContext`], which the capture tracks
//! the way the two kernels establish it:
//!
//! * The **data socket** (the TCP connection that carries `P_INITIAL_DATA`) carries one
//!   `P_CONNECTION_FEATURES` in each direction; once both are seen, both directions use the
//!   agreed protocol version (the smaller maximum) and feature flags (the AND of both). A
//!   direction that has sent its features waits, undecoded, until the peer's arrive.
//! * The **meta socket** (the connection that carries `P_INITIAL_META`) has no features
//!   exchange of its own: it takes the agreement of the data socket between the same two
//!   hosts (waiting for it when the meta socket comes up first).
//! * `P_PROTOCOL` / `P_PROTOCOL_UPDATE` name the sender's data-integrity algorithm, which
//!   fixes the digest length of its later data packets (and of the peer's, until the peer's
//!   own `P_PROTOCOL` arrives; DRBD requires both to be equal).
//! * A stream whose start was not captured (a capture beginning mid-connection) uses the
//!   agreement already seen between its two hosts, or else
//!   [`AnalyzeOptions::assumed_context`].
//!
//! Each decoded packet becomes a [`DrbdRecord`], placed in capture order: the order of the
//! frames whose TCP segment completed the packet (ties by stream, then offset). A frame that
//! cannot be decoded stops its direction and is reported as a [`DecodeFailure`].
//!
//! [`analyze`] and [`analyze_file`] keep every record; [`RecordStream`] (or
//! [`Analyzer::take_records`]) hands each one out as soon as its place in capture order is
//! final, so that memory does not grow with the length of the capture.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::Read;
use std::net::IpAddr;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use super::packet::parse_frame;
use super::pcap::{self, LinkType, PcapReader, PcapRecord};
use super::reassembly::{DirIndex, Direction, StreamIssue, TcpReassembler, MAX_STREAMS};
use super::CaptureError;
use crate::wire::{
    integrity_digest_len, ConnectionFeatures, Decoder, Frame, Header, Packet, WireContext,
    WireError, FF_THIN_RESYNC, FF_TRIM, FF_WSAME, FF_WZEROES,
};

/// Most bytes a DRBD direction may hold undecoded. The largest legal packet is a `P_DATA`
/// of 1 MiB with a 16-byte header, 24-byte sub-header and a 64-byte digest; a direction
/// waiting for its context holds only what the sender transmits before the peer answers
/// (in DRBD's handshake, nothing beyond its features packet). 4 MiB covers both with room
/// to spare; more means the stream is not DRBD as we understand it.
pub const MAX_UNDECODED_BYTES: usize = 4 * 1024 * 1024;

/// Most bytes all DRBD directions of a capture together may hold undecoded. Each direction is
/// bounded by [`MAX_UNDECODED_BYTES`], but a capture may hold any number of them; a direction
/// normally holds at most one partial packet (at most about 1 MiB), so 64 MiB is dozens of
/// directions in the middle of a maximal packet at once. The direction whose bytes go past it
/// stops with [`FailureReason::SharedBufferLimit`].
pub const MAX_TOTAL_UNDECODED_BYTES: usize = 64 * 1024 * 1024;

/// The context an in-kernel DRBD 8.4.11 pair agrees on (protocol 101, features TRIM,
/// THIN_RESYNC, WSAME and WZEROES, no data-integrity algorithm), used for streams whose
/// handshake is not in the capture.
pub const KERNEL_84_CONTEXT: WireContext = WireContext {
    integrity_digest_len: 0,
    features: FF_TRIM | FF_THIN_RESYNC | FF_WSAME | FF_WZEROES,
    protocol_version: 101,
    integrity: None,
};

/// Settings of an analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnalyzeOptions {
    /// Context for a DRBD stream whose handshake the capture does not hold and whose hosts
    /// were not seen agreeing on one.
    pub assumed_context: WireContext,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        AnalyzeOptions {
            assumed_context: KERNEL_84_CONTEXT,
        }
    }
}

/// One decoded DRBD packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrbdRecord {
    /// TCP stream index.
    pub stream: usize,
    /// Direction within the stream (0: from the stream's first endpoint).
    pub dir: DirIndex,
    /// `src -> dst` of the packet.
    pub direction: Direction,
    /// 1-based number of the frame whose segment completed the packet.
    pub frame: u64,
    /// Byte offset of the packet in its direction's TCP stream.
    pub offset: u64,
    /// The header as read.
    pub header: Header,
    /// The decoded frame.
    pub decoded: Frame,
    /// The context it was decoded with (what re-encoding needs).
    pub context: WireContext,
    /// The packet's bytes as captured: header and payload. The same memory the payload
    /// fields of `decoded` are sliced from, not a copy.
    pub raw: Bytes,
}

/// Why a DRBD direction could not be decoded further.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FailureReason {
    /// The codec rejected the bytes.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// `P_PROTOCOL` named a data-integrity algorithm of unknown digest length.
    #[error("unknown data-integrity-alg {0:?}: its digest length is not known")]
    UnknownIntegrityAlg(String),
    /// The decoder consumed a different number of bytes than the header announced.
    #[error("the decoder took {took} bytes for a frame of {expected} bytes")]
    Framing {
        /// Header plus announced payload.
        expected: usize,
        /// What the decoder consumed.
        took: usize,
    },
    /// Too many bytes arrived without a complete packet.
    #[error("more than {MAX_UNDECODED_BYTES} bytes buffered without a complete packet")]
    BufferLimit,
    /// The undecoded bytes of all DRBD directions together went past
    /// [`MAX_TOTAL_UNDECODED_BYTES`] with this direction's.
    #[error(
        "more than {MAX_TOTAL_UNDECODED_BYTES} bytes buffered without a complete packet \
         across all DRBD streams of the capture"
    )]
    SharedBufferLimit,
}

/// A DRBD direction that stopped at a packet it could not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeFailure {
    /// TCP stream index.
    pub stream: usize,
    /// `src -> dst`.
    pub direction: Direction,
    /// Byte offset of the undecodable packet in the direction's stream.
    pub offset: u64,
    /// Frame that carried the first byte of the undecodable packet.
    pub frame: u64,
    /// What was wrong.
    pub reason: FailureReason,
}

impl std::fmt::Display for DecodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "s{} {} offset {} (frame {}): {}",
            self.stream, self.direction, self.offset, self.frame, self.reason
        )
    }
}

/// Something worth knowing that did not stop decoding of what the capture holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// TCP reassembly stopped a direction (bytes missing from the capture).
    Stream {
        /// TCP stream index.
        stream: usize,
        /// `src -> dst`.
        direction: Direction,
        /// What happened.
        issue: StreamIssue,
    },
    /// The capture ended inside a DRBD packet.
    Truncated {
        /// TCP stream index.
        stream: usize,
        /// `src -> dst`.
        direction: Direction,
        /// Offset of the incomplete packet.
        offset: u64,
        /// Bytes of it captured.
        buffered: usize,
    },
    /// A direction waited for context the capture never showed; it was decoded with a
    /// fallback.
    AssumedContext {
        /// TCP stream index.
        stream: usize,
        /// `src -> dst`.
        direction: Direction,
        /// What was missing.
        what: &'static str,
        /// The context used.
        context: WireContext,
    },
    /// Reading the file stopped early (the last record is cut short, or a corrupt record).
    Capture(String),
    /// The capture holds more than [`MAX_STREAMS`] TCP connections: from frame `frame` on,
    /// segments of connections beyond them were ignored.
    StreamLimit {
        /// First frame whose segment was ignored.
        frame: u64,
    },
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::Stream {
                stream,
                direction,
                issue,
            } => write!(f, "s{stream} {direction}: {issue}"),
            Notice::Truncated {
                stream,
                direction,
                offset,
                buffered,
            } => write!(
                f,
                "s{stream} {direction}: capture ends inside a packet at offset {offset} \
                 ({buffered} bytes of it captured)"
            ),
            Notice::AssumedContext {
                stream,
                direction,
                what,
                context,
            } => write!(
                f,
                "s{stream} {direction}: {what} not in the capture; decoded with protocol {} \
                 features {:#x} digest {}",
                context.protocol_version, context.features, context.integrity_digest_len
            ),
            Notice::Capture(msg) => write!(f, "{msg}"),
            Notice::StreamLimit { frame } => write!(
                f,
                "frame {frame}: more than {MAX_STREAMS} TCP connections in the capture; \
                 connections beyond them are not decoded"
            ),
        }
    }
}

/// Role of a TCP connection in a DRBD connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketRole {
    /// Not known (no initial packet captured).
    Unknown,
    /// The data socket (`P_INITIAL_DATA`, or `P_CONNECTION_FEATURES` seen).
    Data,
    /// The meta socket (`P_INITIAL_META`).
    Meta,
}

/// A TCP stream of the capture, as far as DRBD is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    /// Stream index.
    pub index: usize,
    /// Direction 0 (`a -> b`; direction 1 is the reverse).
    pub direction: Direction,
    /// Whether each direction carries DRBD.
    pub drbd: [bool; 2],
    /// Packets decoded per direction.
    pub packets: [usize; 2],
    /// The connection's role.
    pub role: SocketRole,
}

/// Everything found in a capture.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// The capture's link type.
    pub link_type: LinkType,
    /// Frames read.
    pub frames: u64,
    /// Frames that carried no TCP segment (not IP, not TCP, fragments, malformed).
    pub skipped_frames: u64,
    /// Every TCP stream.
    pub streams: Vec<StreamSummary>,
    /// Decoded DRBD packets in capture order (those a [`RecordStream`] or
    /// [`Analyzer::take_records`] did not already hand out).
    pub records: Vec<DrbdRecord>,
    /// Directions that stopped at an undecodable packet.
    pub failures: Vec<DecodeFailure>,
    /// Non-fatal observations.
    pub notices: Vec<Notice>,
}

impl Analysis {
    /// Number of packets per command name.
    pub fn command_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for r in &self.records {
            *counts.entry(r.decoded.packet.command().name()).or_insert(0) += 1;
        }
        counts
    }
}

/// Reads and analyses a capture file (plain or gzip pcap).
pub fn analyze_file(path: &Path, options: AnalyzeOptions) -> Result<Analysis, CaptureError> {
    Ok(analyze(pcap::open(path)?, options))
}

/// Analyses a capture from an open reader, keeping every record. A read error part-way
/// through ends the analysis there, reported as a [`Notice::Capture`].
pub fn analyze<R: Read>(reader: PcapReader<R>, options: AnalyzeOptions) -> Analysis {
    RecordStream::new(reader, options).finish()
}

/// A capture analysed as it is read: an iterator over its DRBD records in capture order
/// (the order [`analyze`] gives), each yielded as soon as no later frame can place a record
/// before it. Only the records that cannot be placed yet are held (those after bytes that
/// wait for handshake context), so memory does not grow with the length of the capture.
///
/// Once the iterator is exhausted, [`RecordStream::finish`] gives the rest of the analysis.
/// A read error part-way through ends the capture there, reported as a
/// [`Notice::Capture`].
pub struct RecordStream<R: Read> {
    reader: PcapReader<R>,
    analyzer: Analyzer,
    /// Records taken from the analyzer and not yet yielded, in capture order.
    ready: VecDeque<DrbdRecord>,
    /// Whether the end of the capture (or a read error) was reached.
    ended: bool,
}

impl<R: Read> RecordStream<R> {
    /// Starts the analysis of an open capture.
    pub fn new(reader: PcapReader<R>, options: AnalyzeOptions) -> Self {
        let analyzer = Analyzer::new(reader.header().link_type, options);
        RecordStream {
            reader,
            analyzer,
            ready: VecDeque::new(),
            ended: false,
        }
    }

    /// Feeds the next frame to the analyzer, or concludes the analysis at the end of the
    /// capture.
    fn read_one(&mut self) {
        match self.reader.next_record() {
            Ok(Some(rec)) => return self.analyzer.push(&rec),
            Ok(None) => {}
            Err(e) => self.analyzer.notices.push(Notice::Capture(e.to_string())),
        }
        self.ended = true;
        self.analyzer.conclude();
    }

    /// Reads the rest of the capture and returns the analysis. Its `records` are those the
    /// iterator has not yielded (all of them if it was not used).
    pub fn finish(mut self) -> Analysis {
        while !self.ended {
            self.read_one();
        }
        let mut analysis = self.analyzer.finish();
        let mut records: Vec<DrbdRecord> = self.ready.into();
        records.append(&mut analysis.records);
        analysis.records = records;
        analysis
    }
}

impl<R: Read> Iterator for RecordStream<R> {
    type Item = DrbdRecord;

    fn next(&mut self) -> Option<DrbdRecord> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                return Some(r);
            }
            if self.ended {
                return None;
            }
            self.read_one();
            self.ready.extend(self.analyzer.take_records());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unclassified,
    NotDrbd,
    Drbd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Sent its features; waits for the peer's.
    PeerFeatures,
    /// Meta socket; waits for the data socket's agreement between the same hosts.
    PairContext,
}

/// Decoding state of one direction.
#[derive(Debug)]
struct DirState {
    kind: Kind,
    buf: BytesMut,
    /// Stream offset of `buf[0]`.
    buf_offset: u64,
    /// (stream offset delivered up to, frame that delivered it), oldest first.
    deliveries: VecDeque<(u64, u64)>,
    decoder: Decoder,
    ctx: WireContext,
    /// Whether `ctx` came from the capture (an agreement or `P_PROTOCOL`), not a default.
    ctx_known: bool,
    wait: Option<Wait>,
    stopped: bool,
    features: Option<ConnectionFeatures>,
    saw_protocol: bool,
    packets: usize,
    /// `buf.len()` as last counted in [`Analyzer::undecoded`].
    accounted: usize,
    /// While waiting with bytes held: the frame that delivered the first of them (no record
    /// of this direction can come before it), as entered in [`Analyzer::holds`].
    hold: Option<u64>,
}

impl DirState {
    fn new() -> Self {
        DirState {
            kind: Kind::Unclassified,
            buf: BytesMut::new(),
            buf_offset: 0,
            deliveries: VecDeque::new(),
            decoder: Decoder::new(WireContext::default()),
            ctx: WireContext::default(),
            ctx_known: false,
            wait: None,
            stopped: false,
            features: None,
            saw_protocol: false,
            packets: 0,
            accounted: 0,
            hold: None,
        }
    }

    fn set_context(&mut self, ctx: WireContext) {
        self.ctx = ctx;
        self.decoder.set_context(ctx);
    }

    /// Sets a context learnt from the capture.
    fn learn_context(&mut self, ctx: WireContext) {
        self.set_context(ctx);
        self.ctx_known = true;
    }

    /// Frame that delivered the byte just before stream offset `end`.
    fn frame_for(&mut self, end: u64) -> u64 {
        while self.deliveries.len() > 1 && self.deliveries.front().is_some_and(|&(e, _)| e < end) {
            self.deliveries.pop_front();
        }
        self.deliveries.front().map_or(0, |&(_, f)| f)
    }
}

#[derive(Debug)]
struct StreamState {
    role: SocketRole,
    dirs: [DirState; 2],
}

/// Unordered pair of host addresses (the two nodes of a DRBD connection).
type HostPair = (IpAddr, IpAddr);

fn host_pair(d: Direction) -> HostPair {
    let (x, y) = (d.src.ip(), d.dst.ip());
    if x <= y {
        (x, y)
    } else {
        (y, x)
    }
}

/// Where a record goes in capture order: completing frame, stream, offset, then the order
/// of decoding (the two directions of a stream may share an offset).
type RecordKey = (u64, usize, u64, u64);

/// Incremental analysis: feed frames in capture order with [`Analyzer::push`], take the
/// records whose place is final with [`Analyzer::take_records`] as you go (or leave them),
/// then call [`Analyzer::finish`].
#[derive(Debug)]
pub struct Analyzer {
    link: LinkType,
    options: AnalyzeOptions,
    reasm: TcpReassembler,
    streams: Vec<StreamState>,
    /// Latest data-socket agreement per host pair: (stream, protocol version, features).
    pair_agreement: HashMap<HostPair, (usize, u32, u32)>,
    /// Meta sockets waiting for their host pair's agreement, by host pair.
    waiting_meta: HashMap<HostPair, Vec<usize>>,
    /// Decoded records not yet taken, in capture order.
    records: BTreeMap<RecordKey, DrbdRecord>,
    /// Records decoded so far (the last part of [`RecordKey`]).
    decoded: u64,
    /// (hold frame, stream, direction) of every waiting direction that holds bytes; the
    /// smallest frame bounds which records are final.
    holds: BTreeSet<(u64, usize, DirIndex)>,
    /// Bytes held undecoded by all directions (the sum of their `accounted`).
    undecoded: usize,
    failures: Vec<DecodeFailure>,
    notices: Vec<Notice>,
    frames: u64,
    /// Number of the last frame pushed.
    last_frame: u64,
    skipped: u64,
    /// Whether [`Analyzer::conclude`] ran.
    concluded: bool,
}

impl Analyzer {
    /// Starts an analysis of a capture with the given link type.
    pub fn new(link: LinkType, options: AnalyzeOptions) -> Self {
        Analyzer {
            link,
            options,
            reasm: TcpReassembler::new(),
            streams: Vec::new(),
            pair_agreement: HashMap::new(),
            waiting_meta: HashMap::new(),
            records: BTreeMap::new(),
            decoded: 0,
            holds: BTreeSet::new(),
            undecoded: 0,
            failures: Vec::new(),
            notices: Vec::new(),
            frames: 0,
            last_frame: 0,
            skipped: 0,
            concluded: false,
        }
    }

    /// Takes the decoded records whose place in capture order is final, in that order: no
    /// frame pushed later (nor [`Analyzer::finish`]) can give a record that sorts before
    /// them. Records decoded but not yet final stay until a later call (or `finish`).
    pub fn take_records(&mut self) -> Vec<DrbdRecord> {
        if self.concluded {
            return std::mem::take(&mut self.records).into_values().collect();
        }
        // Later records complete in a later frame, or come from a direction waiting with
        // bytes held, which cannot give a record before the frame that delivered them.
        let mut limit = self.last_frame.saturating_add(1);
        if let Some(&(frame, _, _)) = self.holds.first() {
            limit = limit.min(frame);
        }
        let mut out = Vec::new();
        while let Some(entry) = self.records.first_entry() {
            if entry.key().0 >= limit {
                break;
            }
            out.push(entry.remove());
        }
        out
    }

    fn direction(&self, stream: usize, dir: DirIndex) -> Direction {
        self.reasm.streams()[stream].direction(dir)
    }

    /// Feeds one captured frame. Frames must come in capture order.
    pub fn push(&mut self, rec: &PcapRecord) {
        self.frames += 1;
        self.last_frame = rec.number;
        let seg = match parse_frame(self.link, &rec.data, rec.orig_len) {
            Ok(seg) => seg,
            Err(_skip) => {
                self.skipped += 1;
                return;
            }
        };
        let Some(delivery) = self.reasm.push(&seg, rec.number) else {
            if self.reasm.untracked_segments() == 1 {
                self.notices.push(Notice::StreamLimit { frame: rec.number });
            }
            return;
        };
        while self.streams.len() < self.reasm.streams().len() {
            self.streams.push(StreamState {
                role: SocketRole::Unknown,
                dirs: [DirState::new(), DirState::new()],
            });
        }
        for (d, issue) in delivery.issues {
            self.stream_issue(delivery.stream, d, issue);
        }
        if delivery.data.is_empty() {
            return;
        }
        let (s, d) = (delivery.stream, delivery.dir);
        let end = delivery.offset + delivery.data.len() as u64;
        {
            let st = &mut self.streams[s].dirs[d];
            if st.kind == Kind::NotDrbd || st.stopped {
                return;
            }
            st.buf.extend_from_slice(&delivery.data);
            st.deliveries.push_back((end, rec.number));
        }
        self.classify(s, d);
        self.pump_all(vec![(s, d)]);
        // Only this direction gained bytes: stopping it brings the total back under the
        // limit.
        if self.undecoded > MAX_TOTAL_UNDECODED_BYTES && !self.streams[s].dirs[d].stopped {
            self.fail(s, d, FailureReason::SharedBufferLimit);
            self.settle(s, d);
        }
    }

    /// Brings the bookkeeping of direction `d` of stream `s` up to date after its buffer or
    /// waiting state changed: the undecoded byte count and its hold on capture order.
    fn settle(&mut self, s: usize, d: DirIndex) {
        let st = &mut self.streams[s].dirs[d];
        self.undecoded = (self.undecoded + st.buf.len()).saturating_sub(st.accounted);
        st.accounted = st.buf.len();
        let hold = if st.wait.is_some() && !st.stopped && !st.buf.is_empty() {
            Some(st.frame_for(st.buf_offset + 1))
        } else {
            None
        };
        if hold != st.hold {
            if let Some(frame) = st.hold {
                self.holds.remove(&(frame, s, d));
            }
            if let Some(frame) = hold {
                self.holds.insert((frame, s, d));
            }
            st.hold = hold;
        }
    }

    /// Decides whether a direction is DRBD from its first bytes.
    fn classify(&mut self, s: usize, d: DirIndex) {
        let st = &self.streams[s].dirs[d];
        if st.kind != Kind::Unclassified || st.buf.len() < 4 {
            return;
        }
        // Only the magic matters here: a bad header after a good magic is a decode error.
        let is_drbd = !matches!(Header::parse(&st.buf), Err(WireError::BadMagic { .. }));
        if !is_drbd {
            let st = &mut self.streams[s].dirs[d];
            st.kind = Kind::NotDrbd;
            st.buf = BytesMut::new();
            st.deliveries.clear();
            return;
        }
        // A direction whose start was captured begins before negotiation (or already has
        // the context its connection agreed on before it sent anything); otherwise use what
        // its hosts agreed on, or the assumption.
        let from_start = self.reasm.streams()[s].dir(d).saw_syn();
        let ctx = if from_start || st.ctx_known {
            st.ctx
        } else {
            let pair = host_pair(self.direction(s, d));
            match self.pair_agreement.get(&pair) {
                Some(&(_, version, features)) => WireContext {
                    protocol_version: version,
                    features,
                    ..self.options.assumed_context
                },
                None => self.options.assumed_context,
            }
        };
        let st = &mut self.streams[s].dirs[d];
        st.kind = Kind::Drbd;
        st.set_context(ctx);
    }

    /// Decodes what can be decoded in the listed directions and in any direction woken up
    /// on the way.
    fn pump_all(&mut self, mut work: Vec<(usize, DirIndex)>) {
        while let Some((s, d)) = work.pop() {
            self.pump(s, d, &mut work);
            // Decoding a packet changes the waiting state of its stream only (other streams
            // that wake up are in `work`).
            self.settle(s, 0);
            self.settle(s, 1);
        }
    }

    /// Reports a reassembly issue, unless the direction is known not to be DRBD.
    fn stream_issue(&mut self, s: usize, d: DirIndex, issue: StreamIssue) {
        if self.streams[s].dirs[d].kind == Kind::NotDrbd {
            return;
        }
        let direction = self.direction(s, d);
        self.notices.push(Notice::Stream {
            stream: s,
            direction,
            issue,
        });
    }

    fn fail(&mut self, s: usize, d: DirIndex, reason: FailureReason) {
        let direction = self.direction(s, d);
        let st = &mut self.streams[s].dirs[d];
        st.stopped = true;
        let offset = st.buf_offset;
        let frame = st.frame_for(offset + 1);
        self.failures.push(DecodeFailure {
            stream: s,
            direction,
            offset,
            frame,
            reason,
        });
        st.buf = BytesMut::new();
        st.deliveries.clear();
    }

    fn pump(&mut self, s: usize, d: DirIndex, work: &mut Vec<(usize, DirIndex)>) {
        loop {
            let st = &mut self.streams[s].dirs[d];
            if st.kind != Kind::Drbd || st.stopped || st.buf.is_empty() {
                return;
            }
            if st.wait.is_some() {
                if st.buf.len() > MAX_UNDECODED_BYTES {
                    self.fail(s, d, FailureReason::BufferLimit);
                }
                return;
            }
            let header = match Header::parse(&st.buf) {
                Ok(Some(h)) => h,
                Ok(None) => return,
                Err(e) => return self.fail(s, d, e.into()),
            };
            let total = header
                .kind
                .size()
                .saturating_add(usize::try_from(header.length).unwrap_or(usize::MAX));
            if st.buf.len() < total {
                // Let the codec judge the header now (it rejects impossible lengths as soon
                // as the header is complete), and bound what we hold.
                let held = st.buf.len();
                match st.decoder.decode(&mut st.buf) {
                    Ok(None) if held > MAX_UNDECODED_BYTES => {
                        return self.fail(s, d, FailureReason::BufferLimit)
                    }
                    Ok(None) => return,
                    Ok(Some(_)) => {
                        let took = held - self.streams[s].dirs[d].buf.len();
                        return self.fail(
                            s,
                            d,
                            FailureReason::Framing {
                                expected: total,
                                took,
                            },
                        );
                    }
                    Err(e) => return self.fail(s, d, e.into()),
                }
            }
            let before = st.buf.len();
            let (decoded, raw) = match st.decoder.decode_with_raw(&mut st.buf) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => {
                    return self.fail(
                        s,
                        d,
                        FailureReason::Framing {
                            expected: total,
                            took: 0,
                        },
                    )
                }
                Err(e) => return self.fail(s, d, e.into()),
            };
            let took = before - st.buf.len();
            if took != total {
                return self.fail(
                    s,
                    d,
                    FailureReason::Framing {
                        expected: total,
                        took,
                    },
                );
            }
            let offset = st.buf_offset;
            st.buf_offset += total as u64;
            let frame = st.frame_for(st.buf_offset);
            let context = st.ctx;
            st.packets += 1;
            let direction = self.direction(s, d);
            self.after_packet(s, d, &decoded.packet, work);
            let key = (frame, s, offset, self.decoded);
            self.decoded += 1;
            self.records.insert(
                key,
                DrbdRecord {
                    stream: s,
                    dir: d,
                    direction,
                    frame,
                    offset,
                    header,
                    decoded,
                    context,
                    raw,
                },
            );
        }
    }

    /// Tracks the handshake: socket roles, features agreement, integrity algorithm.
    fn after_packet(
        &mut self,
        s: usize,
        d: DirIndex,
        packet: &Packet,
        work: &mut Vec<(usize, DirIndex)>,
    ) {
        match packet {
            Packet::InitialData => self.streams[s].role = SocketRole::Data,
            Packet::InitialMeta => {
                self.streams[s].role = SocketRole::Meta;
                let pair = host_pair(self.direction(s, d));
                match self.pair_agreement.get(&pair) {
                    Some(&(data_stream, version, features))
                        if !self.reasm.streams()[data_stream].is_closed() =>
                    {
                        self.apply_agreement(s, version, features, work);
                    }
                    _ => {
                        for st in &mut self.streams[s].dirs {
                            st.wait = Some(Wait::PairContext);
                        }
                        self.waiting_meta.entry(pair).or_default().push(s);
                    }
                }
            }
            Packet::ConnectionFeatures(f) => {
                if self.streams[s].role == SocketRole::Unknown {
                    self.streams[s].role = SocketRole::Data;
                }
                self.streams[s].dirs[d].features = Some(*f);
                match self.streams[s].dirs[1 - d].features {
                    Some(peer) => {
                        let (version, features) = f.agree(&peer);
                        self.apply_agreement(s, version, features, work);
                        let pair = host_pair(self.direction(s, d));
                        self.pair_agreement.insert(pair, (s, version, features));
                        // Wake the meta sockets of this host pair (each is listed once per
                        // wait, so the work over the capture stays linear in its streams).
                        for m in self.waiting_meta.remove(&pair).unwrap_or_default() {
                            let still_waiting = self.streams[m]
                                .dirs
                                .iter()
                                .any(|st| st.wait == Some(Wait::PairContext));
                            if m != s && still_waiting {
                                self.apply_agreement(m, version, features, work);
                            }
                        }
                    }
                    None => self.streams[s].dirs[d].wait = Some(Wait::PeerFeatures),
                }
            }
            Packet::Protocol(p) | Packet::ProtocolUpdate(p) => {
                let Some(len) = integrity_digest_len(&p.integrity_alg) else {
                    self.fail(
                        s,
                        d,
                        FailureReason::UnknownIntegrityAlg(p.integrity_alg.clone()),
                    );
                    return;
                };
                for (dir, own) in [(d, true), (1 - d, false)] {
                    let st = &mut self.streams[s].dirs[dir];
                    if own || !st.saw_protocol {
                        let ctx = WireContext {
                            integrity_digest_len: len,
                            ..st.ctx
                        };
                        st.learn_context(ctx);
                    }
                }
                self.streams[s].dirs[d].saw_protocol = true;
            }
            _ => {}
        }
    }

    /// Sets the agreed version and features on both directions of stream `s` (keeping each
    /// direction's digest length) and resumes them.
    fn apply_agreement(
        &mut self,
        s: usize,
        version: u32,
        features: u32,
        work: &mut Vec<(usize, DirIndex)>,
    ) {
        for (d, st) in self.streams[s].dirs.iter_mut().enumerate() {
            let ctx = WireContext {
                protocol_version: version,
                features,
                ..st.ctx
            };
            st.learn_context(ctx);
            if st.wait.is_some() {
                st.wait = None;
                work.push((s, d));
            }
        }
    }

    /// Ends the analysis: reports gaps, decodes what waited for context that never came
    /// (with a fallback) and notes packets cut off by the end of the capture. The
    /// [`Analysis`] holds the records not taken with [`Analyzer::take_records`].
    pub fn finish(mut self) -> Analysis {
        self.conclude();
        let streams = self
            .streams
            .iter()
            .enumerate()
            .map(|(i, st)| StreamSummary {
                index: i,
                direction: self.direction(i, 0),
                drbd: [st.dirs[0].kind == Kind::Drbd, st.dirs[1].kind == Kind::Drbd],
                packets: [st.dirs[0].packets, st.dirs[1].packets],
                role: st.role,
            })
            .collect();
        Analysis {
            link_type: self.link,
            frames: self.frames,
            skipped_frames: self.skipped,
            streams,
            records: self.records.into_values().collect(),
            failures: self.failures,
            notices: self.notices,
        }
    }

    /// The end of the capture (what [`Analyzer::finish`] does before building the
    /// [`Analysis`]); after it every record is final. Runs once.
    fn conclude(&mut self) {
        if self.concluded {
            return;
        }
        self.concluded = true;
        for (s, d, issue) in self.reasm.finish() {
            self.stream_issue(s, d, issue);
        }
        for s in 0..self.streams.len() {
            for d in 0..2 {
                let Some(wait) = self.streams[s].dirs[d].wait else {
                    continue;
                };
                let (what, ctx) = match wait {
                    Wait::PeerFeatures => {
                        let st = &self.streams[s].dirs[d];
                        let own = st.features.unwrap_or_default();
                        let (version, features) = own.agree(&own);
                        (
                            "the peer's P_CONNECTION_FEATURES",
                            WireContext {
                                protocol_version: version,
                                features,
                                ..st.ctx
                            },
                        )
                    }
                    Wait::PairContext => {
                        let pair = host_pair(self.direction(s, d));
                        let ctx = match self.pair_agreement.get(&pair) {
                            Some(&(_, version, features)) => WireContext {
                                protocol_version: version,
                                features,
                                ..self.streams[s].dirs[d].ctx
                            },
                            None => self.options.assumed_context,
                        };
                        ("the data socket's feature agreement", ctx)
                    }
                };
                let has_data = !self.streams[s].dirs[d].buf.is_empty();
                let st = &mut self.streams[s].dirs[d];
                st.wait = None;
                st.set_context(ctx);
                self.settle(s, d);
                if has_data {
                    let direction = self.direction(s, d);
                    self.notices.push(Notice::AssumedContext {
                        stream: s,
                        direction,
                        what,
                        context: ctx,
                    });
                    self.pump_all(vec![(s, d)]);
                }
            }
        }
        for s in 0..self.streams.len() {
            for d in 0..2 {
                let st = &self.streams[s].dirs[d];
                let stopped_by_gap = self.reasm.streams()[s].dir(d).issue().is_some();
                if st.kind == Kind::Drbd && !st.stopped && !st.buf.is_empty() && !stopped_by_gap {
                    let direction = self.direction(s, d);
                    let (offset, buffered) = (st.buf_offset, st.buf.len());
                    self.notices.push(Notice::Truncated {
                        stream: s,
                        direction,
                        offset,
                        buffered,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::capture::packet::{build_ethernet_tcp, flags};
    use crate::capture::pcap::{ByteOrder, PcapWriter, TsResolution};
    use crate::wire::{encode, BlockId, DataPacket, HeaderKind};

    /// Feeds hand-made frames to an analyzer, numbering them from 1.
    struct Feed {
        analyzer: Analyzer,
        frames: Vec<Vec<u8>>,
    }

    impl Feed {
        fn new() -> Self {
            Feed {
                analyzer: Analyzer::new(LinkType::Ethernet, AnalyzeOptions::default()),
                frames: Vec::new(),
            }
        }

        fn push(&mut self, frame: Vec<u8>) {
            let rec = PcapRecord {
                number: self.frames.len() as u64 + 1,
                ts_sec: 0,
                ts_nsec: 0,
                orig_len: u32::try_from(frame.len()).expect("small frame"),
                data: frame.clone(),
            };
            self.analyzer.push(&rec);
            self.frames.push(frame);
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn bytes_of(kind: HeaderKind, packet: Packet, ctx: &WireContext) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(
            &Frame {
                kind,
                volume: 0,
                packet,
            },
            ctx,
            &mut out,
        )
        .expect("encode");
        out.to_vec()
    }

    fn data_packet(len: usize) -> Packet {
        Packet::Data(DataPacket {
            sector: 8,
            block_id: BlockId([1, 2, 3, 4, 5, 6, 7, 8]),
            seq_num: 1,
            dp_flags: 0,
            digest: Bytes::new(),
            data: Bytes::from(vec![0x42; len]),
        })
    }

    #[test]
    fn records_are_handed_out_in_capture_order_once_final() {
        let (a_meta, b_meta) = (addr("10.0.0.1:40001"), addr("10.0.0.2:7788"));
        let (a_data, b_data) = (addr("10.0.0.1:40000"), addr("10.0.0.2:7789"));
        let none = WireContext::default();
        let agreed = KERNEL_84_CONTEXT;
        let features = || Packet::ConnectionFeatures(ConnectionFeatures::new(86, 0xf, 101));
        let mut feed = Feed::new();
        // The meta socket comes up first: what follows P_INITIAL_META waits for the data
        // socket's agreement.
        feed.push(build_ethernet_tcp(a_meta, b_meta, 99, 0, flags::SYN, b""));
        feed.push(build_ethernet_tcp(
            b_meta,
            a_meta,
            499,
            0,
            flags::SYN | flags::ACK,
            b"",
        ));
        let mut m = bytes_of(HeaderKind::H80, Packet::InitialMeta, &none);
        m.extend(bytes_of(HeaderKind::H80, Packet::Ping, &none));
        feed.push(build_ethernet_tcp(a_meta, b_meta, 100, 0, flags::ACK, &m));
        let ack = bytes_of(HeaderKind::H80, Packet::PingAck, &none);
        feed.push(build_ethernet_tcp(b_meta, a_meta, 500, 0, flags::ACK, &ack));
        assert!(feed.analyzer.take_records().is_empty());
        // The data socket: features one way (waits for the other), then the other way.
        feed.push(build_ethernet_tcp(a_data, b_data, 9, 0, flags::SYN, b""));
        feed.push(build_ethernet_tcp(
            b_data,
            a_data,
            19,
            0,
            flags::SYN | flags::ACK,
            b"",
        ));
        let mut d = bytes_of(HeaderKind::H80, Packet::InitialData, &none);
        d.extend(bytes_of(HeaderKind::H80, features(), &none));
        feed.push(build_ethernet_tcp(a_data, b_data, 10, 0, flags::ACK, &d));
        assert!(feed.analyzer.take_records().is_empty());
        let f = bytes_of(HeaderKind::H80, features(), &none);
        feed.push(build_ethernet_tcp(b_data, a_data, 20, 0, flags::ACK, &f));
        let first: Vec<(u64, &str)> = feed
            .analyzer
            .take_records()
            .iter()
            .map(|r| (r.frame, r.decoded.packet.command().name()))
            .collect();
        assert_eq!(
            first,
            [
                (3, "P_INITIAL_META"),
                (3, "P_PING"),
                (4, "P_PING_ACK"),
                (7, "P_INITIAL_DATA"),
                (7, "P_CONNECTION_FEATURES"),
                (8, "P_CONNECTION_FEATURES"),
            ]
        );
        // Later packets come out with the frame that completes them.
        let data = bytes_of(HeaderKind::H100, data_packet(4096), &agreed);
        let seq = 10 + u32::try_from(d.len()).expect("small");
        feed.push(build_ethernet_tcp(
            a_data,
            b_data,
            seq,
            0,
            flags::ACK,
            &data,
        ));
        let next = feed.analyzer.take_records();
        assert_eq!(next.len(), 1);
        let r = &next[0];
        assert_eq!((r.frame, &r.raw[..]), (9, &data[..]));
        // The raw bytes and the decoded payload are one buffer.
        let Packet::Data(p) = &r.decoded.packet else {
            panic!("not P_DATA: {:?}", r.decoded.packet.command());
        };
        assert_eq!(p.data.as_ptr(), r.raw[16 + 24..].as_ptr());
        let rest = feed.analyzer.finish();
        assert!(rest.records.is_empty() && rest.failures.is_empty());
        assert!(rest.notices.is_empty(), "{:?}", rest.notices);

        // The same capture read by `analyze` and by a `RecordStream`.
        let mut w = PcapWriter::new(ByteOrder::Little, TsResolution::Micro, 1);
        for f in &feed.frames {
            w.push(0, 0, f);
        }
        let file = w.into_bytes();
        let open = || pcap::from_reader(std::io::Cursor::new(file.clone())).expect("pcap");
        let whole = analyze(open(), AnalyzeOptions::default());
        let mut stream = RecordStream::new(open(), AnalyzeOptions::default());
        let streamed: Vec<DrbdRecord> = stream.by_ref().collect();
        assert_eq!(streamed, whole.records);
        assert_eq!(streamed.len(), 7);
        let end = stream.finish();
        assert!(end.records.is_empty());
        assert_eq!(end.streams, whole.streams);
        // `finish` part-way keeps what was not yielded.
        let mut stream = RecordStream::new(open(), AnalyzeOptions::default());
        let head: Vec<DrbdRecord> = stream.by_ref().take(2).collect();
        let tail = stream.finish().records;
        assert_eq!([head, tail].concat(), whole.records);
    }

    #[test]
    fn undecoded_bytes_are_bounded_across_streams() {
        // Streams captured mid-connection, each holding most of a 1 MiB P_DATA.
        let block = 1 << 20;
        let mut packet = bytes_of(HeaderKind::H100, data_packet(block), &KERNEL_84_CONTEXT);
        packet.truncate(packet.len() - 4096);
        let fitting = MAX_TOTAL_UNDECODED_BYTES / packet.len();
        let streams = fitting + 6;
        let server = addr("10.0.0.2:7789");
        let mut feed = Feed::new();
        for i in 0..streams {
            let client = addr(&format!("10.0.0.1:{}", 40_000 + i));
            // One frame per stream, dropped once fed, to keep the test's memory down.
            feed.push(build_ethernet_tcp(
                client,
                server,
                1000,
                0,
                flags::ACK,
                &packet,
            ));
            feed.frames.clear();
            assert!(feed.analyzer.undecoded <= MAX_TOTAL_UNDECODED_BYTES);
        }
        let a = feed.analyzer.finish();
        let failed: Vec<(usize, &FailureReason)> =
            a.failures.iter().map(|f| (f.stream, &f.reason)).collect();
        let expected: Vec<(usize, &FailureReason)> = (fitting..streams)
            .map(|s| (s, &FailureReason::SharedBufferLimit))
            .collect();
        assert_eq!(failed, expected);
        let truncated = a
            .notices
            .iter()
            .filter(|n| matches!(n, Notice::Truncated { .. }))
            .count();
        assert_eq!(truncated, fitting);
    }
}
