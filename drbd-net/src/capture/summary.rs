//! One-line text summaries of decoded DRBD packets, as `drbd-wiredump` prints them.
//!
//! A line is `#FRAME sSTREAM SRC>DST P_NAME cmd=0xCODE len=PAYLOAD_LEN hdr=KIND [vol=N]`
//! followed by the packet's key fields as `key=value` (integers in decimal, UUIDs, flags and
//! opaque handles in hex; `block_id` and `barrier` are the raw wire bytes in hex, since they
//! are opaque values in the sender's byte order).

use std::fmt::Write as _;

use super::drbd::DrbdRecord;
use crate::wire::{
    BlockAck, BlockId, BlockRequest, ConnState, DataPacket, DiskState, HeaderKind, Packet,
    ReqState, Role, State, SyncParam, DP_DISCARD, DP_FLUSH, DP_FUA, DP_HARDBARRIER,
    DP_MAY_SET_IN_SYNC, DP_RW_SYNC, DP_SEND_RECEIVE_ACK, DP_SEND_WRITE_ACK, DP_UNPLUG, DP_WSAME,
    DP_ZEROES, ID_IN_SYNC, ID_OUT_OF_SYNC,
};

/// Names of the `dp_flags` bits, lowest first (values from the wire module's `DP_*`).
const DP_FLAG_NAMES: &[(u32, &str)] = &[
    (DP_HARDBARRIER, "HARDBARRIER"),
    (DP_RW_SYNC, "RW_SYNC"),
    (DP_MAY_SET_IN_SYNC, "MAY_SET_IN_SYNC"),
    (DP_UNPLUG, "UNPLUG"),
    (DP_FUA, "FUA"),
    (DP_FLUSH, "FLUSH"),
    (DP_DISCARD, "DISCARD"),
    (DP_SEND_RECEIVE_ACK, "SEND_RECEIVE_ACK"),
    (DP_SEND_WRITE_ACK, "SEND_WRITE_ACK"),
    (DP_WSAME, "WSAME"),
    (DP_ZEROES, "ZEROES"),
];

/// Reads one boolean flag of a state word.
type StateFlag = fn(State) -> bool;

/// The boolean state flags after `pdsk`, in bit order, read with [`State`]'s accessors (the
/// wire module owns the bit layout).
const STATE_FLAGS: &[(&str, StateFlag)] = &[
    ("susp", State::susp),
    ("aftr_isp", State::aftr_isp),
    ("peer_isp", State::peer_isp),
    ("user_isp", State::user_isp),
    ("susp_nod", State::susp_nod),
    ("susp_fen", State::susp_fen),
];

/// The whole line for one record.
pub fn format_record(r: &DrbdRecord) -> String {
    let cmd = r.decoded.packet.command();
    let mut line = format!(
        "#{} s{} {} {} cmd={:#06x} len={} hdr={}",
        r.frame,
        r.stream,
        r.direction,
        cmd.name(),
        r.header.command,
        r.header.length,
        match r.header.kind {
            HeaderKind::H80 => "h80",
            HeaderKind::H95 => "h95",
            HeaderKind::H100 => "h100",
        }
    );
    if r.header.kind == HeaderKind::H100 {
        let _ = write!(line, " vol={}", r.header.volume);
    }
    let fields = packet_fields(&r.decoded.packet);
    if !fields.is_empty() {
        line.push(' ');
        line.push_str(&fields);
    }
    line
}

fn hex_bytes(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("0x");
    for byte in b {
        let _ = write!(s, "{byte:02x}");
    }
    s
}

fn block_id(id: &BlockId) -> String {
    hex_bytes(&id.0)
}

/// `dp_flags` as hex with the set bits named, e.g. `0x102(RW_SYNC|SEND_WRITE_ACK)`.
pub fn dp_flags(flags: u32) -> String {
    let mut names: Vec<String> = DP_FLAG_NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| (*n).to_string())
        .collect();
    let known = DP_FLAG_NAMES.iter().fold(0, |acc, (bit, _)| acc | bit);
    if flags & !known != 0 {
        names.push(format!("{:#x}", flags & !known));
    }
    if names.is_empty() {
        format!("{flags:#x}")
    } else {
        format!("{flags:#x}({})", names.join("|"))
    }
}

fn after_sb(v: u32) -> String {
    crate::handshake::asb::name(v).map_or_else(|| v.to_string(), str::to_string)
}

fn role_name(v: u8) -> String {
    Role::from_wire(v).map_or_else(|| v.to_string(), |r| r.name().to_string())
}

fn conn_name(v: u8) -> String {
    ConnState::from_wire(v).map_or_else(|| v.to_string(), |c| c.name().to_string())
}

fn disk_name(v: u8) -> String {
    DiskState::from_wire(v).map_or_else(|| v.to_string(), |d| d.name().to_string())
}

