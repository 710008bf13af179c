//! The mapping between the replication core's messages ([`PeerMsg`]) and wire packets, in
//! both directions, as pure functions and a small decoder state machine.
//!
//! * [`encode_msg`] turns one message into the frames that carry it: exactly one for every
//!   variant except [`PeerMsg::Bitmap`], which becomes the whole `P_BITMAP` /
//!   `P_COMPRESSED_BITMAP` sequence of one bitmap transfer.
//! * [`MsgDecoder`] turns received frames back into messages, assembling a bitmap transfer
//!   into one [`PeerMsg::Bitmap`], and rejects every packet the core does not handle after
//!   the handshake (a few harmless ones are ignored).
//! * [`peer_hello`] converts what the handshake learnt about a volume into the core's
//!   [`CorePeerHello`]; [`agreed_sectors`] and [`bitmap_bits`] give the bitmap size both
//!   nodes use for the exchange.
//!
//! Conventions: `block_id` is an opaque 8-byte handle on the wire; the core's `u64` is
//! written and read big-endian, so both sides of this mapping agree and the bytes echoed by
//! the peer give back the same number. Barrier numbers are handled the same way (4 bytes,
//! big-endian).

use std::borrow::Cow;

use drbd_core::replication::digest::DigestAlg;
use drbd_core::replication::msg::{
    dp, Ack, BlockReq, PeerHello as CorePeerHello, PeerMsg, PeerState, ProtocolSettings, Socket,
    SyncSettings,
};
use drbd_core::uuid::UuidInfo;

use crate::handshake;
use crate::wire::bitmap::{words_for, BitmapError, BitmapReceiver, BitmapSender};
use crate::wire::limits::BITMAP_PACKET_MAX;
use crate::wire::{
    self, Barrier, BarrierAck, BlockAck, BlockDesc, BlockId, BlockRequest, Command, ConnState,
    DataPacket, DigestRequest, DiskState, Frame, HeaderKind, Packet, ReqState, Role, Sizes, State,
    StateReply, SyncUuid, Trim, Uuids, WireContext, WireError, FF_WZEROES,
};

/// Bitmap transfers only use RLE from this protocol version on (`P_COMPRESSED_BITMAP` came
/// with protocol 90).
const MIN_PROTOCOL_RLE: u32 = 90;

/// Why a received packet cannot be turned into a message. Every one of these is a protocol
/// error: the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// A packet the replication core does not handle once the connection is established.
    #[error("unexpected {command} after the handshake")]
    Unexpected {
        /// The command received.
        command: Command,
    },
    /// A packet on the socket it does not belong to (acknowledgements on the data socket,
    /// data on the meta socket).
    #[error("{command} received on the {socket:?} socket")]
    WrongSocket {
        /// The command received.
        command: Command,
        /// The socket it arrived on.
        socket: Socket,
    },
    /// A per-volume packet for a volume this connection does not carry.
    #[error("{command} for volume {volume}, but this connection carries volume {expected}")]
    UnknownVolume {
        /// The command received.
        command: Command,
        /// The volume in its header.
        volume: u16,
        /// The volume the decoder serves.
        expected: u16,
    },
    /// The payload of a data packet does not match its data-integrity digest: it was
    /// damaged on the way.
    #[error("data integrity check failed ({alg}): {command} sector {sector} +{size}")]
    IntegrityCheckFailed {
        command: Command,
        sector: u64,
        size: usize,
        alg: &'static str,
    },
    /// The packet decoded, but its content is not a valid message.
    #[error("malformed {command}: {reason}")]
    Malformed {
        /// The command received.
        command: Command,
        /// What is wrong with it.
        reason: String,
    },
    /// A data-socket packet arrived between the packets of one bitmap transfer (the sender
    /// sends a bitmap as one uninterrupted sequence).
    #[error("{command} in the middle of a bitmap transfer")]
    BitmapInterrupted {
        /// The command received.
        command: Command,
    },
    /// A bitmap packet does not fit the transfer.
    #[error("bitmap transfer: {0}")]
    Bitmap(#[from] BitmapError),
}

/// The `P_STATE` word for a state as the core describes it.
pub fn wire_state(s: &PeerState) -> State {
    State::new(s.role, s.peer_role, s.conn, s.disk, s.peer_disk).with_user_isp(s.user_isp)
}

