//! TCP stream reassembly by sequence number, per connection and direction.
//!
//! Rules:
//! * A direction's stream offset 0 is the byte after its SYN, or, when the capture starts
//!   mid-connection, the first byte of the first segment seen.
//! * Bytes are delivered in order, each exactly once. Out-of-order segments wait in a bounded
//!   buffer ([`MAX_PENDING_BYTES`]) until the hole before them is filled.
//! * Where segments overlap, the bytes received first win; bytes already delivered are never
//!   re-delivered (a retransmission of them is counted and ignored).
//! * Segments much larger than the MSS (GSO/TSO super-frames as captured next to a virtio NIC
//!   or on a sending host) need no special handling: only sequence numbers matter.
//! * FIN ends a direction (data claimed beyond it is ignored); RST ends both.
//! * A hole that is never filled (the capture missed a segment) is a [`StreamIssue::Gap`]:
//!   the direction stops there, nothing after it is delivered and no byte is invented.
//! * A new SYN on a closed 4-tuple, or one with a different initial sequence number, starts a
//!   new stream (stream indices count in order of first appearance, as Wireshark's
//!   `tcp.stream` does).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;

use super::packet::{flags, TcpSegment};

/// Most out-of-order bytes held per direction while waiting for a hole to be filled. Linux's
/// largest default receive window (`tcp_rmem` max) is 6 MiB, so a sender can never have more
/// than that outstanding beyond a hole on a default system; 16 MiB leaves room for tuned
/// buffers. Past it, the direction stops with [`StreamIssue::BufferLimit`].
pub const MAX_PENDING_BYTES: usize = 16 * 1024 * 1024;

/// Most out-of-order segments held per direction (bounds the bookkeeping when a capture
/// holds many tiny segments beyond a hole).
pub const MAX_PENDING_SEGMENTS: usize = 65_536;

/// Direction within a stream: 0 from the stream's first endpoint `a` to `b`, 1 back.
pub type DirIndex = usize;

/// `src -> dst` of one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Direction {
    /// Sending endpoint.
    pub src: SocketAddr,
    /// Receiving endpoint.
    pub dst: SocketAddr,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}>{}", self.src, self.dst)
    }
}

/// Something that stopped a direction early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamIssue {
    /// Bytes `offset .. offset + missing` never appeared in the capture; the direction stops
    /// at `offset`. `dropped` bytes that were captured beyond the hole are not delivered.
    Gap {
        /// Stream offset of the first missing byte.
        offset: u64,
        /// Number of missing bytes before the next captured ones (0 if unknown).
        missing: u64,
        /// Captured bytes after the hole that are therefore not delivered.
        dropped: u64,
    },
    /// More than [`MAX_PENDING_BYTES`] (or [`MAX_PENDING_SEGMENTS`] segments) waited behind a
    /// hole at `offset`; the direction stops there.
    BufferLimit {
        /// Stream offset of the hole.
        offset: u64,
    },
}

impl fmt::Display for StreamIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamIssue::Gap {
                offset,
                missing,
                dropped,
            } => write!(
                f,
                "gap in the capture at offset {offset}: {missing} bytes missing, {dropped} \
                 captured bytes after it not decoded"
            ),
            StreamIssue::BufferLimit { offset } => write!(
                f,
                "more than {MAX_PENDING_BYTES} bytes ({MAX_PENDING_SEGMENTS} segments) \
                 waited behind a hole at offset {offset}; direction stopped"
            ),
        }
    }
}

/// Counters of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirStats {
    /// Segments carrying payload.
    pub segments: u64,
    /// Payload bytes delivered in order.
    pub delivered: u64,
    /// Segments whose bytes had all been received before (retransmissions, keep-alives).
    pub duplicates: u64,
    /// Segments that arrived ahead of a hole.
    pub out_of_order: u64,
    /// Segments that partly overlapped bytes received before.
    pub overlaps: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirState {
    Open,
    Finished,
    Stopped,
}