/// The state word's fields, e.g. `role=Primary peer=Secondary conn=Connected ...`.
pub fn state_fields(st: State) -> String {
    let mut s = format!(
        "role={} peer={} conn={} disk={} pdsk={}",
        role_name(st.role()),
        role_name(st.peer()),
        conn_name(st.conn()),
        disk_name(st.disk()),
        disk_name(st.pdsk())
    );
    for (name, is_set) in STATE_FLAGS {
        if is_set(st) {
            let _ = write!(s, " {name}=1");
        }
    }
    s
}

/// A state change request: the raw words, then the requested value of each masked field.
fn req_state_fields(r: &ReqState) -> String {
    let (mask, val) = (r.mask, r.val);
    let mut s = format!("mask={:#x} val={:#x}", mask.raw, val.raw);
    if mask.role() != 0 {
        let _ = write!(s, " role={}", role_name(val.role()));
    }
    if mask.peer() != 0 {
        let _ = write!(s, " peer={}", role_name(val.peer()));
    }
    if mask.conn() != 0 {
        let _ = write!(s, " conn={}", conn_name(val.conn()));
    }
    if mask.disk() != 0 {
        let _ = write!(s, " disk={}", disk_name(val.disk()));
    }
    if mask.pdsk() != 0 {
        let _ = write!(s, " pdsk={}", disk_name(val.pdsk()));
    }
    for (name, is_set) in STATE_FLAGS {
        if is_set(mask) {
            let _ = write!(s, " {name}={}", u8::from(is_set(val)));
        }
    }
    s
}

fn data_fields(d: &DataPacket) -> String {
    let mut s = format!(
        "sector={} size={} block_id={} seq={} flags={}",
        d.sector,
        d.data.len(),
        block_id(&d.block_id),
        d.seq_num,
        dp_flags(d.dp_flags)
    );
    if !d.digest.is_empty() {
        let _ = write!(s, " digest={}", hex_bytes(&d.digest));
    }
    s
}

fn ack_fields(a: &BlockAck) -> String {
    format!(
        "sector={} size={} block_id={} seq={}",
        a.sector,
        a.blksize,
        block_id(&a.block_id),
        a.seq_num
    )
}

fn req_fields(r: &BlockRequest) -> String {
    let mut s = format!(
        "sector={} size={} block_id={}",
        r.sector,
        r.blksize,
        block_id(&r.block_id)
    );
    if r.pad != 0 {
        let _ = write!(s, " pad={:#x}", r.pad);
    }
    s
}

fn sync_param_fields(p: &SyncParam) -> String {
    let mut s = format!("rate={}", p.resync_rate());
    match p {
        SyncParam::Rate { .. } => {}
        SyncParam::Verify { verify_alg, .. } => {
            let _ = write!(s, " verify_alg={verify_alg:?}");
        }
        SyncParam::Algs {
            verify_alg,
            csums_alg,
            ..
        } => {
            let _ = write!(s, " verify_alg={verify_alg:?} csums_alg={csums_alg:?}");
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
            let _ = write!(
                s,
                " verify_alg={verify_alg:?} csums_alg={csums_alg:?} c_plan_ahead={c_plan_ahead} \
                 c_delay_target={c_delay_target} c_fill_target={c_fill_target} \
                 c_max_rate={c_max_rate}"
            );
        }
    }
    s
}