/// The core's view of a `P_STATE` word; `None` if a field holds a value 8.4 does not define
/// (role 3, connection state above 23, disk state above 8). The flags other than `user_isp`
/// are not used by the core and are dropped.
pub fn peer_state(s: State) -> Option<PeerState> {
    Some(PeerState {
        role: Role::from_wire(s.role())?,
        peer_role: Role::from_wire(s.peer())?,
        conn: ConnState::from_wire(s.conn())?,
        disk: DiskState::from_wire(s.disk())?,
        peer_disk: DiskState::from_wire(s.pdsk())?,
        user_isp: s.user_isp(),
    })
}

/// The core's `UuidInfo` from `P_UUIDS`.
pub fn uuid_info(u: &Uuids) -> UuidInfo {
    UuidInfo::from_wire([
        u.current,
        u.bitmap,
        u.history[0],
        u.history[1],
        u.dirty_bits,
        u.flags,
    ])
}

/// `P_UUIDS` from the core's `UuidInfo`.
pub fn wire_uuids(u: &UuidInfo) -> Uuids {
    let [current, bitmap, h0, h1, dirty_bits, flags] = u.to_wire();
    Uuids {
        current,
        bitmap,
        history: [h0, h1],
        dirty_bits,
        flags,
    }
}

/// What the handshake learnt about `volume`, as the core needs it. `resolve_conflicts` is
/// this node's role from the socket setup ([`handshake::RoleAction::Ready`]).
///
/// `None` if the peer did not describe `volume`, or its `P_STATE` holds values 8.4 does not
/// define (see [`peer_state`]); a transport treats the latter as a protocol error.
pub fn peer_hello(
    hello: &handshake::PeerHello,
    resolve_conflicts: bool,
    volume: u16,
) -> Option<CorePeerHello> {
    let v = hello.volumes.iter().find(|v| v.volume == volume)?;
    Some(CorePeerHello {
        protocol_version: hello.protocol_version,
        features: hello.features,
        resolve_conflicts,
        uuids: uuid_info(&v.uuids),
        state: peer_state(v.state)?,
        disk_sectors: v.sizes.d_size,
        user_sectors: v.sizes.u_size,
        current_sectors: v.sizes.c_size,
        // The handshake already decoded CF_DISCARD_MY_DATA from the peer's conn_flags.
        discard_my_data: hello.protocol.discard_my_data,
    })
}

/// The device size in sectors both nodes agree on when they first connect, from the two
/// `P_SIZES`: the smaller backing device (a side without one, `d_size` 0, does not count),
/// limited by the smaller configured size (`u_size`, 0 = none) if either side has one. When
/// neither side has a backing device, the smaller nonzero exposed size (`c_size`).
///
/// Symmetric in its arguments, so both nodes compute the same number, which is what the
/// bitmap exchange needs. (DRBD also remembers the last agreed size across connections; the
/// core owns that and may pass it to [`MsgDecoder::set_bitmap_bits`] instead.)
pub fn agreed_sectors(local: &Sizes, peer: &Sizes) -> u64 {
    let min_nonzero = |a: u64, b: u64| match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    };
    let disk = min_nonzero(local.d_size, peer.d_size);
    let size = if disk == 0 {
        min_nonzero(local.c_size, peer.c_size)
    } else {
        disk
    };
    match min_nonzero(local.u_size, peer.u_size) {
        0 => size,
        user => user.min(size),
    }
}

/// Bits of the dirty bitmap of a device of `sectors` 512-byte sectors: one per 4 KiB block
/// (8 sectors), the last one possibly partial.
pub fn bitmap_bits(sectors: u64) -> u64 {
    sectors.div_ceil(8)
}

fn block_id(id: u64) -> BlockId {
    BlockId(id.to_be_bytes())
}

fn block_ack(a: &Ack) -> BlockAck {
    BlockAck {
        sector: a.sector,
        block_id: block_id(a.block_id),
        blksize: a.size,
        seq_num: a.seq,
    }
}