/// Reassembly state of one direction.
#[derive(Debug, Clone)]
pub struct DirReassembler {
    /// Sequence number of stream offset 0.
    base: Option<u32>,
    /// Sequence number of the SYN, when one was seen.
    syn_seq: Option<u32>,
    /// Next stream offset to deliver.
    next: u64,
    /// Stream offset at which the FIN sits.
    fin_at: Option<u64>,
    /// Out-of-order bytes by stream offset; ranges never overlap.
    pending: BTreeMap<u64, Vec<u8>>,
    pending_bytes: usize,
    state: DirState,
    issue: Option<StreamIssue>,
    stats: DirStats,
}

impl Default for DirReassembler {
    fn default() -> Self {
        Self::new()
    }
}

impl DirReassembler {
    /// A direction with nothing seen yet.
    pub fn new() -> Self {
        DirReassembler {
            base: None,
            syn_seq: None,
            next: 0,
            fin_at: None,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            state: DirState::Open,
            issue: None,
            stats: DirStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> DirStats {
        self.stats
    }

    /// The issue that stopped this direction, if any.
    pub fn issue(&self) -> Option<&StreamIssue> {
        self.issue.as_ref()
    }

    /// Next stream offset to be delivered (= bytes delivered so far).
    pub fn delivered_len(&self) -> u64 {
        self.next
    }

    /// Whether this direction's SYN was captured (so offset 0 is the true stream start).
    pub fn saw_syn(&self) -> bool {
        self.syn_seq.is_some()
    }

    /// Whether a FIN was seen and everything before it delivered.
    pub fn is_finished(&self) -> bool {
        self.state == DirState::Finished
    }

    /// Maps a sequence number to a stream offset near the delivery point (handles wrap-around
    /// and streams longer than 4 GiB). Negative means before the stream start.
    fn offset_of(&self, seq: u32, base: u32) -> i128 {
        // Truncation intended: sequence numbers live modulo 2^32.
        let next_seq = base.wrapping_add(self.next as u32);
        let diff = i128::from(seq.wrapping_sub(next_seq) as i32);
        i128::from(self.next) + diff
    }

    /// Feeds one segment of this direction; newly in-order bytes are appended to `out`.
    /// Returns an issue when this segment made the direction stop.
    pub fn push(
        &mut self,
        seq: u32,
        flag_bits: u8,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<StreamIssue> {
        if self.state != DirState::Open {
            if !payload.is_empty() {
                self.stats.segments += 1;
                self.stats.duplicates += 1;
            }
            return None;
        }
        let mut data_seq = seq;
        if flag_bits & flags::SYN != 0 {
            match self.syn_seq {
                None if self.base.is_none() => {
                    self.syn_seq = Some(seq);
                    self.base = Some(seq.wrapping_add(1));
                }
                _ => {}
            }
            // Data on a SYN (TCP Fast Open) starts after the SYN's sequence number.
            data_seq = seq.wrapping_add(1);
        }
        let base = match self.base {
            Some(b) => b,
            None => {
                if payload.is_empty() && flag_bits & flags::FIN == 0 {
                    // A bare ACK of a connection already running: its sequence number is the
                    // next byte, a fine origin.
                    self.base = Some(seq);
                    return None;
                }
                self.base = Some(data_seq);
                data_seq
            }
        };
        let start = self.offset_of(data_seq, base);
        let len = i128::try_from(payload.len()).unwrap_or(i128::MAX);
        if flag_bits & flags::FIN != 0 && start + len >= 0 && self.fin_at.is_none() {
            self.fin_at = u64::try_from(start + len).ok();
        }
        if !payload.is_empty() {
            self.stats.segments += 1;
            self.insert(start, payload, out);
        }
        self.maybe_finish();
        if self.state == DirState::Stopped {
            return self.issue.clone();
        }
        None
    }

    fn insert(&mut self, start: i128, payload: &[u8], out: &mut Vec<u8>) {
        let next = i128::from(self.next);
        let end = start + i128::try_from(payload.len()).unwrap_or(i128::MAX);
        // Never accept bytes beyond a FIN.
        let end = match self.fin_at {
            Some(fin) => end.min(i128::from(fin)),
            None => end,
        };
        if end <= next {
            self.stats.duplicates += 1;
            return;
        }
        let (start, payload) = if start < next {
            self.stats.overlaps += 1;
            let skip = usize::try_from(next - start).unwrap_or(payload.len());
            (next, payload.get(skip..).unwrap_or(&[]))
        } else {
            (start, payload)
        };
        let keep = usize::try_from(end - start).unwrap_or(0).min(payload.len());
        let payload = &payload[..keep];
        let Ok(start) = u64::try_from(start) else {
            return;
        };
        if start == self.next {
            // Deliver the segment up to the next held range, let the held (first-received)
            // bytes win where they overlap, and continue after them.
            let seg_end = start + payload.len() as u64;
            while self.next < seg_end {
                let before = self.next;
                let upto = match self.pending.first_key_value() {
                    Some((&s, _)) => s.clamp(self.next, seg_end),
                    None => seg_end,
                };
                let lo = usize::try_from(self.next - start).unwrap_or(payload.len());
                let hi = usize::try_from(upto - start).unwrap_or(payload.len());
                if let Some(fresh) = payload.get(lo..hi) {
                    out.extend_from_slice(fresh);
                    self.next = upto;
                    self.stats.delivered += fresh.len() as u64;
                }
                self.drain(out);
                if self.next == before {
                    break;
                }
            }
            self.drain(out);
        } else {
            self.stats.out_of_order += 1;
            self.buffer(start, payload);
        }
    }

    /// Stores the parts of `[start, start+len)` not already held (first-received wins).
    fn buffer(&mut self, start: u64, payload: &[u8]) {
        let end = start + payload.len() as u64;
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        let mut cursor = start;
        // A held range starting before `start` may cover its beginning.
        if let Some((&s, held)) = self.pending.range(..start).next_back() {
            let e = s + held.len() as u64;
            if e > cursor {
                self.stats.overlaps += 1;
                cursor = e.min(end);
            }
        }
        let mut overlapped = false;
        for (&s, held) in self.pending.range(start..end) {
            if s > cursor {
                pieces.push((cursor, s));
            }
            overlapped = true;
            cursor = cursor.max(s + held.len() as u64);
            if cursor >= end {
                break;
            }
        }
        if cursor < end {
            pieces.push((cursor, end));
        }
        if overlapped {
            self.stats.overlaps += 1;
        }
        for (s, e) in pieces {
            let lo = usize::try_from(s - start).unwrap_or(0);
            let hi = usize::try_from(e - start).unwrap_or(0);
            let Some(bytes) = payload.get(lo..hi) else {
                continue;
            };
            if self.pending_bytes + bytes.len() > MAX_PENDING_BYTES
                || self.pending.len() >= MAX_PENDING_SEGMENTS
            {
                self.stop(StreamIssue::BufferLimit { offset: self.next });
                return;
            }
            self.pending_bytes += bytes.len();
            self.pending.insert(s, bytes.to_vec());
        }
    }

    /// Delivers held ranges that have become contiguous.
    fn drain(&mut self, out: &mut Vec<u8>) {
        while let Some(entry) = self.pending.first_entry() {
            let s = *entry.key();
            if s > self.next {
                break;
            }
            let held = entry.remove();
            self.pending_bytes -= held.len();
            let e = s + held.len() as u64;
            if e > self.next {
                let skip = usize::try_from(self.next - s).unwrap_or(held.len());
                let fresh = held.get(skip..).unwrap_or(&[]);
                out.extend_from_slice(fresh);
                self.next += fresh.len() as u64;
                self.stats.delivered += fresh.len() as u64;
            }
        }
    }

    fn maybe_finish(&mut self) {
        if self.state == DirState::Open && self.fin_at.is_some_and(|f| self.next >= f) {
            self.state = DirState::Finished;
        }
    }

    fn stop(&mut self, issue: StreamIssue) {
        self.state = DirState::Stopped;
        self.pending.clear();
        self.pending_bytes = 0;
        self.issue = Some(issue);
    }

    /// Ends the direction (end of capture or RST): a hole still open becomes a
    /// [`StreamIssue::Gap`], which is returned.
    pub fn close(&mut self) -> Option<StreamIssue> {
        if self.state != DirState::Open {
            return None;
        }
        let issue = match self.pending.first_key_value() {
            Some((&s, _)) => Some(StreamIssue::Gap {
                offset: self.next,
                missing: s - self.next,
                dropped: self.pending_bytes as u64,
            }),
            None => match self.fin_at {
                Some(fin) if fin > self.next => Some(StreamIssue::Gap {
                    offset: self.next,
                    missing: fin - self.next,
                    dropped: 0,
                }),
                _ => None,
            },
        };
        match issue {
            Some(i) => {
                self.stop(i.clone());
                Some(i)
            }
            None => {
                self.state = DirState::Finished;
                None
            }
        }
    }
}

/// One TCP connection of the capture.
#[derive(Debug, Clone)]
pub struct TcpStream {
    /// Stream index (order of first appearance, from 0).
    pub index: usize,
    /// The endpoint that sent the first segment seen (the client when the SYN was captured).
    pub a: SocketAddr,
    /// The other endpoint.
    pub b: SocketAddr,
    /// Frame number of the first segment.
    pub first_frame: u64,
    dirs: [DirReassembler; 2],
    reset: bool,
}

impl TcpStream {
    /// `src -> dst` of direction `dir` (0: a to b, 1: b to a).
    pub fn direction(&self, dir: DirIndex) -> Direction {
        if dir == 0 {
            Direction {
                src: self.a,
                dst: self.b,
            }
        } else {
            Direction {
                src: self.b,
                dst: self.a,
            }
        }
    }

    /// Reassembly state of one direction.
    pub fn dir(&self, dir: DirIndex) -> &DirReassembler {
        &self.dirs[dir.min(1)]
    }

    /// Whether the connection ended (RST, or FIN in both directions).
    pub fn is_closed(&self) -> bool {
        self.reset || (self.dirs[0].is_finished() && self.dirs[1].is_finished())
    }

    /// Whether a RST was seen.
    pub fn was_reset(&self) -> bool {
        self.reset
    }
}

/// What one segment did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Stream index.
    pub stream: usize,
    /// Direction the segment travelled.
    pub dir: DirIndex,
    /// Stream offset of the first newly delivered byte.
    pub offset: u64,
    /// Bytes that became contiguous thanks to this segment (possibly empty).
    pub data: Vec<u8>,
    /// Issues raised by this segment (a buffer limit, or gaps closed by a RST).
    pub issues: Vec<(DirIndex, StreamIssue)>,
}

/// Connection key independent of direction.
type ConnKey = (SocketAddr, SocketAddr);

fn conn_key(x: SocketAddr, y: SocketAddr) -> ConnKey {
    if x <= y {
        (x, y)
    } else {
        (y, x)
    }
}

/// Reassembles every TCP connection of a capture.
#[derive(Debug, Clone, Default)]
pub struct TcpReassembler {
    streams: Vec<TcpStream>,
    current: HashMap<ConnKey, usize>,
}

impl TcpReassembler {
    /// An empty reassembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// All streams seen so far, by index.
    pub fn streams(&self) -> &[TcpStream] {
        &self.streams
    }

    /// Feeds one segment captured in frame `frame`.
    pub fn push(&mut self, seg: &TcpSegment<'_>, frame: u64) -> Delivery {
        let key = conn_key(seg.src, seg.dst);
        let is_syn = seg.flags & flags::SYN != 0;
        let idx = match self.current.get(&key) {
            Some(&i) if !(is_syn && self.syn_starts_new(i, seg)) => i,
            _ => {
                let index = self.streams.len();
                self.streams.push(TcpStream {
                    index,
                    // With SYN+ACK first (SYN missed), the sender is the server.
                    a: if is_syn && seg.flags & flags::ACK != 0 {
                        seg.dst
                    } else {
                        seg.src
                    },
                    b: if is_syn && seg.flags & flags::ACK != 0 {
                        seg.src
                    } else {
                        seg.dst
                    },
                    first_frame: frame,
                    dirs: [DirReassembler::new(), DirReassembler::new()],
                    reset: false,
                });
                self.current.insert(key, index);
                index
            }
        };
        let stream = &mut self.streams[idx];
        let dir = usize::from(seg.src != stream.a);
        let mut out = Vec::new();
        let offset = stream.dirs[dir].delivered_len();
        let mut issues = Vec::new();
        if let Some(i) = stream.dirs[dir].push(seg.seq, seg.flags, seg.payload, &mut out) {
            issues.push((dir, i));
        }
        if seg.flags & flags::RST != 0 && !stream.reset {
            stream.reset = true;
            for d in 0..2 {
                if let Some(i) = stream.dirs[d].close() {
                    issues.push((d, i));
                }
            }
        }
        Delivery {
            stream: idx,
            dir,
            offset,
            data: out,
            issues,
        }
    }

    /// Whether a SYN for stream `i` begins a new connection on the same 4-tuple.
    fn syn_starts_new(&self, i: usize, seg: &TcpSegment<'_>) -> bool {
        let Some(stream) = self.streams.get(i) else {
            return true;
        };
        if stream.is_closed() {
            return true;
        }
        let dir = usize::from(seg.src != stream.a);
        match stream.dirs[dir].syn_seq {
            Some(isn) => isn != seg.seq,
            // A SYN after data in that direction: a new connection reusing the ports.
            None => stream.dirs[dir].base.is_some(),
        }
    }

    /// Ends the capture: every direction still waiting behind a hole reports its gap.
    pub fn finish(&mut self) -> Vec<(usize, DirIndex, StreamIssue)> {
        let mut issues = Vec::new();
        for s in &mut self.streams {
            for d in 0..2 {
                if let Some(i) = s.dirs[d].close() {
                    issues.push((s.index, d, i));
                }
            }
        }
        issues
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(r: &mut DirReassembler, seq: u32, f: u8, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        r.push(seq, f, data, &mut out);
        out
    }

    #[test]
    fn in_order_after_syn() {
        let mut r = DirReassembler::new();
        assert!(push(&mut r, 999, flags::SYN, b"").is_empty());
        assert_eq!(push(&mut r, 1000, 0, b"abc"), b"abc");
        assert_eq!(push(&mut r, 1003, 0, b"def"), b"def");
        assert_eq!(r.delivered_len(), 6);
    }

    #[test]
    fn out_of_order_retransmission_overlap() {
        let mut r = DirReassembler::new();
        push(&mut r, 0, flags::SYN, b"");
        assert!(push(&mut r, 4, 0, b"efgh").is_empty()); // ahead of a hole
        assert!(push(&mut r, 9, 0, b"jk").is_empty()); // further ahead
        assert_eq!(push(&mut r, 1, 0, b"abc"), b"abcefgh"); // fills the first hole
        assert_eq!(push(&mut r, 1, 0, b"abc"), b""); // retransmission: ignored
                                                     // Overlap: bytes 7..8 were delivered ('gh'), 'i' is new, 'JK' conflicts with held
                                                     // 'jk' and the first-received bytes win.
        assert_eq!(push(&mut r, 6, 0, b"GHiJKl"), b"ijkl");
        let st = r.stats();
        assert_eq!(st.duplicates, 1);
        assert!(st.out_of_order >= 2);
        assert!(st.overlaps >= 1);
        assert!(r.close().is_none());
    }

    #[test]
    fn overlapping_out_of_order_keeps_first_bytes() {
        let mut r = DirReassembler::new();
        push(&mut r, 0, flags::SYN, b"");
        push(&mut r, 5, 0, b"EFG"); // offsets 4..7
        push(&mut r, 3, 0, b"cdxyzH"); // offsets 2..8: 4..7 already held
        assert_eq!(push(&mut r, 1, 0, b"ab"), b"abcdEFGH");
    }

    #[test]
    fn gap_is_reported_and_nothing_invented() {
        let mut r = DirReassembler::new();
        push(&mut r, 0, flags::SYN, b"");
        assert_eq!(push(&mut r, 1, 0, b"abc"), b"abc");
        assert!(push(&mut r, 10, 0, b"zzz").is_empty());
        assert_eq!(
            r.close(),
            Some(StreamIssue::Gap {
                offset: 3,
                missing: 6,
                dropped: 3
            })
        );
        // After the gap the direction stays stopped.
        assert!(push(&mut r, 4, 0, b"defghi").is_empty());
        assert_eq!(r.delivered_len(), 3);
    }

    #[test]
    fn mid_stream_start_and_wraparound() {
        let mut r = DirReassembler::new();
        let start = u32::MAX - 2;
        assert_eq!(push(&mut r, start, flags::ACK, b"ab"), b"ab");
        assert_eq!(
            push(&mut r, start.wrapping_add(2), flags::ACK, b"cdef"),
            b"cdef"
        );
        assert_eq!(push(&mut r, 3, flags::ACK, b"g"), b"g");
        assert_eq!(r.delivered_len(), 7);
        // Data before the stream start (not captured) is ignored.
        assert!(push(&mut r, start.wrapping_sub(10), 0, b"old").is_empty());
    }

    #[test]
    fn fin_ends_the_direction() {
        let mut r = DirReassembler::new();
        push(&mut r, 0, flags::SYN, b"");
        assert_eq!(push(&mut r, 1, flags::FIN, b"bye"), b"bye");
        assert!(r.is_finished());
        assert!(push(&mut r, 4, 0, b"more").is_empty());
        // Out of order FIN: the data before it arrives later.
        let mut r = DirReassembler::new();
        push(&mut r, 0, flags::SYN, b"");
        assert!(push(&mut r, 3, flags::FIN | flags::ACK, b"cd").is_empty());
        assert_eq!(push(&mut r, 1, 0, b"abXYZ"), b"abcd");
        assert!(r.is_finished());
    }

    #[test]
    fn buffer_limit_stops_the_direction() {
        let mut r = DirReassembler::new();
        push(&mut r, 0, flags::SYN, b"");
        let chunk = vec![0u8; 60_000];
        let mut seq = 1000u32;
        let mut issue = None;
        for _ in 0..(MAX_PENDING_BYTES / chunk.len() + 2) {
            let mut out = Vec::new();
            if let Some(i) = r.push(seq, 0, &chunk, &mut out) {
                issue = Some(i);
                break;
            }
            seq += chunk.len() as u32;
        }
        assert_eq!(issue, Some(StreamIssue::BufferLimit { offset: 0 }));
        assert!(push(&mut r, 1, 0, b"x").is_empty());
    }

    fn seg<'a>(src: &str, dst: &str, seq: u32, f: u8, payload: &'a [u8]) -> TcpSegment<'a> {
        TcpSegment {
            src: src.parse().expect("addr"),
            dst: dst.parse().expect("addr"),
            seq,
            ack: 0,
            flags: f,
            payload,
            missing: 0,
        }
    }

    #[test]
    fn streams_are_numbered_and_reused_tuples_split() {
        let (c, s) = ("10.0.0.1:40000", "10.0.0.2:7789");
        let mut t = TcpReassembler::new();
        assert_eq!(t.push(&seg(c, s, 100, flags::SYN, b""), 1).stream, 0);
        assert_eq!(
            t.push(&seg(s, c, 0, flags::RST | flags::ACK, b""), 2)
                .stream,
            0
        );
        // Same tuple, new SYN after the RST: a new stream.
        assert_eq!(t.push(&seg(c, s, 500, flags::SYN, b""), 3).stream, 1);
        let d = t.push(&seg(s, c, 9, flags::SYN | flags::ACK, b""), 4);
        assert_eq!((d.stream, d.dir), (1, 1));
        let d = t.push(&seg(c, s, 501, flags::ACK, b"hi"), 5);
        assert_eq!(
            (d.stream, d.dir, d.offset, d.data.as_slice()),
            (1, 0, 0, &b"hi"[..])
        );
        let d = t.push(&seg(s, c, 10, flags::ACK, b"yo"), 6);
        assert_eq!((d.stream, d.dir, d.data.as_slice()), (1, 1, &b"yo"[..]));
        // SYN retransmission with the same ISN stays in the stream.
        assert_eq!(t.push(&seg(c, s, 500, flags::SYN, b""), 7).stream, 1);
        assert_eq!(t.streams()[1].direction(0).to_string(), format!("{c}>{s}"));
        assert!(t.finish().is_empty());
    }
}
