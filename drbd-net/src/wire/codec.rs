//! Encoding frames and the incremental decoder.

use bytes::{BufMut, Bytes, BytesMut};

use super::command::Command;
use super::error::WireError;
use super::header::Header;
use super::limits::{
    payload_rule, MAX_BIO_SIZE, P_BLOCK_REQ_SIZE, P_DATA_SIZE, P_RS_PARAM_89_SIZE,
    P_RS_PARAM_95_SIZE, P_RS_PARAM_SIZE, P_SIZES_SIZE, SHARED_SECRET_MAX,
};
use super::packet::{
    Barrier, BarrierAck, Bitmap, BlockAck, BlockDesc, BlockId, BlockRequest, CompressedBitmap,
    ConnectionFeatures, DataPacket, DelayProbe, DigestRequest, Frame, Packet, Protocol,
    QueueLimits, ReqState, Sizes, StateReply, SyncParam, SyncUuid, Trim, Uuids, Wsame,
};
use super::state::State;
use super::{WireContext, FF_WSAME};

/// Data blocks are whole sectors.
const SECTOR_SIZE: usize = 512;

/// Longest algorithm name: the 64-byte fields hold the name and at least one NUL.
const MAX_ALG_NAME: usize = SHARED_SECRET_MAX - 1;

/// Writes `frame` (header and payload, the length computed) to the end of `out`.
///
/// The packet is checked against the same rules the decoder applies, so whatever encodes
/// also decodes (under the same context) to an equal frame. On error nothing is written.
pub fn encode(frame: &Frame, ctx: &WireContext, out: &mut BytesMut) -> Result<(), WireError> {
    let tail = encode_head(frame, ctx, out)?;
    out.extend_from_slice(&tail);
    Ok(())
}

/// Like [`encode`], but leaves the bulk data of data packets out of `out` and returns it, so
/// a transport can send it from the caller's buffer without copying (vectored write of
/// `out` then the returned bytes). For other packets the returned `Bytes` is empty.
pub fn encode_head(
    frame: &Frame,
    ctx: &WireContext,
    out: &mut BytesMut,
) -> Result<Bytes, WireError> {
    let packet = &frame.packet;
    let command = packet.command();
    let rule = payload_rule(command, ctx, frame.kind)?;
    let length = packet.payload_len(ctx);
    rule.check(command, length)?;
    check_packet(packet, ctx)?;
    let header = Header {
        kind: frame.kind,
        command: command.code(),
        volume: frame.volume,
        length: u32::try_from(length).map_err(|_| WireError::TooLong {
            command,
            length,
            max: frame.kind.max_length(),
        })?,
    };
    header.check()?;
    out.reserve(frame.kind.size() + length);
    header.write(out)?;
    Ok(write_payload(packet, ctx, out))
}