/// The key fields of a packet as `key=value` words (empty for packets without payload).
pub fn packet_fields(p: &Packet) -> String {
    match p {
        Packet::Data(d) | Packet::DataReply(d) | Packet::RsDataReply(d) => data_fields(d),
        Packet::Trim(t) | Packet::Zeroes(t) => format!(
            "sector={} size={} block_id={} seq={} flags={}",
            t.sector,
            t.size,
            block_id(&t.block_id),
            t.seq_num,
            dp_flags(t.dp_flags)
        ),
        Packet::Wsame(w) => format!(
            "sector={} size={} block_id={} seq={} flags={} block_len={}",
            w.sector,
            w.size,
            block_id(&w.block_id),
            w.seq_num,
            dp_flags(w.dp_flags),
            w.data.len()
        ),
        Packet::Barrier(b) => {
            let mut s = format!("barrier={}", hex_bytes(&b.barrier));
            if b.pad != 0 {
                let _ = write!(s, " pad={:#x}", b.pad);
            }
            s
        }
        Packet::BarrierAck(b) => {
            format!("barrier={} set_size={}", hex_bytes(&b.barrier), b.set_size)
        }
        Packet::Bitmap(b) => format!("bitmap_bytes={}", b.words.len()),
        Packet::CompressedBitmap(c) => format!(
            "encoding={:#04x} code={} pad_bits={} first_run_set={} code_bytes={}",
            c.encoding,
            c.code_kind(),
            c.pad_bits(),
            u8::from(c.first_run_set()),
            c.code.len()
        ),
        Packet::DataRequest(r)
        | Packet::RsDataRequest(r)
        | Packet::OvRequest(r)
        | Packet::RsThinReq(r) => req_fields(r),
        Packet::OvReply(d) | Packet::CsumRsRequest(d) => {
            format!("{} digest={}", req_fields(&d.request), hex_bytes(&d.digest))
        }
        Packet::SyncParam(p) | Packet::SyncParam89(p) => sync_param_fields(p),
        Packet::Protocol(p) | Packet::ProtocolUpdate(p) => {
            let protocol = match p.protocol {
                1 => "A".to_string(),
                2 => "B".to_string(),
                3 => "C".to_string(),
                other => other.to_string(),
            };
            format!(
                "protocol={protocol} after-sb-0pri={} after-sb-1pri={} after-sb-2pri={} \
                 conn_flags={:#x} two_primaries={} integrity_alg={:?}",
                after_sb(p.after_sb_0p),
                after_sb(p.after_sb_1p),
                after_sb(p.after_sb_2p),
                p.conn_flags,
                p.two_primaries,
                p.integrity_alg
            )
        }
        Packet::Uuids(u) => format!(
            "current={:#018x} bitmap={:#018x} history={:#018x},{:#018x} dirty={} \
             uuid_flags={:#x}",
            u.current, u.bitmap, u.history[0], u.history[1], u.dirty_bits, u.flags
        ),
        Packet::Sizes(z) => {
            let mut s = format!(
                "d_size={} u_size={} c_size={} max_bio={}",
                z.d_size, z.u_size, z.c_size, z.max_bio_size
            );
            if z.dds_flags != 0 {
                let _ = write!(s, " dds_flags={:#x}", z.dds_flags);
            }
            if let Some(q) = &z.queue_limits {
                let _ = write!(
                    s,
                    " logical_block={} physical_block={} discard={} write_same={}",
                    q.logical_block_size,
                    q.physical_block_size,
                    q.discard_enabled,
                    q.write_same_capable
                );
            }
            s
        }
        Packet::State(st) => state_fields(*st),
        Packet::SyncUuid(u) => format!("uuid={:#018x}", u.uuid),
        Packet::AuthChallenge(b) => format!("challenge_len={}", b.len()),
        Packet::AuthResponse(b) => format!("response_len={}", b.len()),
        Packet::StateChgReq(r) | Packet::ConnStChgReq(r) => req_state_fields(r),
        Packet::StateChgReply(r) | Packet::ConnStChgReply(r) => format!("retcode={}", r.retcode),
        Packet::OvResult(a) => {
            let result = if a.block_id == ID_IN_SYNC {
                "in_sync"
            } else if a.block_id == ID_OUT_OF_SYNC {
                "out_of_sync"
            } else {
                "unknown"
            };
            format!("{} result={result}", ack_fields(a))
        }
        Packet::RecvAck(a)
        | Packet::WriteAck(a)
        | Packet::RsWriteAck(a)
        | Packet::Superseded(a)
        | Packet::NegAck(a)
        | Packet::NegDReply(a)
        | Packet::NegRsDReply(a)
        | Packet::RsIsInSync(a)
        | Packet::RsCancel(a)
        | Packet::RetryWrite(a) => ack_fields(a),
        Packet::DelayProbe(p) => format!("seq={} offset={}", p.seq_num, p.offset),
        Packet::OutOfSync(b) | Packet::RsDeallocated(b) => {
            format!("sector={} size={}", b.sector, b.blksize)
        }
        Packet::ConnectionFeatures(f) => {
            let mut s = format!(
                "proto_min={} proto_max={} features={:#x}",
                f.protocol_min, f.protocol_max, f.feature_flags
            );
            if f.sender_node_id() != 0 || f.receiver_node_id() != 0 {
                let _ = write!(
                    s,
                    " sender_node_id={} receiver_node_id={}",
                    f.sender_node_id(),
                    f.receiver_node_id()
                );
            }
            s
        }
        Packet::BecomeSyncTarget
        | Packet::BecomeSyncSource
        | Packet::UnplugRemote
        | Packet::Ping
        | Packet::PingAck
        | Packet::InitialMeta
        | Packet::InitialData => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_states_are_named() {
        assert_eq!(dp_flags(0), "0x0");
        assert_eq!(dp_flags(0x102), "0x102(RW_SYNC|SEND_WRITE_ACK)");
        assert_eq!(dp_flags(0x8000), "0x8000(0x8000)");
        // role Primary, peer Secondary, conn Connected, disk UpToDate, pdsk UpToDate.
        let raw = 1 | (2 << 2) | (10 << 4) | (8 << 9) | (8 << 13) | (1 << 18);
        assert_eq!(
            state_fields(State::from_raw(raw)),
            "role=Primary peer=Secondary conn=Connected disk=UpToDate pdsk=UpToDate aftr_isp=1"
        );
        // A request naming susp (bit 17, set) and susp_fen (bit 22, cleared).
        let req = ReqState {
            mask: State::from_raw((1 << 17) | (1 << 22)),
            val: State::from_raw(1 << 17),
        };
        assert_eq!(
            req_state_fields(&req),
            "mask=0x420000 val=0x20000 susp=1 susp_fen=0"
        );
        assert_eq!(after_sb(3), "discard-zero-changes");
        assert_eq!(after_sb(99), "99");
    }
}
