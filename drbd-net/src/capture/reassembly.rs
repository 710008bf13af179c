//! TCP stream reassembly by sequence number, per connection and direction.
//!
//! Rules:
//! * A direction's stream offset 0 is the byte after its SYN, or, when the capture starts
//!   mid-connection, the first byte of the first segment seen.
//! * Bytes are delivered in order, each exactly once. Out-of-order segments wait in a bounded
//!   buffer ([`MAX_PENDING_BYTES`] per direction, [`MAX_TOTAL_PENDING_BYTES`] across the whole
//!   capture) until the hole before them is filled.
//! * At most [`MAX_STREAMS`] connections are tracked; segments of further connections are
//!   counted and ignored (see [`TcpReassembler::push`]).
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

/// Most out-of-order bytes held across all streams of a capture at once. The per-direction
/// limit alone does not bound memory: a capture (and a small gzip file expands to a large
/// one) may hold any number of connections, each with a hole followed by up to
/// [`MAX_PENDING_BYTES`]. 64 MiB is four directions at their own limit, far more than real
/// traffic keeps waiting behind holes at one time. Each held segment also counts
/// [`PENDING_SEGMENT_COST`]. The direction whose segment would go past it stops with
/// [`StreamIssue::SharedBufferLimit`], releasing what it held.
pub const MAX_TOTAL_PENDING_BYTES: usize = 64 * 1024 * 1024;

/// What one held out-of-order segment counts against [`MAX_TOTAL_PENDING_BYTES`] on top of
/// its payload: roughly its allocation header and map entry, so that many tiny segments
/// cannot hold much more memory than the budget says.
pub const PENDING_SEGMENT_COST: usize = 64;

