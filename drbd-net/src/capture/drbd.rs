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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Read;
use std::net::IpAddr;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use super::packet::parse_frame;
use super::pcap::{self, LinkType, PcapReader, PcapRecord};
use super::reassembly::{DirIndex, Direction, StreamIssue, TcpReassembler};
use super::CaptureError;
use crate::wire::{
    ConnectionFeatures, Decoder, Frame, Header, Packet, WireContext, WireError, FF_THIN_RESYNC,
    FF_TRIM, FF_WSAME, FF_WZEROES,
};

/// Most bytes a DRBD direction may hold undecoded. The largest legal packet is a `P_DATA`
/// of 1 MiB with a 16-byte header, 24-byte sub-header and a 64-byte digest; a direction
/// waiting for its context holds only what the sender transmits before the peer answers
/// (in DRBD's handshake, nothing beyond its features packet). 4 MiB covers both with room
/// to spare; more means the stream is not DRBD as we understand it.
pub const MAX_UNDECODED_BYTES: usize = 4 * 1024 * 1024;

/// Digest lengths of the data-integrity algorithms DRBD users configure (kernel crypto
/// names as given to `data-integrity-alg`). The empty name means no integrity checking.
pub const INTEGRITY_DIGEST_LENS: &[(&str, usize)] = &[
    ("", 0),
    ("crc32c", 4),
    ("crc32", 4),
    ("md4", 16),
    ("md5", 16),
    ("sha1", 20),
    ("sha224", 28),
    ("sha256", 32),
    ("sha384", 48),
    ("sha512", 64),
];

/// The digest length of a data-integrity algorithm, if known.
pub fn integrity_digest_len(alg: &str) -> Option<usize> {
    INTEGRITY_DIGEST_LENS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(alg))
        .map(|&(_, len)| len)
}

/// The context an in-kernel DRBD 8.4.11 pair agrees on (protocol 101, features TRIM,
/// THIN_RESYNC, WSAME and WZEROES, no data-integrity algorithm), used for streams whose
/// handshake is not in the capture.
pub const KERNEL_84_CONTEXT: WireContext = WireContext {
    integrity_digest_len: 0,
    features: FF_TRIM | FF_THIN_RESYNC | FF_WSAME | FF_WZEROES,
    protocol_version: 101,
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
    /// The packet's bytes as captured: header and payload.
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
    /// Decoded DRBD packets in capture order.
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

/// Analyses a capture from an open reader. A read error part-way through ends the analysis
/// there, reported as a [`Notice::Capture`].
pub fn analyze<R: Read>(mut reader: PcapReader<R>, options: AnalyzeOptions) -> Analysis {
    let link = reader.header().link_type;
    let mut analyzer = Analyzer::new(link, options);
    loop {
        match reader.next_record() {
            Ok(Some(rec)) => analyzer.push(&rec),
            Ok(None) => break,
            Err(e) => {
                analyzer.notices.push(Notice::Capture(e.to_string()));
                break;
            }
        }
    }
    analyzer.finish()
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

/// The agreed protocol version and features of two features packets.
fn agree(a: &ConnectionFeatures, b: &ConnectionFeatures) -> (u32, u32) {
    let max = |f: &ConnectionFeatures| {
        if f.protocol_max == 0 {
            f.protocol_min
        } else {
            f.protocol_max
        }
    };
    (max(a).min(max(b)), a.feature_flags & b.feature_flags)
}

/// Incremental analysis: feed frames in capture order with [`Analyzer::push`], then call
/// [`Analyzer::finish`].
#[derive(Debug)]
pub struct Analyzer {
    link: LinkType,
    options: AnalyzeOptions,
    reasm: TcpReassembler,
    streams: Vec<StreamState>,
    /// Latest data-socket agreement per host pair: (stream, protocol version, features).
    pair_agreement: HashMap<HostPair, (usize, u32, u32)>,
    records: Vec<DrbdRecord>,
    failures: Vec<DecodeFailure>,
    notices: Vec<Notice>,
    frames: u64,
    skipped: u64,
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
            records: Vec::new(),
            failures: Vec::new(),
            notices: Vec::new(),
            frames: 0,
            skipped: 0,
        }
    }

    fn direction(&self, stream: usize, dir: DirIndex) -> Direction {
        self.reasm.streams()[stream].direction(dir)
    }

    /// Feeds one captured frame.
    pub fn push(&mut self, rec: &PcapRecord) {
        self.frames += 1;
        let seg = match parse_frame(self.link, &rec.data, rec.orig_len) {
            Ok(seg) => seg,
            Err(_skip) => {
                self.skipped += 1;
                return;
            }
        };
        let delivery = self.reasm.push(&seg, rec.number);
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
            let raw = Bytes::copy_from_slice(&st.buf[..total]);
            let before = st.buf.len();
            let decoded = match st.decoder.decode(&mut st.buf) {
                Ok(Some(frame)) => frame,
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
            self.records.push(DrbdRecord {
                stream: s,
                dir: d,
                direction,
                frame,
                offset,
                header,
                decoded,
                context,
                raw,
            });
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
                        let (version, features) = agree(f, &peer);
                        self.apply_agreement(s, version, features, work);
                        let pair = host_pair(self.direction(s, d));
                        self.pair_agreement.insert(pair, (s, version, features));
                        // Wake the meta sockets of this host pair.
                        let waiting: Vec<usize> = (0..self.streams.len())
                            .filter(|&m| {
                                m != s
                                    && host_pair(self.direction(m, 0)) == pair
                                    && self.streams[m]
                                        .dirs
                                        .iter()
                                        .any(|st| st.wait == Some(Wait::PairContext))
                            })
                            .collect();
                        for m in waiting {
                            self.apply_agreement(m, version, features, work);
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
    /// (with a fallback), notes packets cut off by the end of the capture, and sorts.
    pub fn finish(mut self) -> Analysis {
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
                        let (version, features) = agree(&own, &own);
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
        self.records.sort_by_key(|r| (r.frame, r.stream, r.offset));
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
            records: self.records,
            failures: self.failures,
            notices: self.notices,
        }
    }
}
