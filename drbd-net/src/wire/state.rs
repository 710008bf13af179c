//! The `P_STATE` bitfield. The enumerations it carries live in [`drbd_core::state`] and are
//! re-exported here.

pub use drbd_core::state::{ConnState, DiskState, Role};

/// The DRBD state word of `P_STATE` (and the mask/value of the state change requests): one
/// big-endian u32 bitfield.
///
/// Layout (bit offset: width): role 0:2, peer 2:2, conn 4:5, disk 9:4, pdsk 13:4, susp 17,
/// aftr_isp 18, peer_isp 19, user_isp 20, susp_nod 21, susp_fen 22; bits 23..31 are unused by
/// 8.4 (9.x puts quorum at 23) and kept as received. The sender reports its own view: its
/// role in `role`, the peer's in `peer`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct State {
    /// The raw 32-bit value.
    pub raw: u32,
}

/// Bit offset and width of the fields.
const ROLE: (u32, u32) = (0, 2);
const PEER: (u32, u32) = (2, 2);
const CONN: (u32, u32) = (4, 5);
const DISK: (u32, u32) = (9, 4);
const PDSK: (u32, u32) = (13, 4);
const SUSP: (u32, u32) = (17, 1);
const AFTR_ISP: (u32, u32) = (18, 1);
const PEER_ISP: (u32, u32) = (19, 1);
const USER_ISP: (u32, u32) = (20, 1);
const SUSP_NOD: (u32, u32) = (21, 1);
const SUSP_FEN: (u32, u32) = (22, 1);

impl State {
    /// A state word from its raw value.
    pub const fn from_raw(raw: u32) -> State {
        State { raw }
    }

    /// A state word with these fields and all flags clear.
    pub fn new(role: Role, peer: Role, conn: ConnState, disk: DiskState, pdsk: DiskState) -> State {
        State::default()
            .with_role(role)
            .with_peer(peer)
            .with_conn(conn)
            .with_disk(disk)
            .with_pdsk(pdsk)
    }

    fn get(self, (shift, width): (u32, u32)) -> u8 {
        // Widths are at most 5 bits, so the value fits a u8.
        ((self.raw >> shift) & ((1 << width) - 1)) as u8
    }

    fn set(self, (shift, width): (u32, u32), value: u32) -> State {
        let mask = ((1u32 << width) - 1) << shift;
        State {
            raw: (self.raw & !mask) | ((value << shift) & mask),
        }
    }

    /// The sender's role, raw (see [`Role::from_wire`]).
    pub fn role(self) -> u8 {
        self.get(ROLE)
    }
    /// The peer's role as the sender sees it, raw.
    pub fn peer(self) -> u8 {
        self.get(PEER)
    }
    /// The connection state, raw (see [`ConnState::from_wire`]).
    pub fn conn(self) -> u8 {
        self.get(CONN)
    }
    /// The sender's disk state, raw (see [`DiskState::from_wire`]).
    pub fn disk(self) -> u8 {
        self.get(DISK)
    }
    /// The peer's disk state as the sender sees it, raw.
    pub fn pdsk(self) -> u8 {
        self.get(PDSK)
    }
    /// I/O suspended by the user.
    pub fn susp(self) -> bool {
        self.get(SUSP) != 0
    }
    /// Resync paused by a resync-after dependency.
    pub fn aftr_isp(self) -> bool {
        self.get(AFTR_ISP) != 0
    }
    /// Resync paused by the peer.
    pub fn peer_isp(self) -> bool {
        self.get(PEER_ISP) != 0
    }
    /// Resync paused by the user.
    pub fn user_isp(self) -> bool {
        self.get(USER_ISP) != 0
    }
    /// I/O suspended because no data is accessible.
    pub fn susp_nod(self) -> bool {
        self.get(SUSP_NOD) != 0
    }
    /// I/O frozen while the fence-peer handler runs.
    pub fn susp_fen(self) -> bool {
        self.get(SUSP_FEN) != 0
    }

    /// The role field set to `role`.
    pub fn with_role(self, role: Role) -> State {
        self.set(ROLE, u32::from(role.wire()))
    }
    /// The peer field set to `peer`.
    pub fn with_peer(self, peer: Role) -> State {
        self.set(PEER, u32::from(peer.wire()))
    }
    /// The conn field set to `conn`.
    pub fn with_conn(self, conn: ConnState) -> State {
        self.set(CONN, u32::from(conn.wire()))
    }
    /// The disk field set to `disk`.
    pub fn with_disk(self, disk: DiskState) -> State {
        self.set(DISK, u32::from(disk.wire()))
    }
    /// The pdsk field set to `pdsk`.
    pub fn with_pdsk(self, pdsk: DiskState) -> State {
        self.set(PDSK, u32::from(pdsk.wire()))
    }
    /// The susp flag set to `on`.
    pub fn with_susp(self, on: bool) -> State {
        self.set(SUSP, u32::from(on))
    }
    /// The aftr_isp flag set to `on`.
    pub fn with_aftr_isp(self, on: bool) -> State {
        self.set(AFTR_ISP, u32::from(on))
    }
    /// The peer_isp flag set to `on`.
    pub fn with_peer_isp(self, on: bool) -> State {
        self.set(PEER_ISP, u32::from(on))
    }
    /// The user_isp flag set to `on`.
    pub fn with_user_isp(self, on: bool) -> State {
        self.set(USER_ISP, u32::from(on))
    }
    /// The susp_nod flag set to `on`.
    pub fn with_susp_nod(self, on: bool) -> State {
        self.set(SUSP_NOD, u32::from(on))
    }
    /// The susp_fen flag set to `on`.
    pub fn with_susp_fen(self, on: bool) -> State {
        self.set(SUSP_FEN, u32::from(on))
    }
}