/// Checks what the length rule does not: content constraints the decoder enforces.
fn check_packet(packet: &Packet, ctx: &WireContext) -> Result<(), WireError> {
    let command = packet.command();
    let digest_len = |len: usize| {
        if len == ctx.integrity_digest_len {
            Ok(())
        } else {
            Err(WireError::bad(
                command,
                format!(
                    "integrity digest of {len} bytes, but the context says {}",
                    ctx.integrity_digest_len
                ),
            ))
        }
    };
    match packet {
        Packet::Data(d) | Packet::DataReply(d) | Packet::RsDataReply(d) => {
            digest_len(d.digest.len())?;
            check_data(command, d.data.len(), false)
        }
        Packet::Wsame(w) => {
            digest_len(w.digest.len())?;
            check_data(command, w.data.len(), true)
        }
        Packet::Bitmap(b) => check_bitmap_words(command, b.words.len()),
        Packet::CompressedBitmap(c) => check_bitmap_code(command, c.encoding),
        Packet::Protocol(p) | Packet::ProtocolUpdate(p) => {
            if (1..87).contains(&ctx.protocol_version) {
                if p.integrity_alg.is_empty() {
                    Ok(())
                } else {
                    Err(WireError::bad(
                        command,
                        "protocol versions below 87 have no integrity algorithm field",
                    ))
                }
            } else {
                check_name(command, "integrity_alg", &p.integrity_alg)
            }
        }
        Packet::SyncParam(s) | Packet::SyncParam89(s) => match s {
            SyncParam::Rate { .. } => Ok(()),
            SyncParam::Verify { verify_alg, .. } => check_name(command, "verify_alg", verify_alg),
            SyncParam::Algs {
                verify_alg,
                csums_alg,
                ..
            }
            | SyncParam::Controller {
                verify_alg,
                csums_alg,
                ..
            } => {
                check_name(command, "verify_alg", verify_alg)?;
                check_name(command, "csums_alg", csums_alg)
            }
        },
        Packet::Sizes(s) => {
            let agreed = ctx.features & FF_WSAME != 0;
            match (s.queue_limits.is_some(), agreed) {
                (true, false) => Err(WireError::bad(
                    command,
                    "queue limits given but FF_WSAME is not agreed",
                )),
                (false, true) => Err(WireError::bad(
                    command,
                    "FF_WSAME is agreed but the queue limits are missing",
                )),
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

fn check_data(command: Command, len: usize, nonempty: bool) -> Result<(), WireError> {
    // SECTOR_SIZE is a power of two.
    if len & (SECTOR_SIZE - 1) != 0 {
        return Err(WireError::bad(
            command,
            format!("data length {len} is not a multiple of 512"),
        ));
    }
    if nonempty && len == 0 {
        return Err(WireError::bad(command, "the write-same block is empty"));
    }
    if len > MAX_BIO_SIZE {
        return Err(WireError::bad(
            command,
            format!("data length {len} is above 1 MiB"),
        ));
    }
    Ok(())
}

fn check_bitmap_words(command: Command, len: usize) -> Result<(), WireError> {
    if len & 7 == 0 {
        Ok(())
    } else {
        Err(WireError::bad(
            command,
            format!("{len} bytes is not a whole number of 64-bit words"),
        ))
    }
}

fn check_bitmap_code(command: Command, encoding: u8) -> Result<(), WireError> {
    if encoding & 0x0f == CompressedBitmap::RLE_VLI_BITS {
        Ok(())
    } else {
        Err(WireError::bad(
            command,
            format!(
                "encoding byte {encoding:#04x}: code {} is not RLE_VLI_Bits (2)",
                encoding & 0x0f
            ),
        ))
    }
}

fn check_name(command: Command, field: &str, name: &str) -> Result<(), WireError> {
    if name.len() > MAX_ALG_NAME {
        return Err(WireError::bad(
            command,
            format!(
                "{field} is {} bytes long, at most {MAX_ALG_NAME} fit",
                name.len()
            ),
        ));
    }
    if name.as_bytes().contains(&0) {
        return Err(WireError::bad(
            command,
            format!("{field} contains a NUL byte"),
        ));
    }
    Ok(())
}

/// Writes the payload of an already checked packet; returns the bulk tail not written.
fn write_payload(packet: &Packet, ctx: &WireContext, out: &mut BytesMut) -> Bytes {
    match packet {
        Packet::Data(d) | Packet::DataReply(d) | Packet::RsDataReply(d) => {
            out.put_u64(d.sector);
            out.put_slice(&d.block_id.0);
            out.put_u32(d.seq_num);
            out.put_u32(d.dp_flags);
            out.put_slice(&d.digest);
            return d.data.clone();
        }
        Packet::Wsame(w) => {
            out.put_u64(w.sector);
            out.put_slice(&w.block_id.0);
            out.put_u32(w.seq_num);
            out.put_u32(w.dp_flags);
            out.put_u32(w.size);
            out.put_slice(&w.digest);
            return w.data.clone();
        }
        Packet::Trim(t) | Packet::Zeroes(t) => {
            out.put_u64(t.sector);
            out.put_slice(&t.block_id.0);
            out.put_u32(t.seq_num);
            out.put_u32(t.dp_flags);
            out.put_u32(t.size);
        }
        Packet::Barrier(b) => {
            out.put_slice(&b.barrier);
            out.put_u32(b.pad);
        }
        Packet::BarrierAck(b) => {
            out.put_slice(&b.barrier);
            out.put_u32(b.set_size);
        }
        Packet::Bitmap(b) => out.put_slice(&b.words),
        Packet::CompressedBitmap(c) => {
            out.put_u8(c.encoding);
            out.put_slice(&c.code);
        }
        Packet::BecomeSyncTarget
        | Packet::BecomeSyncSource
        | Packet::UnplugRemote
        | Packet::Ping
        | Packet::PingAck
        | Packet::InitialMeta
        | Packet::InitialData => {}
        Packet::DataRequest(r)
        | Packet::RsDataRequest(r)
        | Packet::OvRequest(r)
        | Packet::RsThinReq(r) => write_block_req(r, out),
        Packet::OvReply(d) | Packet::CsumRsRequest(d) => {
            write_block_req(&d.request, out);
            out.put_slice(&d.digest);
        }
        Packet::SyncParam(s) | Packet::SyncParam89(s) => write_sync_param(s, out),
        Packet::Protocol(p) | Packet::ProtocolUpdate(p) => {
            for v in [
                p.protocol,
                p.after_sb_0p,
                p.after_sb_1p,
                p.after_sb_2p,
                p.conn_flags,
            ] {
                out.put_u32(v);
            }
            out.put_u32(p.two_primaries);
            if !(1..87).contains(&ctx.protocol_version) {
                out.put_slice(p.integrity_alg.as_bytes());
                out.put_u8(0);
            }
        }
        Packet::Uuids(u) => {
            for v in [
                u.current,
                u.bitmap,
                u.history[0],
                u.history[1],
                u.dirty_bits,
                u.flags,
            ] {
                out.put_u64(v);
            }
        }
        Packet::Sizes(s) => {
            out.put_u64(s.d_size);
            out.put_u64(s.u_size);
            out.put_u64(s.c_size);
            out.put_u32(s.max_bio_size);
            out.put_u16(s.queue_order_type);
            out.put_u16(s.dds_flags);
            if let Some(q) = &s.queue_limits {
                out.put_u32(q.physical_block_size);
                out.put_u32(q.logical_block_size);
                out.put_u32(q.alignment_offset);
                out.put_u32(q.io_min);
                out.put_u32(q.io_opt);
                out.put_u8(q.discard_enabled);
                out.put_u8(q.discard_zeroes_data);
                out.put_u8(q.write_same_capable);
                out.put_u8(q.pad);
            }
        }
        Packet::State(s) => out.put_u32(s.raw),
        Packet::StateChgReq(r) | Packet::ConnStChgReq(r) => {
            out.put_u32(r.mask.raw);
            out.put_u32(r.val.raw);
        }
        Packet::StateChgReply(r) | Packet::ConnStChgReply(r) => out.put_i32(r.retcode),
        Packet::SyncUuid(u) => out.put_u64(u.uuid),
        Packet::AuthChallenge(b) | Packet::AuthResponse(b) => out.put_slice(b),
        Packet::RecvAck(a)
        | Packet::WriteAck(a)
        | Packet::RsWriteAck(a)
        | Packet::Superseded(a)
        | Packet::NegAck(a)
        | Packet::NegDReply(a)
        | Packet::NegRsDReply(a)
        | Packet::OvResult(a)
        | Packet::RsIsInSync(a)
        | Packet::RsCancel(a)
        | Packet::RetryWrite(a) => {
            out.put_u64(a.sector);
            out.put_slice(&a.block_id.0);
            out.put_u32(a.blksize);
            out.put_u32(a.seq_num);
        }
        Packet::DelayProbe(p) => {
            out.put_u32(p.seq_num);
            out.put_u32(p.offset);
        }
        Packet::OutOfSync(d) | Packet::RsDeallocated(d) => {
            out.put_u64(d.sector);
            out.put_u32(d.blksize);
            out.put_u32(d.pad);
        }
        Packet::ConnectionFeatures(f) => {
            out.put_u32(f.protocol_min);
            out.put_u32(f.feature_flags);
            out.put_u32(f.protocol_max);
            out.put_slice(&f.reserved);
        }
    }
    Bytes::new()
}

fn write_block_req(r: &BlockRequest, out: &mut BytesMut) {
    out.put_u64(r.sector);
    out.put_slice(&r.block_id.0);
    out.put_u32(r.blksize);
    out.put_u32(r.pad);
}

/// A name in a NUL-padded fixed-size field (checked: shorter than the field).
fn put_padded(out: &mut BytesMut, name: &str) {
    out.put_slice(name.as_bytes());
    out.put_bytes(0, SHARED_SECRET_MAX - name.len());
}

fn write_sync_param(s: &SyncParam, out: &mut BytesMut) {
    out.put_u32(s.resync_rate());
    match s {
        SyncParam::Rate { .. } => {}
        SyncParam::Verify { verify_alg, .. } => {
            out.put_slice(verify_alg.as_bytes());
            out.put_u8(0);
        }
        SyncParam::Algs {
            verify_alg,
            csums_alg,
            ..
        } => {
            put_padded(out, verify_alg);
            put_padded(out, csums_alg);
        }
        SyncParam::Controller {
            verify_alg,
            csums_alg,
            c_plan_ahead,
            c_delay_target,
            c_fill_target,
            c_max_rate,
            ..
        } => {
            put_padded(out, verify_alg);
            put_padded(out, csums_alg);
            for v in [*c_plan_ahead, *c_delay_target, *c_fill_target, *c_max_rate] {
                out.put_u32(v);
            }
        }
    }
}

/// An incremental frame decoder for one socket.
///
/// It keeps no bytes of its own: [`Decoder::decode`] looks at the caller's receive buffer
/// and, once a whole frame is there, splits it off. Payload byte fields of the returned
/// packet share the buffer's memory.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    ctx: WireContext,
    consumed: u64,
}

impl Decoder {
    /// A decoder using `ctx`.
    pub fn new(ctx: WireContext) -> Self {
        Decoder { ctx, consumed: 0 }
    }

    /// Replaces the context (the handshake calls this as it learns the agreed values); it
    /// applies from the next frame on.
    pub fn set_context(&mut self, ctx: WireContext) {
        self.ctx = ctx;
    }

    /// The context in use.
    pub fn context(&self) -> WireContext {
        self.ctx
    }

    /// Bytes of the stream consumed so far: the stream offset of the next frame's header
    /// (useful to say where an error was).
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Takes one whole frame off the front of `buf` if complete; `Ok(None)` = need more
    /// bytes.
    ///
    /// The header is checked as soon as it is complete (magic, h100 pad, known command, the
    /// command's length limits), before any payload is waited for. While the payload is
    /// incomplete, `buf` may be grown to hold exactly the rest of this frame (never more
    /// than the validated length).
    ///
    /// On an error in the header nothing is consumed; on an error in the payload the frame's
    /// bytes have been taken off `buf`. Either way the stream cannot be resynchronised.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        Ok(self.decode_with_raw(buf)?.map(|(frame, _)| frame))
    }

    /// As [`Decoder::decode`], and also returns the frame's bytes as received (header and
    /// payload). They are the very memory the frame's payload fields are sliced from, not a
    /// copy: for callers that keep both, such as the capture analysis.
    pub fn decode_with_raw(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<(Frame, Bytes)>, WireError> {
        let Some(header) = Header::parse(buf)? else {
            return Ok(None);
        };
        let command =
            Command::from_code(header.command).ok_or(WireError::UnknownCommand(header.command))?;
        let length = usize::try_from(header.length).unwrap_or(usize::MAX);
        payload_rule(command, &self.ctx, header.kind)?.check(command, length)?;
        let total = header.kind.size() + length;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let raw = buf.split_to(total).freeze();
        self.consumed += total as u64;
        let payload = raw.slice(header.kind.size()..);
        let packet = parse_payload(command, payload, &self.ctx)?;
        let frame = Frame {
            kind: header.kind,
            volume: header.volume,
            packet,
        };
        Ok(Some((frame, raw)))
    }
}

/// A cursor over one payload; every read is bounds-checked.
struct Reader {
    command: Command,
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes, WireError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                WireError::bad(
                    self.command,
                    format!(
                        "payload of {} bytes ends inside a field at byte {}",
                        self.buf.len(),
                        self.pos
                    ),
                )
            })?;
        let b = self.buf.slice(self.pos..end);
        self.pos = end;
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let b = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&b);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn i32(&mut self) -> Result<i32, WireError> {
        Ok(i32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn block_id(&mut self) -> Result<BlockId, WireError> {
        Ok(BlockId(self.array()?))
    }
    fn state(&mut self) -> Result<State, WireError> {
        Ok(State::from_raw(self.u32()?))
    }

    fn rest(&mut self) -> Bytes {
        let b = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        b
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// A NUL-terminated name filling the rest of the payload.
    fn nul_terminated(&mut self, field: &str) -> Result<String, WireError> {
        let start = self.pos;
        let bytes = self.rest();
        let Some((&0, name)) = bytes.split_last() else {
            return Err(WireError::bad(
                self.command,
                format!(
                    "{field} (payload bytes {start}..{}) is not NUL-terminated",
                    self.buf.len()
                ),
            ));
        };
        self.name(field, start, name)
    }

    /// A name in a NUL-padded 64-byte field.
    fn padded(&mut self, field: &str) -> Result<String, WireError> {
        let start = self.pos;
        let bytes = self.take(SHARED_SECRET_MAX)?;
        let Some(nul) = bytes.iter().position(|&b| b == 0) else {
            return Err(WireError::bad(
                self.command,
                format!(
                    "{field} (payload bytes {start}..{}) has no NUL",
                    start + SHARED_SECRET_MAX
                ),
            ));
        };
        if let Some(junk) = bytes[nul..].iter().position(|&b| b != 0) {
            return Err(WireError::bad(
                self.command,
                format!(
                    "{field} has nonzero padding at payload byte {}",
                    start + nul + junk
                ),
            ));
        }
        self.name(field, start, &bytes[..nul])
    }

    fn name(&self, field: &str, start: usize, name: &[u8]) -> Result<String, WireError> {
        if let Some(i) = name.iter().position(|&b| b == 0) {
            return Err(WireError::bad(
                self.command,
                format!(
                    "{field} has a NUL inside the name at payload byte {}",
                    start + i
                ),
            ));
        }
        String::from_utf8(name.to_vec()).map_err(|e| {
            WireError::bad(
                self.command,
                format!(
                    "{field} is not UTF-8 (payload byte {})",
                    start + e.utf8_error().valid_up_to()
                ),
            )
        })
    }

    fn finish<T>(self, value: T) -> Result<T, WireError> {
        if self.pos == self.buf.len() {
            Ok(value)
        } else {
            Err(WireError::bad(
                self.command,
                format!(
                    "{} unexpected bytes at payload byte {}",
                    self.buf.len() - self.pos,
                    self.pos
                ),
            ))
        }
    }
}

/// Parses a payload whose length already passed the command's length rule.
fn parse_payload(command: Command, payload: Bytes, ctx: &WireContext) -> Result<Packet, WireError> {
    use Command as C;
    let mut r = Reader {
        command,
        buf: payload,
        pos: 0,
    };
    let packet = match command {
        C::Data => Packet::Data(data_packet(&mut r, ctx)?),
        C::DataReply => Packet::DataReply(data_packet(&mut r, ctx)?),
        C::RsDataReply => Packet::RsDataReply(data_packet(&mut r, ctx)?),
        C::Wsame => {
            let (sector, block_id, seq_num, dp_flags) =
                (r.u64()?, r.block_id()?, r.u32()?, r.u32()?);
            let size = r.u32()?;
            let digest = r.take(ctx.integrity_digest_len)?;
            let data = r.rest();
            check_data(command, data.len(), true)?;
            Packet::Wsame(Wsame {
                sector,
                block_id,
                seq_num,
                dp_flags,
                size,
                digest,
                data,
            })
        }
        C::Trim | C::Zeroes => {
            let t = Trim {
                sector: r.u64()?,
                block_id: r.block_id()?,
                seq_num: r.u32()?,
                dp_flags: r.u32()?,
                size: r.u32()?,
            };
            if command == C::Trim {
                Packet::Trim(t)
            } else {
                Packet::Zeroes(t)
            }
        }
        C::Barrier => Packet::Barrier(Barrier {
            barrier: r.array()?,
            pad: r.u32()?,
        }),
        C::BarrierAck => Packet::BarrierAck(BarrierAck {
            barrier: r.array()?,
            set_size: r.u32()?,
        }),
        C::Bitmap => {
            check_bitmap_words(command, r.remaining())?;
            Packet::Bitmap(Bitmap { words: r.rest() })
        }
        C::CompressedBitmap => {
            let encoding = r.u8()?;
            check_bitmap_code(command, encoding)?;
            Packet::CompressedBitmap(CompressedBitmap {
                encoding,
                code: r.rest(),
            })
        }
        C::BecomeSyncTarget => Packet::BecomeSyncTarget,
        C::BecomeSyncSource => Packet::BecomeSyncSource,
        C::UnplugRemote => Packet::UnplugRemote,
        C::Ping => Packet::Ping,
        C::PingAck => Packet::PingAck,
        C::InitialMeta => Packet::InitialMeta,
        C::InitialData => Packet::InitialData,
        C::DataRequest => Packet::DataRequest(block_req(&mut r)?),
        C::RsDataRequest => Packet::RsDataRequest(block_req(&mut r)?),
        C::OvRequest => Packet::OvRequest(block_req(&mut r)?),
        C::RsThinReq => Packet::RsThinReq(block_req(&mut r)?),
        C::OvReply | C::CsumRsRequest => {
            let d = DigestRequest {
                request: block_req(&mut r)?,
                digest: r.rest(),
            };
            if command == C::OvReply {
                Packet::OvReply(d)
            } else {
                Packet::CsumRsRequest(d)
            }
        }
        C::SyncParam => Packet::SyncParam(sync_param(&mut r)?),
        C::SyncParam89 => Packet::SyncParam89(sync_param(&mut r)?),
        C::Protocol | C::ProtocolUpdate => {
            let mut p = Protocol {
                protocol: r.u32()?,
                after_sb_0p: r.u32()?,
                after_sb_1p: r.u32()?,
                after_sb_2p: r.u32()?,
                conn_flags: r.u32()?,
                two_primaries: r.u32()?,
                integrity_alg: String::new(),
            };
            if !(1..87).contains(&ctx.protocol_version) {
                p.integrity_alg = r.nul_terminated("integrity_alg")?;
            }
            if command == C::Protocol {
                Packet::Protocol(p)
            } else {
                Packet::ProtocolUpdate(p)
            }
        }
        C::Uuids => Packet::Uuids(Uuids {
            current: r.u64()?,
            bitmap: r.u64()?,
            history: [r.u64()?, r.u64()?],
            dirty_bits: r.u64()?,
            flags: r.u64()?,
        }),
        C::Sizes => {
            let mut s = Sizes {
                d_size: r.u64()?,
                u_size: r.u64()?,
                c_size: r.u64()?,
                max_bio_size: r.u32()?,
                queue_order_type: r.u16()?,
                dds_flags: r.u16()?,
                queue_limits: None,
            };
            if r.buf.len() > P_SIZES_SIZE {
                s.queue_limits = Some(QueueLimits {
                    physical_block_size: r.u32()?,
                    logical_block_size: r.u32()?,
                    alignment_offset: r.u32()?,
                    io_min: r.u32()?,
                    io_opt: r.u32()?,
                    discard_enabled: r.u8()?,
                    discard_zeroes_data: r.u8()?,
                    write_same_capable: r.u8()?,
                    pad: r.u8()?,
                });
            }
            Packet::Sizes(s)
        }
        C::State => Packet::State(r.state()?),
        C::StateChgReq => Packet::StateChgReq(ReqState {
            mask: r.state()?,
            val: r.state()?,
        }),
        C::ConnStChgReq => Packet::ConnStChgReq(ReqState {
            mask: r.state()?,
            val: r.state()?,
        }),
        C::StateChgReply => Packet::StateChgReply(StateReply { retcode: r.i32()? }),
        C::ConnStChgReply => Packet::ConnStChgReply(StateReply { retcode: r.i32()? }),
        C::SyncUuid => Packet::SyncUuid(SyncUuid { uuid: r.u64()? }),
        C::AuthChallenge => Packet::AuthChallenge(r.rest()),
        C::AuthResponse => Packet::AuthResponse(r.rest()),
        C::RecvAck => Packet::RecvAck(block_ack(&mut r)?),
        C::WriteAck => Packet::WriteAck(block_ack(&mut r)?),
        C::RsWriteAck => Packet::RsWriteAck(block_ack(&mut r)?),
        C::Superseded => Packet::Superseded(block_ack(&mut r)?),
        C::NegAck => Packet::NegAck(block_ack(&mut r)?),
        C::NegDReply => Packet::NegDReply(block_ack(&mut r)?),
        C::NegRsDReply => Packet::NegRsDReply(block_ack(&mut r)?),
        C::OvResult => Packet::OvResult(block_ack(&mut r)?),
        C::RsIsInSync => Packet::RsIsInSync(block_ack(&mut r)?),
        C::RsCancel => Packet::RsCancel(block_ack(&mut r)?),
        C::RetryWrite => Packet::RetryWrite(block_ack(&mut r)?),
        C::DelayProbe => Packet::DelayProbe(DelayProbe {
            seq_num: r.u32()?,
            offset: r.u32()?,
        }),
        C::OutOfSync => Packet::OutOfSync(block_desc(&mut r)?),
        C::RsDeallocated => Packet::RsDeallocated(block_desc(&mut r)?),
        C::ConnectionFeatures => Packet::ConnectionFeatures(ConnectionFeatures {
            protocol_min: r.u32()?,
            feature_flags: r.u32()?,
            protocol_max: r.u32()?,
            reserved: r.array()?,
        }),
    };
    r.finish(packet)
}

fn data_packet(r: &mut Reader, ctx: &WireContext) -> Result<DataPacket, WireError> {
    let (sector, block_id, seq_num, dp_flags) = (r.u64()?, r.block_id()?, r.u32()?, r.u32()?);
    debug_assert_eq!(r.pos, P_DATA_SIZE);
    let digest = r.take(ctx.integrity_digest_len)?;
    let data = r.rest();
    check_data(r.command, data.len(), false)?;
    Ok(DataPacket {
        sector,
        block_id,
        seq_num,
        dp_flags,
        digest,
        data,
    })
}

fn block_req(r: &mut Reader) -> Result<BlockRequest, WireError> {
    let b = BlockRequest {
        sector: r.u64()?,
        block_id: r.block_id()?,
        blksize: r.u32()?,
        pad: r.u32()?,
    };
    debug_assert_eq!(r.pos, P_BLOCK_REQ_SIZE);
    Ok(b)
}

fn block_ack(r: &mut Reader) -> Result<BlockAck, WireError> {
    Ok(BlockAck {
        sector: r.u64()?,
        block_id: r.block_id()?,
        blksize: r.u32()?,
        seq_num: r.u32()?,
    })
}

fn block_desc(r: &mut Reader) -> Result<BlockDesc, WireError> {
    Ok(BlockDesc {
        sector: r.u64()?,
        blksize: r.u32()?,
        pad: r.u32()?,
    })
}

fn sync_param(r: &mut Reader) -> Result<SyncParam, WireError> {
    let len = r.buf.len();
    let resync_rate = r.u32()?;
    Ok(match len {
        P_RS_PARAM_SIZE => SyncParam::Rate { resync_rate },
        P_RS_PARAM_89_SIZE => SyncParam::Algs {
            resync_rate,
            verify_alg: r.padded("verify_alg")?,
            csums_alg: r.padded("csums_alg")?,
        },
        P_RS_PARAM_95_SIZE => SyncParam::Controller {
            resync_rate,
            verify_alg: r.padded("verify_alg")?,
            csums_alg: r.padded("csums_alg")?,
            c_plan_ahead: r.u32()?,
            c_delay_target: r.u32()?,
            c_fill_target: r.u32()?,
            c_max_rate: r.u32()?,
        },
        // The length rule admits only 5..=68 besides the fixed layouts.
        _ => SyncParam::Verify {
            resync_rate,
            verify_alg: r.nul_terminated("verify_alg")?,
        },
    })
}