fn ack(a: &BlockAck) -> Ack {
    Ack {
        sector: a.sector,
        block_id: u64::from_be_bytes(a.block_id.0),
        size: a.blksize,
        seq: a.seq_num,
    }
}

fn block_request(r: &BlockReq) -> BlockRequest {
    BlockRequest {
        sector: r.sector,
        block_id: block_id(r.block_id),
        blksize: r.size,
        pad: 0,
    }
}

/// The resync settings as the layout of `protocol_version` carries them.
fn sync_param(p: &SyncSettings, protocol_version: u32) -> wire::SyncParam {
    let resync_rate = p.rate_kib;
    let (verify_alg, csums_alg) = (p.verify_alg.clone(), p.csums_alg.clone());
    match protocol_version {
        v if v >= 95 => {
            let [c_plan_ahead, c_delay_target, c_fill_target, c_max_rate] = p
                .controller
                .or_else(|| wire::SyncParam::default().controller())
                .unwrap_or([20, 10, 100, 102_400]);
            wire::SyncParam::Controller {
                resync_rate,
                verify_alg,
                csums_alg,
                c_plan_ahead,
                c_delay_target,
                c_fill_target,
                c_max_rate,
            }
        }
        89..=94 => wire::SyncParam::Algs {
            resync_rate,
            verify_alg,
            csums_alg,
        },
        88 => wire::SyncParam::Verify {
            resync_rate,
            verify_alg,
        },
        _ => wire::SyncParam::Rate { resync_rate },
    }
}

fn sync_settings(p: &wire::SyncParam) -> SyncSettings {
    SyncSettings {
        rate_kib: p.resync_rate(),
        controller: p.controller(),
        verify_alg: p.verify_alg().to_string(),
        csums_alg: p.csums_alg().to_string(),
    }
}

fn block_req(r: &BlockRequest) -> BlockReq {
    BlockReq {
        sector: r.sector,
        block_id: u64::from_be_bytes(r.block_id.0),
        size: r.blksize,
    }
}

fn data_packet(
    ctx: &WireContext,
    sector: u64,
    id: u64,
    seq: u32,
    flags: u32,
    data: &bytes::Bytes,
) -> DataPacket {
    DataPacket {
        sector,
        block_id: block_id(id),
        seq_num: seq,
        dp_flags: flags,
        // The data-integrity digest of the payload, when an algorithm was agreed.
        digest: ctx.integrity.map_or_else(bytes::Bytes::new, |alg| {
            bytes::Bytes::from(alg.digest(data))
        }),
        data: data.clone(),
    }
}

/// The header kind of bitmap packets under `ctx`: the one [`Frame::for_context`] picks for
/// any payload up to the 4 KiB a bitmap packet may have, which is what both ends of the
/// transfer size the packets by.
fn bitmap_header_kind(ctx: &WireContext) -> HeaderKind {
    wire::header_kind_for(ctx.protocol_version, BITMAP_PACKET_MAX)
}