/// Most TCP connections tracked in one capture. Each one costs around a kilobyte of
/// bookkeeping here and in the DRBD analysis, kept after it closes (stream indices stay
/// valid), so this bounds that at about 64 MiB; a capture of DRBD nodes has two connections
/// per resource and connection attempt. Segments of connections beyond it are counted and
/// not reassembled.
pub const MAX_STREAMS: usize = 65_536;

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
    /// The bytes waiting behind holes in all streams together would have gone past
    /// [`MAX_TOTAL_PENDING_BYTES`] with this direction's; it stops at its hole at `offset`.
    SharedBufferLimit {
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
            StreamIssue::SharedBufferLimit { offset } => write!(
                f,
                "more than {MAX_TOTAL_PENDING_BYTES} bytes waited behind holes across all \
                 streams of the capture; direction stopped at its hole at offset {offset}"
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
    ///
    /// A direction used alone is bounded by [`MAX_PENDING_BYTES`] only; within a
    /// [`TcpReassembler`] the shared [`MAX_TOTAL_PENDING_BYTES`] applies as well.
    pub fn push(
        &mut self,
        seq: u32,
        flag_bits: u8,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<StreamIssue> {
        let mut unlimited = usize::MAX;
        self.push_within(seq, flag_bits, payload, out, &mut unlimited)
    }

    /// Out-of-order bytes held, as counted against [`MAX_TOTAL_PENDING_BYTES`] (payload plus
    /// [`PENDING_SEGMENT_COST`] per segment).
    fn held_cost(&self) -> usize {
        self.pending_bytes + self.pending.len() * PENDING_SEGMENT_COST
    }

    /// [`DirReassembler::push`] with at most `shared_left` more held cost (see
    /// [`DirReassembler::held_cost`]) allowed; what is newly held is taken off it.
    fn push_within(
        &mut self,
        seq: u32,
        flag_bits: u8,
        payload: &[u8],
        out: &mut Vec<u8>,
        shared_left: &mut usize,
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
            self.insert(start, payload, out, shared_left);
        }
        self.maybe_finish();
        if self.state == DirState::Stopped {
            return self.issue.clone();
        }
        None
    }

    fn insert(&mut self, start: i128, payload: &[u8], out: &mut Vec<u8>, shared_left: &mut usize) {
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
            self.buffer(start, payload, shared_left);
        }
    }

    /// Stores the parts of `[start, start+len)` not already held (first-received wins), or
    /// stops the direction when a limit would be passed.
    fn buffer(&mut self, start: u64, payload: &[u8], shared_left: &mut usize) {
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
            let cost = bytes.len() + PENDING_SEGMENT_COST;
            if cost > *shared_left {
                self.stop(StreamIssue::SharedBufferLimit { offset: self.next });
                return;
            }
            *shared_left -= cost;
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

    fn held_cost(&self) -> usize {
        self.dirs[0].held_cost() + self.dirs[1].held_cost()
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

/// Reassembles every TCP connection of a capture (at most [`MAX_STREAMS`]), holding at most
/// [`MAX_TOTAL_PENDING_BYTES`] out of order across all of them.
#[derive(Debug, Clone, Default)]
pub struct TcpReassembler {
    streams: Vec<TcpStream>,
    current: HashMap<ConnKey, usize>,
    /// Sum of the streams' held cost (see [`TcpReassembler::pending_cost`]).
    pending_cost: usize,
    /// Segments ignored because [`MAX_STREAMS`] connections were already tracked.
    untracked_segments: u64,
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

    /// Out-of-order bytes held across all streams, plus [`PENDING_SEGMENT_COST`] per held
    /// segment: never more than [`MAX_TOTAL_PENDING_BYTES`].
    pub fn pending_cost(&self) -> usize {
        self.pending_cost
    }

    /// Segments ignored because they would have started a connection beyond
    /// [`MAX_STREAMS`] (or belong to one).
    pub fn untracked_segments(&self) -> u64 {
        self.untracked_segments
    }

    /// Feeds one segment captured in frame `frame`. `None` when the segment would start a
    /// connection beyond [`MAX_STREAMS`], or belongs to one: it is counted in
    /// [`TcpReassembler::untracked_segments`] and otherwise ignored.
    pub fn push(&mut self, seg: &TcpSegment<'_>, frame: u64) -> Option<Delivery> {
        let key = conn_key(seg.src, seg.dst);
        let is_syn = seg.flags & flags::SYN != 0;
        let idx = match self.current.get(&key) {
            Some(&i) if !(is_syn && self.syn_starts_new(i, seg)) => i,
            _ if self.streams.len() >= MAX_STREAMS => {
                // Later segments of this tuple must not land in an older stream either.
                self.current.remove(&key);
                self.untracked_segments += 1;
                return None;
            }
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
        let mut shared_left = MAX_TOTAL_PENDING_BYTES.saturating_sub(self.pending_cost);
        let stream = &mut self.streams[idx];
        let held_before = stream.held_cost();
        let dir = usize::from(seg.src != stream.a);
        let mut out = Vec::new();
        let offset = stream.dirs[dir].delivered_len();
        let mut issues = Vec::new();
        if let Some(i) = stream.dirs[dir].push_within(
            seg.seq,
            seg.flags,
            seg.payload,
            &mut out,
            &mut shared_left,
        ) {
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
        let held_after = stream.held_cost();
        self.pending_cost = (self.pending_cost + held_after).saturating_sub(held_before);
        Some(Delivery {
            stream: idx,
            dir,
            offset,
            data: out,
            issues,
        })
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
        self.pending_cost = 0;
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
        }
    }

    fn tracked(t: &mut TcpReassembler, seg: &TcpSegment<'_>, frame: u64) -> Delivery {
        t.push(seg, frame).expect("stream tracked")
    }

    #[test]
    fn streams_are_numbered_and_reused_tuples_split() {
        let (c, s) = ("10.0.0.1:40000", "10.0.0.2:7789");
        let mut t = TcpReassembler::new();
        assert_eq!(
            tracked(&mut t, &seg(c, s, 100, flags::SYN, b""), 1).stream,
            0
        );
        assert_eq!(
            tracked(&mut t, &seg(s, c, 0, flags::RST | flags::ACK, b""), 2).stream,
            0
        );
        // Same tuple, new SYN after the RST: a new stream.
        assert_eq!(
            tracked(&mut t, &seg(c, s, 500, flags::SYN, b""), 3).stream,
            1
        );
        let d = tracked(&mut t, &seg(s, c, 9, flags::SYN | flags::ACK, b""), 4);
        assert_eq!((d.stream, d.dir), (1, 1));
        let d = tracked(&mut t, &seg(c, s, 501, flags::ACK, b"hi"), 5);
        assert_eq!(
            (d.stream, d.dir, d.offset, d.data.as_slice()),
            (1, 0, 0, &b"hi"[..])
        );
        let d = tracked(&mut t, &seg(s, c, 10, flags::ACK, b"yo"), 6);
        assert_eq!((d.stream, d.dir, d.data.as_slice()), (1, 1, &b"yo"[..]));
        // SYN retransmission with the same ISN stays in the stream.
        assert_eq!(
            tracked(&mut t, &seg(c, s, 500, flags::SYN, b""), 7).stream,
            1
        );
        assert_eq!(t.streams()[1].direction(0).to_string(), format!("{c}>{s}"));
        assert!(t.finish().is_empty());
    }

    #[test]
    fn shared_budget_bounds_many_streams_with_holes() {
        let server = "10.0.0.2:7789";
        let chunk = vec![0x5a_u8; 1 << 20];
        // Each stream holds 15 MiB behind a hole: under its own limit, but only four such
        // streams fit the shared budget.
        let per_stream = MAX_PENDING_BYTES / chunk.len() - 1;
        let fitting = MAX_TOTAL_PENDING_BYTES / (per_stream * (chunk.len() + PENDING_SEGMENT_COST));
        assert_eq!(fitting, 4);
        let streams = fitting + 3;
        let mut t = TcpReassembler::new();
        let mut stopped = Vec::new();
        let mut frame = 0;
        for i in 0..streams {
            let client = format!("10.0.0.1:{}", 40_000 + i);
            frame += 1;
            tracked(&mut t, &seg(&client, server, 0, flags::SYN, b""), frame);
            for k in 0..per_stream {
                frame += 1;
                // Offset 10 onwards: bytes 0..10 never arrive.
                let seq = u32::try_from(11 + k * chunk.len()).expect("small");
                let d = tracked(&mut t, &seg(&client, server, seq, 0, &chunk), frame);
                assert!(d.data.is_empty());
                assert!(t.pending_cost() <= MAX_TOTAL_PENDING_BYTES);
                stopped.extend(d.issues.into_iter().map(|(_, issue)| (d.stream, issue)));
            }
        }
        // Every stream past the budget stopped at its hole (and released what it held)...
        let expected: Vec<_> = (fitting..streams)
            .map(|s| (s, StreamIssue::SharedBufferLimit { offset: 0 }))
            .collect();
        assert_eq!(stopped, expected);
        // ...the others kept theirs and report their gap at the end.
        let gaps = t.finish();
        assert_eq!(gaps.len(), fitting);
        assert!(gaps.iter().all(|(s, _, issue)| *s < fitting
            && matches!(
                issue,
                StreamIssue::Gap {
                    offset: 0,
                    missing: 10,
                    ..
                }
            )));
        assert_eq!(t.pending_cost(), 0);
        assert!(stopped[0].1.to_string().contains("across all streams"));
    }

    #[test]
    fn streams_beyond_the_cap_are_counted_not_tracked() {
        use std::net::{IpAddr, Ipv4Addr};
        let server: SocketAddr = "10.0.0.2:7789".parse().expect("addr");
        let client = |i: usize| {
            let ip = 0x0a01_0000 + u32::try_from(i).expect("small");
            SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), 40_000)
        };
        let syn = |src: SocketAddr, payload: &'static [u8]| TcpSegment {
            src,
            dst: server,
            seq: u32::from(!payload.is_empty()),
            ack: 0,
            flags: if payload.is_empty() {
                flags::SYN
            } else {
                flags::ACK
            },
            payload,
        };
        let mut t = TcpReassembler::new();
        for i in 0..MAX_STREAMS {
            assert!(t.push(&syn(client(i), b""), 1).is_some());
        }
        assert!(t.push(&syn(client(MAX_STREAMS), b""), 2).is_none());
        assert!(t.push(&syn(client(MAX_STREAMS), b"data"), 3).is_none());
        assert_eq!(t.untracked_segments(), 2);
        assert_eq!(t.streams().len(), MAX_STREAMS);
        // Tracked connections go on as before.
        let d = t.push(&syn(client(7), b"data"), 4).expect("tracked");
        assert_eq!((d.stream, d.data.as_slice()), (7, &b"data"[..]));
    }
}