/// Appends to `out` the frames (for `volume`, headers as the kernel picks them under `ctx`)
/// that carry `msg`.
///
/// * Every variant but [`PeerMsg::Bitmap`] is exactly one packet of the same name.
/// * [`PeerMsg::Trim`]: `P_TRIM` if its flags hold [`dp::DISCARD`]; otherwise a write-zeroes,
///   sent as `P_ZEROES` (flags with [`dp::ZEROES`]) when [`FF_WZEROES`] is agreed, and else
///   as `P_TRIM` with both [`dp::DISCARD`] and [`dp::ZEROES`]: a peer without `P_ZEROES`
///   gets a discard that must leave zeroes. [`MsgDecoder`] maps that packet back to a
///   write-zeroes.
/// * [`PeerMsg::Bitmap`]: the packets of one bitmap transfer of a `bitmap_bits`-bit bitmap
///   (the slice must have at least [`words_for`]`(bitmap_bits)` words; more are ignored, and
///   bits past `bitmap_bits` are not sent). `use_rle` (the `use-rle` option) allows
///   `P_COMPRESSED_BITMAP` packets, from protocol 90 on; where the code does not compress,
///   or without it, packets are plain.
///
/// Every frame is checked against the codec's rules before it is appended, so each one
/// [`wire::encode`]s under `ctx`. On error nothing is appended. Data packets are refused
/// while a data-integrity algorithm is agreed (`ctx.integrity_digest_len` not 0): digests
/// are not computed here.
pub fn encode_msg(
    msg: &PeerMsg,
    ctx: &WireContext,
    volume: u16,
    bitmap_bits: u64,
    use_rle: bool,
    out: &mut Vec<Frame>,
) -> Result<(), WireError> {
    let start = out.len();
    let result = push_frames(msg, ctx, volume, bitmap_bits, use_rle, out)
        .and_then(|()| check_frames(&out[start..], ctx));
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn push_frames(
    msg: &PeerMsg,
    ctx: &WireContext,
    volume: u16,
    bitmap_bits: u64,
    use_rle: bool,
    out: &mut Vec<Frame>,
) -> Result<(), WireError> {
    let packet = match msg {
        PeerMsg::Data {
            sector,
            block_id,
            seq,
            flags,
            data,
        } => Packet::Data(data_packet(ctx, *sector, *block_id, *seq, *flags, data)),
        PeerMsg::Trim {
            sector,
            block_id: id,
            seq,
            flags,
            size,
        } => {
            let mut t = Trim {
                sector: *sector,
                block_id: block_id(*id),
                seq_num: *seq,
                dp_flags: *flags,
                size: *size,
            };
            if flags & dp::DISCARD != 0 {
                Packet::Trim(t)
            } else if ctx.features & FF_WZEROES != 0 {
                t.dp_flags |= dp::ZEROES;
                Packet::Zeroes(t)
            } else {
                t.dp_flags |= dp::DISCARD | dp::ZEROES;
                Packet::Trim(t)
            }
        }
        PeerMsg::Barrier { nr } => Packet::Barrier(Barrier {
            barrier: nr.to_be_bytes(),
            pad: 0,
        }),
        PeerMsg::BarrierAck { nr, set_size } => Packet::BarrierAck(BarrierAck {
            barrier: nr.to_be_bytes(),
            set_size: *set_size,
        }),
        PeerMsg::RecvAck(a) => Packet::RecvAck(block_ack(a)),
        PeerMsg::WriteAck(a) => Packet::WriteAck(block_ack(a)),
        PeerMsg::RsWriteAck(a) => Packet::RsWriteAck(block_ack(a)),
        PeerMsg::NegAck(a) => Packet::NegAck(block_ack(a)),
        PeerMsg::Superseded(a) => Packet::Superseded(block_ack(a)),
        PeerMsg::RetryWrite(a) => Packet::RetryWrite(block_ack(a)),
        PeerMsg::OvRequest(r) => Packet::OvRequest(block_request(r)),
        PeerMsg::OvReply {
            sector,
            block_id,
            size,
            digest,
        } => Packet::OvReply(DigestRequest {
            request: block_request(&BlockReq {
                sector: *sector,
                block_id: *block_id,
                size: *size,
            }),
            digest: digest.clone(),
        }),
        PeerMsg::OvResult(a) => Packet::OvResult(block_ack(a)),
        PeerMsg::CsumRsRequest {
            sector,
            block_id,
            size,
            digest,
        } => Packet::CsumRsRequest(DigestRequest {
            request: block_request(&BlockReq {
                sector: *sector,
                block_id: *block_id,
                size: *size,
            }),
            digest: digest.clone(),
        }),
        PeerMsg::RsIsInSync(a) => Packet::RsIsInSync(block_ack(a)),
        PeerMsg::SyncParam(p) => {
            let sp = sync_param(p, ctx.protocol_version);
            if ctx.protocol_version >= 89 {
                Packet::SyncParam89(sp)
            } else {
                Packet::SyncParam(sp)
            }
        }
        PeerMsg::ProtocolUpdate(p) => Packet::ProtocolUpdate(wire::Protocol {
            protocol: p.wire_protocol,
            // In the receiver's view, as the receiver mirrors them back.
            after_sb_0p: handshake::asb::mirrored(p.after_sb[0]),
            after_sb_1p: handshake::asb::mirrored(p.after_sb[1]),
            after_sb_2p: handshake::asb::mirrored(p.after_sb[2]),
            conn_flags: 0,
            two_primaries: u32::from(p.two_primaries),
            integrity_alg: p.integrity_alg.clone(),
        }),
        PeerMsg::NegDReply(a) => Packet::NegDReply(block_ack(a)),
        PeerMsg::NegRsDReply(a) => Packet::NegRsDReply(block_ack(a)),
        PeerMsg::DataRequest(r) => Packet::DataRequest(block_request(r)),
        PeerMsg::RsDataRequest(r) => Packet::RsDataRequest(block_request(r)),
        // DRBD leaves seq_num and dp_flags of replies at 0: the receiver does not use them.
        PeerMsg::DataReply {
            sector,
            block_id,
            data,
        } => Packet::DataReply(data_packet(ctx, *sector, *block_id, 0, 0, data)),
        PeerMsg::RsDataReply {
            sector,
            block_id,
            data,
        } => Packet::RsDataReply(data_packet(ctx, *sector, *block_id, 0, 0, data)),
        PeerMsg::OutOfSync { sector, size } => Packet::OutOfSync(BlockDesc {
            sector: *sector,
            blksize: *size,
            pad: 0,
        }),
        PeerMsg::Uuids(u) => Packet::Uuids(wire_uuids(u)),
        PeerMsg::SyncUuid(uuid) => Packet::SyncUuid(SyncUuid { uuid: *uuid }),
        PeerMsg::Ping => Packet::Ping,
        PeerMsg::PingAck => Packet::PingAck,
        PeerMsg::StateChgReq {
            mask,
            val,
            connection,
        } => {
            let r = ReqState {
                mask: State::from_raw(*mask),
                val: State::from_raw(*val),
            };
            if *connection {
                Packet::ConnStChgReq(r)
            } else {
                Packet::StateChgReq(r)
            }
        }
        PeerMsg::StateChgReply {
            retcode,
            connection,
        } => {
            let r = StateReply { retcode: *retcode };
            if *connection {
                Packet::ConnStChgReply(r)
            } else {
                Packet::StateChgReply(r)
            }
        }
        PeerMsg::State(s) => Packet::State(wire_state(s)),
        PeerMsg::Bitmap(words) => {
            return push_bitmap(words, ctx, volume, bitmap_bits, use_rle, out)
        }
    };
    out.push(Frame::for_context(ctx, volume, packet));
    Ok(())
}

fn push_bitmap(
    words: &[u64],
    ctx: &WireContext,
    volume: u16,
    bits: u64,
    use_rle: bool,
    out: &mut Vec<Frame>,
) -> Result<(), WireError> {
    let needed = words_for(bits);
    let Some(words) = words.get(..needed) else {
        return Err(WireError::bad(
            Command::Bitmap,
            format!(
                "a bitmap of {bits} bits needs {needed} words, the message has {}",
                words.len()
            ),
        ));
    };
    // Plain packets carry whole words: bits past the end are cleared first (on a copy, only
    // when there are any), so that both encodings send the same bitmap.
    let words: Cow<[u64]> = match (words.last(), bits % 64) {
        (Some(&last), tail) if tail != 0 && last >> tail != 0 => {
            let mut copy = words.to_vec();
            if let Some(w) = copy.last_mut() {
                *w &= (1u64 << tail) - 1;
            }
            Cow::Owned(copy)
        }
        _ => Cow::Borrowed(words),
    };
    let kind = bitmap_header_kind(ctx);
    let mut sender = BitmapSender::new(bits, use_rle && ctx.protocol_version >= MIN_PROTOCOL_RLE);
    while let Some(packet) = sender
        .next_packet(&words, kind)
        .map_err(|e| WireError::bad(Command::Bitmap, e.to_string()))?
    {
        out.push(Frame {
            kind,
            volume,
            packet,
        });
    }
    Ok(())
}

/// The encoder's checks, without keeping the bytes: data payloads are not copied
/// ([`wire::encode_head`] leaves them out), so this costs a few dozen bytes per frame.
fn check_frames(frames: &[Frame], ctx: &WireContext) -> Result<(), WireError> {
    let mut scratch = bytes::BytesMut::new();
    for f in frames {
        scratch.clear();
        wire::encode_head(f, ctx, &mut scratch)?;
    }
    Ok(())
}

/// One bitmap transfer being received.
#[derive(Debug)]
struct BitmapInProgress {
    receiver: BitmapReceiver,
    words: Vec<u64>,
    bits: u64,
}

/// Turns received frames into [`PeerMsg`]s.
///
/// One decoder per socket (or one for both, in tests): it holds the state of a bitmap
/// transfer in progress. It never panics on peer input; every packet it cannot map is an
/// error, except a few harmless ones it ignores (returning `Ok(None)`, with a debug log):
///
/// * `P_PING` / `P_PING_ACK`: the transport's keep-alive handles them (the transport should
///   not pass them here; if it does they are ignored on the meta socket).
/// * `P_DELAY_PROBE` (unused by 8.4 receivers) and `P_UNPLUG_REMOTE` (a hint only).
/// * `P_SIZES` after the handshake: the peer announcing a resize. The core does not handle
///   online resizing yet; the agreed size stays what it was at connect time.
#[derive(Debug)]
pub struct MsgDecoder {
    volume: u16,
    socket: Option<Socket>,
    /// The agreed data-integrity algorithm: the digests of data packets are checked.
    integrity: Option<DigestAlg>,
    bitmap_bits: u64,
    bitmap: Option<BitmapInProgress>,
}

impl MsgDecoder {
    /// A decoder for the packets of `volume`, accepting packets of either socket, receiving
    /// bitmaps of `bitmap_bits` bits (see [`bitmap_bits`]).
    pub fn new(volume: u16, bitmap_bits: u64) -> Self {
        MsgDecoder {
            volume,
            socket: None,
            integrity: None,
            bitmap_bits,
            bitmap: None,
        }
    }

    /// The same decoder, accepting only the packets DRBD sends on `socket` (plus
    /// `P_DELAY_PROBE`, which 8.4 accepts on both): a packet on the wrong socket is
    /// [`PeerError::WrongSocket`].
    pub fn for_socket(mut self, socket: Socket) -> Self {
        self.socket = Some(socket);
        self
    }

    /// The same decoder, checking the digests of data packets with `alg` (the agreed
    /// data-integrity-alg): a payload that does not match is
    /// [`PeerError::IntegrityCheckFailed`].
    pub fn with_integrity(mut self, alg: Option<DigestAlg>) -> Self {
        self.integrity = alg;
        self
    }

    /// Sets the size of bitmaps received from now on: the bit count of the agreed device
    /// size, `ceil(sectors / 8)`. A transfer already in progress keeps its size.
    pub fn set_bitmap_bits(&mut self, bits: u64) {
        self.bitmap_bits = bits;
    }

    /// The bitmap size used for the next transfer.
    pub fn bitmap_bits(&self) -> u64 {
        self.bitmap_bits
    }

    /// Whether a bitmap transfer has started and not ended.
    pub fn bitmap_in_progress(&self) -> bool {
        self.bitmap.is_some()
    }

    /// Maps one frame: `Ok(Some(msg))` for a message, `Ok(None)` for an ignored packet or a
    /// bitmap packet that does not end its transfer, an error for anything else.
    pub fn on_frame(&mut self, frame: Frame) -> Result<Option<PeerMsg>, PeerError> {
        let command = frame.packet.command();
        // P_DELAY_PROBE is a data-socket command that 8.4 accepts on both sockets.
        let socket = if command.on_meta_socket() {
            Socket::Meta
        } else {
            Socket::Data
        };
        if let Some(mine) = self.socket {
            if mine != socket && command != Command::DelayProbe {
                return Err(PeerError::WrongSocket {
                    command,
                    socket: mine,
                });
            }
        }
        // The bitmap sender holds the data socket for the whole transfer.
        let is_bitmap = matches!(command, Command::Bitmap | Command::CompressedBitmap);
        if self.bitmap.is_some() && socket == Socket::Data && !is_bitmap {
            return Err(PeerError::BitmapInterrupted { command });
        }
        match &frame.packet {
            Packet::Ping | Packet::PingAck => {
                tracing::debug!(%command, "keep-alive packet passed to the message decoder");
                return Ok(None);
            }
            Packet::DelayProbe(_) | Packet::UnplugRemote => {
                tracing::debug!(%command, "ignored");
                return Ok(None);
            }
            Packet::Sizes(s) => {
                tracing::debug!(
                    %command,
                    d_size = s.d_size,
                    u_size = s.u_size,
                    c_size = s.c_size,
                    "peer announced sizes while connected; online resize is not handled, ignored"
                );
                return Ok(None);
            }
            _ => {}
        }
        if frame.volume != self.volume {
            return Err(PeerError::UnknownVolume {
                command,
                volume: frame.volume,
                expected: self.volume,
            });
        }
        let malformed = |reason: &str| PeerError::Malformed {
            command,
            reason: reason.to_string(),
        };
        let msg = match frame.packet {
            Packet::Data(d) => {
                check_digest(command, &d, self.integrity)?;
                PeerMsg::Data {
                    sector: d.sector,
                    block_id: u64::from_be_bytes(d.block_id.0),
                    seq: d.seq_num,
                    flags: d.dp_flags,
                    data: d.data,
                }
            }
            Packet::DataReply(d) => {
                check_digest(command, &d, self.integrity)?;
                PeerMsg::DataReply {
                    sector: d.sector,
                    block_id: u64::from_be_bytes(d.block_id.0),
                    data: d.data,
                }
            }
            Packet::RsDataReply(d) => {
                check_digest(command, &d, self.integrity)?;
                PeerMsg::RsDataReply {
                    sector: d.sector,
                    block_id: u64::from_be_bytes(d.block_id.0),
                    data: d.data,
                }
            }
            // P_TRIM is a discard, unless it also asks for zeroes (how a write-zeroes goes to
            // a peer without P_ZEROES, see `encode_msg`): zeroing is what both ask for then.
            // P_ZEROES is a write-zeroes; its DISCARD bit ("may unmap") is dropped, as the
            // core tells the two apart by that bit.
            Packet::Trim(t) => {
                let flags = if t.dp_flags & dp::ZEROES != 0 {
                    t.dp_flags & !dp::DISCARD
                } else {
                    t.dp_flags | dp::DISCARD
                };
                trim_msg(&t, flags)
            }
            Packet::Zeroes(t) => trim_msg(&t, (t.dp_flags | dp::ZEROES) & !dp::DISCARD),
            Packet::Barrier(b) => PeerMsg::Barrier {
                nr: u32::from_be_bytes(b.barrier),
            },
            Packet::BarrierAck(b) => PeerMsg::BarrierAck {
                nr: u32::from_be_bytes(b.barrier),
                set_size: b.set_size,
            },
            Packet::RecvAck(a) => PeerMsg::RecvAck(ack(&a)),
            Packet::WriteAck(a) => PeerMsg::WriteAck(ack(&a)),
            Packet::RsWriteAck(a) => PeerMsg::RsWriteAck(ack(&a)),
            Packet::NegAck(a) => PeerMsg::NegAck(ack(&a)),
            Packet::Superseded(a) => PeerMsg::Superseded(ack(&a)),
            Packet::RetryWrite(a) => PeerMsg::RetryWrite(ack(&a)),
            Packet::OvRequest(r) => PeerMsg::OvRequest(block_req(&r)),
            Packet::OvReply(d) => {
                let q = block_req(&d.request);
                PeerMsg::OvReply {
                    sector: q.sector,
                    block_id: q.block_id,
                    size: q.size,
                    digest: d.digest,
                }
            }
            Packet::OvResult(a) => PeerMsg::OvResult(ack(&a)),
            Packet::CsumRsRequest(d) => {
                let q = block_req(&d.request);
                PeerMsg::CsumRsRequest {
                    sector: q.sector,
                    block_id: q.block_id,
                    size: q.size,
                    digest: d.digest,
                }
            }
            Packet::RsIsInSync(a) => PeerMsg::RsIsInSync(ack(&a)),
            Packet::SyncParam(p) | Packet::SyncParam89(p) => PeerMsg::SyncParam(sync_settings(&p)),
            Packet::ProtocolUpdate(p) => PeerMsg::ProtocolUpdate(ProtocolSettings {
                wire_protocol: p.protocol,
                after_sb: [
                    handshake::asb::mirrored(p.after_sb_0p),
                    handshake::asb::mirrored(p.after_sb_1p),
                    handshake::asb::mirrored(p.after_sb_2p),
                ],
                two_primaries: p.two_primaries != 0,
                integrity_alg: p.integrity_alg,
            }),
            Packet::NegDReply(a) => PeerMsg::NegDReply(ack(&a)),
            Packet::NegRsDReply(a) => PeerMsg::NegRsDReply(ack(&a)),
            Packet::DataRequest(r) => PeerMsg::DataRequest(block_req(&r)),
            Packet::RsDataRequest(r) => PeerMsg::RsDataRequest(block_req(&r)),
            Packet::OutOfSync(d) => PeerMsg::OutOfSync {
                sector: d.sector,
                size: d.blksize,
            },
            Packet::Uuids(u) => PeerMsg::Uuids(uuid_info(&u)),
            Packet::SyncUuid(u) => PeerMsg::SyncUuid(u.uuid),
            Packet::StateChgReq(r) | Packet::ConnStChgReq(r) => PeerMsg::StateChgReq {
                mask: r.mask.raw,
                val: r.val.raw,
                connection: command == Command::ConnStChgReq,
            },
            Packet::StateChgReply(r) | Packet::ConnStChgReply(r) => PeerMsg::StateChgReply {
                retcode: r.retcode,
                connection: command == Command::ConnStChgReply,
            },
            Packet::State(s) => PeerMsg::State(peer_state(s).ok_or_else(|| {
                malformed(&format!(
                    "state word {:#010x} holds a role, connection or disk state 8.4 does not \
                     define",
                    s.raw
                ))
            })?),
            packet @ (Packet::Bitmap(_) | Packet::CompressedBitmap(_)) => {
                return self.on_bitmap(frame.kind, &packet);
            }
            _ => return Err(PeerError::Unexpected { command }),
        };
        Ok(Some(msg))
    }

    fn on_bitmap(
        &mut self,
        kind: HeaderKind,
        packet: &Packet,
    ) -> Result<Option<PeerMsg>, PeerError> {
        let bits = self.bitmap_bits;
        let t = self.bitmap.get_or_insert_with(|| BitmapInProgress {
            receiver: BitmapReceiver::new(bits),
            // The size comes from our own configuration, not from the peer.
            words: vec![0; words_for(bits)],
            bits,
        });
        let done = match t.receiver.receive(&mut t.words, kind, packet) {
            Ok(done) => done,
            Err(e) => {
                self.bitmap = None;
                return Err(e.into());
            }
        };
        if !done {
            return Ok(None);
        }
        let Some(mut t) = self.bitmap.take() else {
            return Ok(None);
        };
        // Plain packets carry whole words: clear what lies past the end.
        let tail = t.bits % 64;
        if let (Some(w), true) = (t.words.last_mut(), tail != 0) {
            *w &= (1u64 << tail) - 1;
        }
        Ok(Some(PeerMsg::Bitmap(t.words)))
    }
}

/// Data packets carry a data-integrity digest only when an algorithm is agreed; this side
/// cannot verify one, and must not accept data it was asked to verify.
/// Checks the data-integrity digest of a data packet against its payload (8.4's
/// "Digest integrity check FAILED"); without an agreed algorithm there must be none.
fn check_digest(
    command: Command,
    d: &DataPacket,
    integrity: Option<DigestAlg>,
) -> Result<(), PeerError> {
    match integrity {
        Some(alg) => {
            if alg.digest(&d.data).as_slice() == d.digest.as_ref() {
                Ok(())
            } else {
                Err(PeerError::IntegrityCheckFailed {
                    command,
                    sector: d.sector,
                    size: d.data.len(),
                    alg: alg.name(),
                })
            }
        }
        None if d.digest.is_empty() => Ok(()),
        None => Err(PeerError::Malformed {
            command,
            reason: format!(
                "carries a {}-byte data-integrity digest, but none was agreed",
                d.digest.len()
            ),
        }),
    }
}

fn trim_msg(t: &Trim, flags: u32) -> PeerMsg {
    PeerMsg::Trim {
        sector: t.sector,
        block_id: u64::from_be_bytes(t.block_id.0),
        seq: t.seq_num,
        flags,
        size: t.size,
    }
}

#[cfg(test)]
mod tests;
