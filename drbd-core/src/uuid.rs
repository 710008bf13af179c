//! Data generation UUIDs (DRBD 8.4, meta data v08) and the decisions taken on connect.
//!
//! # The model
//!
//! Every node keeps four 64-bit generation identifiers ([`GenerationUuids`]):
//!
//! * `current`: names the generation of the data on this disk. A new random value is drawn
//!   whenever the data may start to diverge from the peer's (promotion without a peer, losing
//!   the peer while Primary, `new-current-uuid`).
//! * `bitmap`: the generation both nodes last shared; non-zero while the bitmap tracks the
//!   blocks written since then. It is 0 when the bitmap is not in use.
//! * `history[0]`, `history[1]`: older generations, youngest first.
//!
//! Bit 0 of a UUID is not part of its identity ([`UUID_PRIMARY`]): in `current` it says that
//! the node is Primary, and because `bitmap` is copied from `current` it also records whether
//! the node was Primary when the generations split. Every comparison masks it.
//!
//! On connect each node sends its four UUIDs, the number of set bits in its bitmap and a few
//! flags in `P_UUIDS` ([`UuidInfo`]). Both nodes then run the same deterministic comparison
//! ([`compare`], DRBD's `drbd_uuid_compare`), which yields a [`Relation`] and the number of
//! the rule that decided it, and the sync handshake ([`decide`], DRBD's `drbd_sync_handshake`),
//! which folds in disk states, roles, the after-split-brain policies, `discard-my-data` and
//! `rr-conflict` and says what to do ([`HandshakeDecision`]).
//!
//! # How to call it
//!
//! Nothing here does I/O, reads a clock or draws random numbers: operations that need a fresh
//! UUID take it as an argument, and everything that DRBD would write to disk, send, or hand to
//! a handler comes back as a value. After [`decide`] the caller:
//!
//! 1. applies [`Comparison::correction`] (a local correction must be persisted; a peer
//!    correction replaces the stored copy of the peer's UUIDs, which the SyncTarget later
//!    adopts in [`GenerationUuids::finish_sync_target`]);
//! 2. runs [`HandshakeDecision::handlers`] in order, demotes if [`HandshakeDecision::demote`];
//! 3. acts on [`HandshakeDecision::outcome`]: disconnect, or go to WFBitMapS / WFBitMapT /
//!    Connected, setting every bitmap bit first when the resync is a full one.
//!
//! During the resync the SyncSource calls [`GenerationUuids::start_sync_source`] and sends the
//! returned value in `P_SYNC_UUID`; the SyncTarget feeds it to
//! [`GenerationUuids::adopt_sync_uuid`]. When the resync completes without failed blocks the
//! source calls [`GenerationUuids::finish_sync_source`] and the target
//! [`GenerationUuids::finish_sync_target`] with the UUIDs it received in the handshake.
//!
//! # DRBD's integer results
//!
//! DRBD codes the comparison as an integer, and that integer shows up in its log lines
//! (`uuid_compare()=N by rule M`). [`Relation::to_drbd`] and [`Relation::from_drbd`] map
//! between the two:
//!
//! | DRBD | [`Relation`] |
//! |---|---|
//! | 0 | `Equal` (no resync) |
//! | 1 / 2 | `SyncSource { full: false / true }` |
//! | -1 / -2 | `SyncTarget { full: false / true }` |
//! | 100 | `SplitBrain { auto_recoverable: true }` |
//! | -100 | `SplitBrain { auto_recoverable: false }` |
//! | -1000 | `Unrelated` |
//! | -1000 - v (e.g. -1091) | `NeedsProtocol { version: v, feature_flags: 0 }` |
//! | -(0x10000 \| v \| f << 8) | `NeedsProtocol { version: v, feature_flags: f }` |

use std::fmt;
use std::str::FromStr;

use crate::meta::Uuids;

/// The current UUID `create-md` writes: "just created", never synced with anybody.
pub use crate::meta::superblock::UUID_JUST_CREATED;

/// Bit 0 of a UUID: set in the current UUID while the node is Primary. Not part of the
/// identity; comparisons mask it.
pub const UUID_PRIMARY: u64 = 1;

/// What a SyncSource adds to its bitmap UUID when it starts another resync from the same base
/// generation, so that the new sync UUID is recognisably derived from the old one (rules 51
/// and 71 rely on that).
pub const UUID_NEW_BM_OFFSET: u64 = 1 << 48;

/// The highest protocol version of DRBD 8.4. Rule 41 asks for it (plus [`FF_WSAME`]) in its
/// "needs protocol" result.
pub const PRO_VERSION_MAX: u32 = 101;

/// Feature flag `DRBD_FF_WSAME` (write-same). Besides its own meaning it marks a peer that is
/// new enough for rule 41.
pub const FF_WSAME: u32 = 4;

/// Lowest agreed protocol version at which a fresh pair may skip the initial sync.
pub const MIN_PROTOCOL_SKIP_INITIAL_SYNC: u32 = 90;

/// Lowest agreed protocol version at which rules 34-37, 51 and 71 can repair UUIDs; below it
/// those situations end in a "needs protocol 91" result.
pub const MIN_PROTOCOL_UUID_REPAIR: u32 = 91;

/// From this agreed protocol version on, rules 51 and 71 detect a lost `P_SYNC_UUID` by the
/// [`UUID_NEW_BM_OFFSET`] step; before it by comparing history slots.
pub const MIN_PROTOCOL_SYNC_UUID_OFFSET: u32 = 96;

/// A UUID without its primary flag.
pub const fn masked(uuid: u64) -> u64 {
    uuid & !UUID_PRIMARY
}

/// `uuid` with bit 0 set for a Primary and cleared otherwise, as DRBD stores a current UUID.
pub const fn with_role_bit(uuid: u64, role: Role) -> u64 {
    match role {
        Role::Primary => uuid | UUID_PRIMARY,
        Role::Unknown | Role::Secondary => masked(uuid),
    }
}

// ------------------------------------------------------------------------------------------
// Roles and disk states
// ------------------------------------------------------------------------------------------

pub use crate::state::{DiskState, Role};

/// Whether a peer disk in this state holds data this node can replicate to: DRBD treats
/// anything below Inconsistent, DUnknown and Outdated as "no contact to the peer's data".
fn peer_data_usable(disk: DiskState) -> bool {
    !(disk < DiskState::Inconsistent || disk == DiskState::DUnknown || disk == DiskState::Outdated)
}

/// Whether a change of the peer's disk state from `old` to `new` loses contact to the peer's
/// copy of the data (DRBD then may need a new current UUID, see
/// [`GenerationUuids::on_peer_data_lost`]).
pub fn lost_peer_data(old: DiskState, new: DiskState) -> bool {
    peer_data_usable(old) && !peer_data_usable(new)
}

// ------------------------------------------------------------------------------------------
// The UUID set and its transitions
// ------------------------------------------------------------------------------------------

/// The four generation UUIDs of a node, raw (bit 0 included), in the order of the v08
/// superblock and of `P_UUIDS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GenerationUuids {
    /// Generation of the local data; bit 0 set while Primary.
    pub current: u64,
    /// Generation last shared with the peer while the bitmap is in use, else 0.
    pub bitmap: u64,
    /// Older generations, youngest first.
    pub history: [u64; 2],
}

/// What [`GenerationUuids::on_peer_data_lost`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerLossAction {
    /// Nothing to do: neither node is Primary, the bitmap is already in use, or the local disk
    /// is not UpToDate.
    Nothing,
    /// A new current UUID was generated (persist it, and send `P_UUIDS` if still connected).
    NewCurrentUuid,
    /// I/O is suspended: DRBD remembers to create the new current UUID when I/O resumes
    /// (its `NEW_CUR_UUID` flag); the caller calls [`GenerationUuids::new_current`] then.
    DeferredUntilResume,
}

/// A connection state as far as the UUID operations care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No network configuration.
    StandAlone,
    /// Connected (exactly: not resyncing, not verifying), at this agreed protocol version.
    Connected {
        /// The agreed protocol version.
        protocol_version: u32,
    },
    /// Any other connection state (connecting, exchanging parameters, resyncing, ...).
    Other,
}

/// What [`GenerationUuids::new_current_by_user`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewCurrentUuid {
    /// A new current UUID was generated on a StandAlone node (the old current became the
    /// bitmap UUID). If `clear_bitmap`, the caller clears every bit of the on-disk bitmap.
    Generated {
        /// `--clear-bitmap` was given.
        clear_bitmap: bool,
    },
    /// Skip the initial sync of a fresh, connected pair: the caller clears the on-disk bitmap,
    /// sends `announce` in `P_UUIDS` with [`UuidFlags::SKIP_INITIAL_SYNC`], and sets both its
    /// own and the peer's disk state to UpToDate. The UUIDs now hold `announce` with the
    /// bitmap UUID cleared.
    SkipInitialSync {
        /// The UUID set to send (bitmap UUID still holding the old "just created" value).
        announce: GenerationUuids,
    },
}

impl GenerationUuids {
    /// The set `create-md` writes: current "just created", everything else 0.
    pub const fn just_created() -> GenerationUuids {
        GenerationUuids {
            current: UUID_JUST_CREATED,
            bitmap: 0,
            history: [0, 0],
        }
    }

    /// From `[current, bitmap, history[0], history[1]]`.
    pub const fn from_array(uuids: [u64; 4]) -> GenerationUuids {
        GenerationUuids {
            current: uuids[0],
            bitmap: uuids[1],
            history: [uuids[2], uuids[3]],
        }
    }

    /// `[current, bitmap, history[0], history[1]]`.
    pub const fn to_array(self) -> [u64; 4] {
        [self.current, self.bitmap, self.history[0], self.history[1]]
    }

    /// Whether the current UUID is exactly [`UUID_JUST_CREATED`] (DRBD tests the raw value
    /// when deciding whether the initial sync may be skipped).
    pub fn is_just_created(&self) -> bool {
        self.current == UUID_JUST_CREATED
    }

    /// Whether this node was Primary when its bitmap UUID was set, i.e. when the generations
    /// split (bit 0 of the bitmap UUID; the split-brain policies look at it).
    pub fn was_primary_at_split(&self) -> bool {
        self.bitmap & UUID_PRIMARY != 0
    }

    /// Pushes `uuid` into history: the older history slot is dropped, the younger one moves
    /// down, `uuid` becomes `history[0]`.
    pub fn push_history(&mut self, uuid: u64) {
        self.history[1] = self.history[0];
        self.history[0] = uuid;
    }

    /// Sets the bitmap UUID the way DRBD's `drbd_uuid_set` does: a non-zero previous value is
    /// pushed into history first.
    fn set_bitmap_rotating(&mut self, uuid: u64) {
        if self.bitmap != 0 {
            self.push_history(self.bitmap);
        }
        self.bitmap = uuid;
    }

    /// Draws a new current UUID (DRBD's `drbd_uuid_new_current`): the old current UUID, with
    /// its primary bit, becomes the bitmap UUID, so the next connect can resync from the
    /// bitmap; `random` becomes the current UUID, bit 0 set according to `role`.
    ///
    /// Returns the bitmap UUID that was overwritten, if it was non-zero. DRBD only warns about
    /// that (it happens on a forced promotion with the bitmap already in use); the old value
    /// is not pushed into history.
    pub fn new_current(&mut self, random: u64, role: Role) -> Option<u64> {
        let overwritten = (self.bitmap != 0).then_some(self.bitmap);
        self.bitmap = self.current;
        self.current = with_role_bit(random, role);
        overwritten
    }

    /// Promotion to Primary (after the role change took effect). DRBD draws a new current UUID
    /// when the peer cannot follow the writes, i.e. when not connected or the peer's disk is
    /// Failed or worse, and the bitmap is not yet in use; or always when the promotion is
    /// forced (`primary --force`). In every case the primary bit of the current UUID is set.
    ///
    /// Returns whether a new current UUID was generated (it must then be persisted; a forced
    /// promotion while connected also sends `P_UUIDS`).
    pub fn promote(
        &mut self,
        random: u64,
        connected: bool,
        peer_disk: DiskState,
        forced: bool,
    ) -> bool {
        let peer_cannot_follow = !connected || peer_disk <= DiskState::Failed;
        let generate = (peer_cannot_follow && self.bitmap == 0) || forced;
        if generate {
            self.new_current(random, Role::Primary);
        }
        self.current |= UUID_PRIMARY;
        generate
    }

    /// Demotion to Secondary: clears the primary bit of the current UUID.
    pub fn demote(&mut self) {
        self.current = masked(self.current);
    }

    /// Contact to the peer's data was lost (see [`lost_peer_data`]) while this node or the
    /// peer is Primary. If the bitmap is not yet in use and the local disk is UpToDate, the
    /// generations now diverge: DRBD draws a new current UUID (or defers it while I/O is
    /// suspended). `role` and `peer_role` are the roles after the state change.
    pub fn on_peer_data_lost(
        &mut self,
        random: u64,
        role: Role,
        peer_role: Role,
        disk: DiskState,
        io_suspended: bool,
    ) -> PeerLossAction {
        let someone_primary = role.is_primary() || peer_role.is_primary();
        if !(someone_primary && self.bitmap == 0 && disk >= DiskState::UpToDate) {
            return PeerLossAction::Nothing;
        }
        if io_suspended {
            return PeerLossAction::DeferredUntilResume;
        }
        self.new_current(random, role);
        PeerLossAction::NewCurrentUuid
    }

    /// Clears the bitmap UUID after a resync (DRBD's `drbd_uuid_set_bm(0)`): a non-zero bitmap
    /// UUID moves into history. Nothing happens when it already is 0.
    pub fn clear_bitmap_uuid(&mut self) {
        if self.bitmap == 0 {
            return;
        }
        self.push_history(self.bitmap);
        self.bitmap = 0;
    }

    /// The SyncSource starts a resync (DRBD's `drbd_gen_and_send_sync_uuid`): the new bitmap
    /// UUID is the old one plus [`UUID_NEW_BM_OFFSET`], or `random` when the bitmap UUID was 0
    /// or "just created"; the old bitmap UUID moves into history. Returns the new bitmap UUID,
    /// which the caller persists and then sends in `P_SYNC_UUID`.
    pub fn start_sync_source(&mut self, random: u64) -> u64 {
        // The "just created" test is on the raw value, as in DRBD.
        let uuid = if self.bitmap != 0 && self.bitmap != UUID_JUST_CREATED {
            self.bitmap.wrapping_add(UUID_NEW_BM_OFFSET)
        } else {
            random
        };
        self.set_bitmap_rotating(uuid);
        uuid
    }

    /// The SyncTarget received `P_SYNC_UUID`: that value becomes its current UUID (bit 0 by
    /// `role`) and the bitmap UUID is cleared. Neither old value goes into history: the target
    /// learns the real lineage from the source when the resync finishes.
    pub fn adopt_sync_uuid(&mut self, sync_uuid: u64, role: Role) {
        self.current = with_role_bit(sync_uuid, role);
        self.bitmap = 0;
    }

    /// The resync finished on the SyncSource (no failed blocks): the bitmap UUID moves into
    /// history.
    pub fn finish_sync_source(&mut self) {
        self.clear_bitmap_uuid();
    }

    /// The resync finished on the SyncTarget (no failed blocks). `peer` is the UUID set the
    /// source sent in the handshake (after any correction by rule 35 or 51). The target takes
    /// over the source's bitmap and history UUIDs, records its own current (the sync UUID) as
    /// bitmap UUID (pushing the source's bitmap UUID into history), adopts the source's
    /// current UUID (bit 0 by `role`), and finally clears the bitmap UUID like the source.
    pub fn finish_sync_target(&mut self, peer: &GenerationUuids, role: Role) {
        let sync_uuid = self.current;
        self.bitmap = peer.bitmap;
        self.history = peer.history;
        self.set_bitmap_rotating(sync_uuid);
        self.current = with_role_bit(peer.current, role);
        self.clear_bitmap_uuid();
    }

    /// `new-current-uuid [--clear-bitmap]` (DRBD's `drbd_adm_new_c_uuid`).
    ///
    /// On a fresh pair (both "just created", Connected at protocol 90 or later) with
    /// `clear_bitmap` this skips the initial sync ([`NewCurrentUuid::SkipInitialSync`]).
    /// Otherwise the node must be StandAlone. The bitmap UUID, if any, first moves into
    /// history; then a new current UUID is drawn with the old one as bitmap UUID.
    pub fn new_current_by_user(
        &mut self,
        random: u64,
        role: Role,
        clear_bitmap: bool,
        link: LinkState,
    ) -> Result<NewCurrentUuid, UuidError> {
        let skip_initial_sync = clear_bitmap
            && self.is_just_created()
            && matches!(link, LinkState::Connected { protocol_version }
                if protocol_version >= MIN_PROTOCOL_SKIP_INITIAL_SYNC);
        if !skip_initial_sync && link != LinkState::StandAlone {
            return Err(UuidError::Connected);
        }
        self.set_bitmap_rotating(0);
        self.new_current(random, role);
        if !skip_initial_sync {
            return Ok(NewCurrentUuid::Generated { clear_bitmap });
        }
        // The announcement still carries the old current ("just created") as bitmap UUID;
        // locally the bitmap UUID is cleared without rotation right after sending it.
        let announce = *self;
        self.bitmap = 0;
        Ok(NewCurrentUuid::SkipInitialSync { announce })
    }

    /// The receiving side of a skipped initial sync (DRBD's `receive_uuids`): when this node is
    /// Connected at protocol 90 or later, its current UUID is "just created" and the peer's
    /// `P_UUIDS` carries [`UuidFlags::SKIP_INITIAL_SYNC`], it adopts the peer's current UUID
    /// (bit 0 by `role`) and clears its bitmap UUID. Returns whether it did; the caller then
    /// clears the on-disk bitmap and sets both disk states to UpToDate.
    pub fn accept_skip_initial_sync(
        &mut self,
        peer: &UuidInfo,
        role: Role,
        link: LinkState,
    ) -> bool {
        let accept = self.is_just_created()
            && peer.flags.contains(UuidFlags::SKIP_INITIAL_SYNC)
            && matches!(link, LinkState::Connected { protocol_version }
                if protocol_version >= MIN_PROTOCOL_SKIP_INITIAL_SYNC);
        if accept {
            self.current = with_role_bit(peer.uuids.current, role);
            self.bitmap = 0;
        }
        accept
    }
}

impl From<Uuids> for GenerationUuids {
    fn from(u: Uuids) -> GenerationUuids {
        GenerationUuids {
            current: u.current,
            bitmap: u.bitmap,
            history: u.history,
        }
    }
}

impl From<GenerationUuids> for Uuids {
    fn from(g: GenerationUuids) -> Uuids {
        Uuids {
            current: g.current,
            bitmap: g.bitmap,
            history: g.history,
        }
    }
}

impl From<[u64; 4]> for GenerationUuids {
    fn from(uuids: [u64; 4]) -> GenerationUuids {
        GenerationUuids::from_array(uuids)
    }
}

impl From<GenerationUuids> for [u64; 4] {
    fn from(g: GenerationUuids) -> [u64; 4] {
        g.to_array()
    }
}

/// `CURRENT:BITMAP:HISTORY0:HISTORY1`, each as 16 upper-case hex digits (the form DRBD's
/// kernel log and `drbdsetup show-gi` use).
impl fmt::Display for GenerationUuids {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:016X}:{:016X}:{:016X}:{:016X}",
            self.current, self.bitmap, self.history[0], self.history[1]
        )
    }
}

/// Parses the [`Display`](fmt::Display) form: four colon-separated hex numbers of 1 to 16
/// digits, either case.
impl FromStr for GenerationUuids {
    type Err = UuidError;

    fn from_str(text: &str) -> Result<GenerationUuids, UuidError> {
        let bad = || UuidError::Parse {
            text: text.to_string(),
        };
        let mut uuids = [0u64; 4];
        let mut parts = text.trim().split(':');
        for slot in &mut uuids {
            let part = parts.next().ok_or_else(bad)?;
            let hex_ok =
                !part.is_empty() && part.len() <= 16 && part.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex_ok {
                return Err(bad());
            }
            *slot = u64::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(GenerationUuids::from_array(uuids))
    }
}

// ------------------------------------------------------------------------------------------
// P_UUIDS contents
// ------------------------------------------------------------------------------------------

/// The flags word of `P_UUIDS` (slot 5). Unknown bits are kept, they come off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct UuidFlags(pub u64);

impl UuidFlags {
    /// The sender was told to discard its data (`discard-my-data`).
    pub const DISCARD_MY_DATA: UuidFlags = UuidFlags(1);
    /// The sender was Primary when it crashed (found `MDF_PRIMARY_IND` set on attach) and has
    /// not resynced since.
    pub const CRASHED_PRIMARY: UuidFlags = UuidFlags(2);
    /// The sender's disk will be Inconsistent after the attach/handshake in progress.
    pub const INCONSISTENT: UuidFlags = UuidFlags(4);
    /// Sent by `new-current-uuid --clear-bitmap` on a fresh pair: skip the initial sync.
    pub const SKIP_INITIAL_SYNC: UuidFlags = UuidFlags(8);

    /// No flag set.
    pub const fn empty() -> UuidFlags {
        UuidFlags(0)
    }

    /// The raw word.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: UuidFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether [`UuidFlags::DISCARD_MY_DATA`] is set.
    pub const fn discard_my_data(self) -> bool {
        self.contains(UuidFlags::DISCARD_MY_DATA)
    }

    /// Whether [`UuidFlags::CRASHED_PRIMARY`] is set.
    pub const fn crashed_primary(self) -> bool {
        self.contains(UuidFlags::CRASHED_PRIMARY)
    }
}

impl std::ops::BitOr for UuidFlags {
    type Output = UuidFlags;

    fn bitor(self, rhs: UuidFlags) -> UuidFlags {
        UuidFlags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for UuidFlags {
    fn bitor_assign(&mut self, rhs: UuidFlags) {
        self.0 |= rhs.0;
    }
}

/// What one node contributes to the comparison: the content of its `P_UUIDS`. For the local
/// node, `flags` are the flags it sends (its `discard-my-data` setting, its crashed-primary
/// state, ...), and `dirty_bits` the bitmap weight it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct UuidInfo {
    /// The four UUIDs.
    pub uuids: GenerationUuids,
    /// Number of set bits in the bitmap ("changes" for the split-brain policies).
    pub dirty_bits: u64,
    /// The flags word.
    pub flags: UuidFlags,
}

impl UuidInfo {
    /// Bundles the three parts.
    pub const fn new(uuids: GenerationUuids, dirty_bits: u64, flags: UuidFlags) -> UuidInfo {
        UuidInfo {
            uuids,
            dirty_bits,
            flags,
        }
    }

    /// From the six u64 of `P_UUIDS`: current, bitmap, `history[0]`, `history[1]`, bitmap weight,
    /// flags.
    pub const fn from_wire(words: [u64; 6]) -> UuidInfo {
        UuidInfo {
            uuids: GenerationUuids::from_array([words[0], words[1], words[2], words[3]]),
            dirty_bits: words[4],
            flags: UuidFlags(words[5]),
        }
    }

    /// The six u64 of `P_UUIDS`.
    pub const fn to_wire(&self) -> [u64; 6] {
        let u = self.uuids;
        [
            u.current,
            u.bitmap,
            u.history[0],
            u.history[1],
            self.dirty_bits,
            self.flags.0,
        ]
    }
}

// ------------------------------------------------------------------------------------------
// uuid_compare
// ------------------------------------------------------------------------------------------

/// Everything besides the two UUID sets that the comparison looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompareContext {
    /// The agreed protocol version (rules 34-37, 51 and 71 depend on it).
    pub protocol_version: u32,
    /// The agreed feature flags (rule 41 needs [`FF_WSAME`]).
    pub feature_flags: u32,
    /// This node's role (rules 41 and the split-brain policies).
    pub local_role: Role,
    /// The peer's role from its `P_STATE`.
    pub peer_role: Role,
    /// Whether this node holds DRBD's `RESOLVE_CONFLICTS` flag (exactly one node of a
    /// connection does). Ties are broken against it: it becomes the SyncTarget.
    pub resolve_conflicts: bool,
}

impl CompareContext {
    /// Both nodes Secondary, no feature flags, not the conflict resolver.
    pub const fn new(protocol_version: u32) -> CompareContext {
        CompareContext {
            protocol_version,
            feature_flags: 0,
            local_role: Role::Secondary,
            peer_role: Role::Secondary,
            resolve_conflicts: false,
        }
    }

    /// The same connection seen from the peer: roles swapped, conflict resolver flipped.
    pub const fn mirrored(&self) -> CompareContext {
        CompareContext {
            protocol_version: self.protocol_version,
            feature_flags: self.feature_flags,
            local_role: self.peer_role,
            peer_role: self.local_role,
            resolve_conflicts: !self.resolve_conflicts,
        }
    }
}

/// How two UUID sets relate, from the local node's point of view (DRBD's integer result of
/// `drbd_uuid_compare`, typed; see the module docs for the mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Relation {
    /// Same data generation: no resync (0).
    Equal,
    /// This node has the newer data and becomes SyncSource (1: bitmap-based, 2: full).
    SyncSource {
        /// Every block must be resynced.
        full: bool,
    },
    /// The peer has the newer data; this node becomes SyncTarget (-1: bitmap-based, -2: full).
    SyncTarget {
        /// Every block must be resynced.
        full: bool,
    },
    /// Both nodes changed their data independently.
    SplitBrain {
        /// 100: both diverged from the same bitmap generation, so the after-split-brain
        /// policies may pick a survivor and resync from the bitmaps. -100: only the history
        /// links them (or both are Primary with unrotated UUIDs); only `always-asbp`
        /// (with a full resync) or `discard-my-data` resolve it.
        auto_recoverable: bool,
    },
    /// No common generation: the disks hold unrelated data (-1000).
    Unrelated,
    /// Resolving the situation needs a newer peer: at least `version`, and the feature flags
    /// `feature_flags` when non-zero.
    NeedsProtocol {
        /// Minimal protocol version.
        version: u32,
        /// Required feature flags (0: none).
        feature_flags: u32,
    },
}

impl Relation {
    /// DRBD's integer for this relation.
    ///
    /// # Panics
    ///
    /// For a `NeedsProtocol` that DRBD's coding cannot express: with feature flags, version
    /// and flags must fit a byte each; without, the version must stay below 64536 (larger
    /// values would collide with the feature-flag form). [`compare`] never produces those.
    pub fn to_drbd(self) -> i32 {
        match self {
            Relation::Equal => 0,
            Relation::SyncSource { full } => {
                if full {
                    2
                } else {
                    1
                }
            }
            Relation::SyncTarget { full } => {
                if full {
                    -2
                } else {
                    -1
                }
            }
            Relation::SplitBrain { auto_recoverable } => {
                if auto_recoverable {
                    100
                } else {
                    -100
                }
            }
            Relation::Unrelated => -1000,
            Relation::NeedsProtocol {
                version,
                feature_flags: 0,
            } => {
                assert!(version <= 0x10000 - 1000, "fits DRBD's coding");
                -(1000 + version as i32)
            }
            Relation::NeedsProtocol {
                version,
                feature_flags,
            } => {
                // Version in the low byte, feature flags in the next, 0x10000 as marker.
                assert!(
                    version <= 0xff && feature_flags <= 0xff,
                    "fits DRBD's coding"
                );
                let code = 0x10000 | version | (feature_flags << 8);
                -(code as i32)
            }
        }
    }

    /// The relation DRBD's integer stands for, if it is one `drbd_uuid_compare` can return.
    pub fn from_drbd(value: i32) -> Option<Relation> {
        Some(match value {
            0 => Relation::Equal,
            1 => Relation::SyncSource { full: false },
            2 => Relation::SyncSource { full: true },
            -1 => Relation::SyncTarget { full: false },
            -2 => Relation::SyncTarget { full: true },
            100 => Relation::SplitBrain {
                auto_recoverable: true,
            },
            -100 => Relation::SplitBrain {
                auto_recoverable: false,
            },
            -1000 => Relation::Unrelated,
            v if v < -0x10000 => {
                let code = v.unsigned_abs();
                // Only the marker bit may be set above the two bytes.
                if code & !0xffff != 0x10000 {
                    return None;
                }
                Relation::NeedsProtocol {
                    version: code & 0xff,
                    feature_flags: (code >> 8) & 0xff,
                }
            }
            v if v < -1000 => Relation::NeedsProtocol {
                version: v.unsigned_abs() - 1000,
                feature_flags: 0,
            },
            _ => return None,
        })
    }

    /// The same relation seen from the peer: source and target swap; everything else is the
    /// same on both sides.
    pub fn mirrored(self) -> Relation {
        match self {
            Relation::SyncSource { full } => Relation::SyncTarget { full },
            Relation::SyncTarget { full } => Relation::SyncSource { full },
            other => other,
        }
    }
}

/// A repair of UUIDs that the comparison found necessary: an earlier resync's last step got
/// lost on one side. DRBD applies these in place; here the caller does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Correction {
    /// Rule 34: this node was SyncSource and missed the end of the resync; its bitmap UUID
    /// moves into history. Persist `local`.
    LocalMissedResyncFinished {
        /// The corrected local UUIDs.
        local: GenerationUuids,
    },
    /// Rule 35: the peer was SyncSource and missed the end of the resync; the stored copy of
    /// its UUIDs gets the same repair.
    PeerMissedResyncFinished {
        /// The corrected copy of the peer's UUIDs.
        peer: GenerationUuids,
    },
    /// Rule 51: the peer started a resync as SyncSource but its `P_SYNC_UUID` never arrived;
    /// the stored copy of its UUIDs gets that start undone.
    PeerSyncUuidLost {
        /// The corrected copy of the peer's UUIDs.
        peer: GenerationUuids,
    },
    /// Rule 71: this node started a resync as SyncSource but its `P_SYNC_UUID` never arrived;
    /// that start is undone. Persist `local`.
    LocalSyncUuidLost {
        /// The corrected local UUIDs.
        local: GenerationUuids,
    },
}

impl Correction {
    /// The corrected local UUIDs, if the correction is local.
    pub fn local(&self) -> Option<GenerationUuids> {
        match *self {
            Correction::LocalMissedResyncFinished { local }
            | Correction::LocalSyncUuidLost { local } => Some(local),
            _ => None,
        }
    }

    /// The corrected copy of the peer's UUIDs, if the correction is on the peer's side.
    pub fn peer(&self) -> Option<GenerationUuids> {
        match *self {
            Correction::PeerMissedResyncFinished { peer }
            | Correction::PeerSyncUuidLost { peer } => Some(peer),
            _ => None,
        }
    }
}

/// The result of [`compare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Comparison {
    /// How the two sets relate.
    pub relation: Relation,
    /// The number of the rule that decided, as DRBD logs it. (DRBD reports the number of the
    /// last rule it started to evaluate: the protocol-91 requirement found while looking at
    /// rules 34-37 is reported as rule 30, and unrelated data as rule 100.)
    pub rule: u32,
    /// A UUID repair to apply (rules 34, 35, 51 and 71).
    pub correction: Option<Correction>,
}

impl Comparison {
    fn new(relation: Relation, rule: u32) -> Comparison {
        Comparison {
            relation,
            rule,
            correction: None,
        }
    }

    fn corrected(relation: Relation, rule: u32, correction: Correction) -> Comparison {
        Comparison {
            relation,
            rule,
            correction: Some(correction),
        }
    }

    /// DRBD's integer result.
    pub fn to_drbd(&self) -> i32 {
        self.relation.to_drbd()
    }
}

/// Compares the local UUIDs with the peer's (DRBD 8.4's `drbd_uuid_compare`).
///
/// The rules, evaluated in order, with `cur`/`bm`/`h` the masked UUIDs of this node and
/// `p_cur`/`p_bm`/`p_h` the peer's:
///
/// | rule | when | relation |
/// |---|---|---|
/// | 10 | both `cur` "just created" | Equal |
/// | 20 | `cur` "just created" or 0, `p_cur` not "just created" | SyncTarget, full |
/// | 30 | `cur` not "just created", `p_cur` "just created" or 0 | SyncSource, full |
/// | 34/36 | same `cur`; raw `p_bm` 0, raw `bm` not (I was SyncSource; 34: repaired) | SyncSource |
/// | 35/37 | same `cur`; raw `bm` 0, raw `p_bm` not (the mirror image) | SyncTarget |
/// | 40 | same `cur`, otherwise: by the crashed-primary flags (see below) | |
/// | 41 | as 40 with a flag set and a node Primary now (see below) | |
/// | 50 | `cur == p_bm` | SyncTarget |
/// | 51 | `cur == p_h[0]`, the peer's sync-UUID step visible (repaired) | SyncTarget |
/// | 60 | `cur` in `p_h` | SyncTarget, full |
/// | 70 | `bm == p_cur` | SyncSource |
/// | 71 | `h[0] == p_cur` and my last sync-UUID step is visible (repaired) | SyncSource |
/// | 80 | `p_cur` in `h` | SyncSource, full |
/// | 90 | `bm == p_bm != 0` | SplitBrain, auto-recoverable |
/// | 100 | any `h` in `p_h` | SplitBrain, not auto-recoverable |
/// | (100) | nothing matched | Unrelated |
///
/// Rule 40 (no node Primary): no crashed-primary flag gives Equal; only mine, SyncSource; only
/// the peer's, SyncTarget; both, the conflict resolver becomes SyncTarget. Rule 41 (a node is
/// Primary): the Primary becomes SyncSource, both Primary is an unresolvable split brain; it
/// needs [`FF_WSAME`] agreed, else "needs protocol 101 and `FF_WSAME`".
///
/// Rules 34-37, 51 and 71 need protocol 91. "Visible sync-UUID step" means, from protocol 96
/// on, `h[0] + UUID_NEW_BM_OFFSET == bm` on the side that started the resync, before 96
/// `h[0]` of the other side equal to `h[1]` of that side.
///
/// The rules are symmetric (the peer, computing with the mirrored context, gets the mirrored
/// relation) except in two situations DRBD does not expect to occur:
///
/// * both current UUIDs are 0 (masked): rule 20 makes both nodes SyncTarget;
/// * crossed lineage: a SyncTarget condition (rules 50, 51, 60) and a SyncSource condition
///   (rules 70, 71, 80) hold at the same time. All target rules are evaluated before all
///   source rules, so each node finds a target rule first and both want to be SyncTarget (or
///   both report the protocol-91 requirement).
pub fn compare(local: &UuidInfo, peer: &UuidInfo, ctx: &CompareContext) -> Comparison {
    let me = &local.uuids;
    let them = &peer.uuids;
    let cur = masked(me.current);
    let p_cur = masked(them.current);
    let needs_91 = Relation::NeedsProtocol {
        version: MIN_PROTOCOL_UUID_REPAIR,
        feature_flags: 0,
    };
    let repairs_allowed = ctx.protocol_version >= MIN_PROTOCOL_UUID_REPAIR;
    let offset_detection = ctx.protocol_version >= MIN_PROTOCOL_SYNC_UUID_OFFSET;

    if cur == UUID_JUST_CREATED && p_cur == UUID_JUST_CREATED {
        return Comparison::new(Relation::Equal, 10);
    }
    if (cur == UUID_JUST_CREATED || cur == 0) && p_cur != UUID_JUST_CREATED {
        return Comparison::new(Relation::SyncTarget { full: true }, 20);
    }
    if cur != UUID_JUST_CREATED && (p_cur == UUID_JUST_CREATED || p_cur == 0) {
        return Comparison::new(Relation::SyncSource { full: true }, 30);
    }

    if cur == p_cur {
        return compare_same_current(local, peer, ctx, repairs_allowed, needs_91);
    }

    // Rule 50: the peer's bitmap is based on my current generation: it wrote, I did not.
    if cur == masked(them.bitmap) {
        return Comparison::new(Relation::SyncTarget { full: false }, 50);
    }

    // Rule 51: my current generation is the peer's history[0] and the peer's newest bitmap
    // UUID looks like a sync UUID it generated for me: it started a resync as SyncSource but
    // its P_SYNC_UUID never reached me. Undo that start on my copy of its UUIDs.
    if cur == masked(them.history[0]) {
        let peer_started_sync = if offset_detection {
            masked(them.history[0]).wrapping_add(UUID_NEW_BM_OFFSET) == masked(them.bitmap)
        } else {
            masked(me.history[0]) == masked(them.history[1])
        };
        if peer_started_sync {
            if !repairs_allowed {
                return Comparison::new(needs_91, 51);
            }
            let mut fixed = *them;
            fixed.bitmap = them.history[0];
            fixed.history[0] = them.history[1];
            return Comparison::corrected(
                Relation::SyncTarget { full: false },
                51,
                Correction::PeerSyncUuidLost { peer: fixed },
            );
        }
    }

    // Rule 60: my current generation is in the peer's history, but too old for its bitmap.
    if them.history.iter().any(|&h| masked(h) == cur) {
        return Comparison::new(Relation::SyncTarget { full: true }, 60);
    }

    // Rule 70: my bitmap is based on the peer's current generation: I wrote, it did not.
    if masked(me.bitmap) == p_cur {
        return Comparison::new(Relation::SyncSource { full: false }, 70);
    }

    // Rule 71: the mirror image of rule 51, with the repair on my own UUIDs.
    if masked(me.history[0]) == p_cur {
        let i_started_sync = if offset_detection {
            masked(me.history[0]).wrapping_add(UUID_NEW_BM_OFFSET) == masked(me.bitmap)
        } else {
            masked(me.history[1]) == masked(them.history[0])
        };
        if i_started_sync {
            if !repairs_allowed {
                return Comparison::new(needs_91, 71);
            }
            let mut fixed = *me;
            fixed.bitmap = me.history[0];
            fixed.history[0] = me.history[1];
            return Comparison::corrected(
                Relation::SyncSource { full: false },
                71,
                Correction::LocalSyncUuidLost { local: fixed },
            );
        }
    }

    // Rule 80: the peer's current generation is in my history, too old for my bitmap.
    if me.history.iter().any(|&h| masked(h) == p_cur) {
        return Comparison::new(Relation::SyncSource { full: true }, 80);
    }

    // Rule 90: both wrote since the generation they last shared.
    let bm = masked(me.bitmap);
    if bm == masked(them.bitmap) && bm != 0 {
        return Comparison::new(
            Relation::SplitBrain {
                auto_recoverable: true,
            },
            90,
        );
    }

    // Rule 100: related only through history. DRBD compares history slots even when they are
    // 0, so two fresh-ish sets with empty history count as related.
    let related = me
        .history
        .iter()
        .any(|&h| them.history.iter().any(|&ph| masked(h) == masked(ph)));
    if related {
        return Comparison::new(
            Relation::SplitBrain {
                auto_recoverable: false,
            },
            100,
        );
    }
    Comparison::new(Relation::Unrelated, 100)
}

/// Rules 34 to 41: both current UUIDs are equal.
fn compare_same_current(
    local: &UuidInfo,
    peer: &UuidInfo,
    ctx: &CompareContext,
    repairs_allowed: bool,
    needs_91: Relation,
) -> Comparison {
    let me = &local.uuids;
    let them = &peer.uuids;

    // I still have a bitmap UUID, the peer has none: I was SyncSource of a resync that the
    // peer finished. (The zero tests are on raw values, as in DRBD.)
    if them.bitmap == 0 && me.bitmap != 0 {
        if !repairs_allowed {
            return Comparison::new(needs_91, 30);
        }
        let missed_finish = masked(me.bitmap) == masked(them.history[0])
            && masked(me.history[0]) == masked(them.history[1]);
        if missed_finish {
            let mut fixed = *me;
            fixed.clear_bitmap_uuid();
            return Comparison::corrected(
                Relation::SyncSource { full: false },
                34,
                Correction::LocalMissedResyncFinished { local: fixed },
            );
        }
        return Comparison::new(Relation::SyncSource { full: false }, 36);
    }

    if me.bitmap == 0 && them.bitmap != 0 {
        if !repairs_allowed {
            return Comparison::new(needs_91, 30);
        }
        let peer_missed_finish = masked(me.history[0]) == masked(them.bitmap)
            && masked(me.history[1]) == masked(them.history[0]);
        if peer_missed_finish {
            let mut fixed = *them;
            fixed.clear_bitmap_uuid();
            return Comparison::corrected(
                Relation::SyncTarget { full: false },
                35,
                Correction::PeerMissedResyncFinished { peer: fixed },
            );
        }
        return Comparison::new(Relation::SyncTarget { full: false }, 37);
    }

    // Same generation and no bitmap in play on either side (or the same bitmap UUID). If a
    // node crashed while Primary, the blocks in its activity log may differ: resync them from
    // the node that crashed as Primary.
    let local_crashed = local.flags.crashed_primary();
    let peer_crashed = peer.flags.crashed_primary();
    if !local_crashed && !peer_crashed {
        return Comparison::new(Relation::Equal, 40);
    }

    // A node that is Primary now holds the data in use, whatever the crash flags say. Older
    // peers did not know this rule; DRBD uses FF_WSAME to recognise new enough ones.
    let local_primary = ctx.local_role.is_primary();
    let peer_primary = ctx.peer_role.is_primary();
    if local_primary || peer_primary {
        if ctx.feature_flags & FF_WSAME == 0 {
            let needs = Relation::NeedsProtocol {
                version: PRO_VERSION_MAX,
                feature_flags: FF_WSAME,
            };
            return Comparison::new(needs, 41);
        }
        let relation = match (local_primary, peer_primary) {
            (true, true) => Relation::SplitBrain {
                auto_recoverable: false,
            },
            (true, false) => Relation::SyncSource { full: false },
            (false, _) => Relation::SyncTarget { full: false },
        };
        return Comparison::new(relation, 41);
    }

    let relation = match (local_crashed, peer_crashed) {
        (true, false) => Relation::SyncSource { full: false },
        (false, true) => Relation::SyncTarget { full: false },
        // Both crashed as Primary: an arbitrary but agreed choice.
        _ => tie_break(ctx.resolve_conflicts),
    };
    Comparison::new(relation, 40)
}

/// DRBD's tie-break: the node holding `RESOLVE_CONFLICTS` becomes SyncTarget.
fn tie_break(resolve_conflicts: bool) -> Relation {
    if resolve_conflicts {
        Relation::SyncTarget { full: false }
    } else {
        Relation::SyncSource { full: false }
    }
}

// ------------------------------------------------------------------------------------------
// Policies
// ------------------------------------------------------------------------------------------

/// An after-split-brain policy (`after-sb-0pri`, `after-sb-1pri`, `after-sb-2pri`), with the
/// wire numbers of `P_PROTOCOL` (the same as `drbd-net`'s `handshake::asb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AfterSbPolicy {
    /// Do not resolve automatically (0).
    Disconnect = 0,
    /// Discard the node that was not Primary when the split happened (1).
    DiscardYoungerPrimary = 1,
    /// Discard the node that was Primary when the split happened (2).
    DiscardOlderPrimary = 2,
    /// Discard the node that wrote nothing (3).
    DiscardZeroChanges = 3,
    /// Discard the node that wrote less (4).
    DiscardLeastChanges = 4,
    /// Discard this node's data (5).
    DiscardLocal = 5,
    /// Discard the peer's data (6).
    DiscardRemote = 6,
    /// 1pri: follow after-sb-0pri only if that discards the Secondary (7).
    Consensus = 7,
    /// 1pri: discard the Secondary (8).
    DiscardSecondary = 8,
    /// 1pri/2pri: follow after-sb-0pri; a losing Primary is demoted, or the
    /// `pri-lost-after-sb` handler runs (9).
    CallPriLostAfterSb = 9,
    /// 1pri/2pri: follow after-sb-0pri even if that discards a Primary's data (10).
    ViolentlyAs0p = 10,
}

impl AfterSbPolicy {
    const ALL: [AfterSbPolicy; 11] = [
        AfterSbPolicy::Disconnect,
        AfterSbPolicy::DiscardYoungerPrimary,
        AfterSbPolicy::DiscardOlderPrimary,
        AfterSbPolicy::DiscardZeroChanges,
        AfterSbPolicy::DiscardLeastChanges,
        AfterSbPolicy::DiscardLocal,
        AfterSbPolicy::DiscardRemote,
        AfterSbPolicy::Consensus,
        AfterSbPolicy::DiscardSecondary,
        AfterSbPolicy::CallPriLostAfterSb,
        AfterSbPolicy::ViolentlyAs0p,
    ];

    /// Every policy, by wire number.
    pub fn all() -> [AfterSbPolicy; 11] {
        AfterSbPolicy::ALL
    }

    /// The policy with this wire number.
    pub fn from_wire(value: u32) -> Option<AfterSbPolicy> {
        usize::try_from(value)
            .ok()
            .and_then(|i| AfterSbPolicy::ALL.get(i).copied())
    }

    /// The wire number.
    pub fn wire(self) -> u32 {
        self as u32
    }

    /// The drbd.conf spelling.
    pub fn name(self) -> &'static str {
        match self {
            AfterSbPolicy::Disconnect => "disconnect",
            AfterSbPolicy::DiscardYoungerPrimary => "discard-younger-primary",
            AfterSbPolicy::DiscardOlderPrimary => "discard-older-primary",
            AfterSbPolicy::DiscardZeroChanges => "discard-zero-changes",
            AfterSbPolicy::DiscardLeastChanges => "discard-least-changes",
            AfterSbPolicy::DiscardLocal => "discard-local",
            AfterSbPolicy::DiscardRemote => "discard-remote",
            AfterSbPolicy::Consensus => "consensus",
            AfterSbPolicy::DiscardSecondary => "discard-secondary",
            AfterSbPolicy::CallPriLostAfterSb => "call-pri-lost-after-sb",
            AfterSbPolicy::ViolentlyAs0p => "violently-as0p",
        }
    }

    /// The policy with this drbd.conf spelling.
    pub fn from_name(name: &str) -> Option<AfterSbPolicy> {
        AfterSbPolicy::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The peer's view of this node's policy: what is local here is remote there.
    pub fn mirrored(self) -> AfterSbPolicy {
        match self {
            AfterSbPolicy::DiscardLocal => AfterSbPolicy::DiscardRemote,
            AfterSbPolicy::DiscardRemote => AfterSbPolicy::DiscardLocal,
            other => other,
        }
    }

    /// Whether the policy is meaningful with this many Primaries (0, 1 or 2); DRBD treats any
    /// other as a configuration error and leaves the split brain unresolved.
    pub fn valid_for(self, primaries: u8) -> bool {
        use AfterSbPolicy::*;
        match primaries {
            0 => matches!(
                self,
                Disconnect
                    | DiscardYoungerPrimary
                    | DiscardOlderPrimary
                    | DiscardZeroChanges
                    | DiscardLeastChanges
                    | DiscardLocal
                    | DiscardRemote
            ),
            1 => matches!(
                self,
                Disconnect | Consensus | ViolentlyAs0p | DiscardSecondary | CallPriLostAfterSb
            ),
            2 => matches!(self, Disconnect | ViolentlyAs0p | CallPriLostAfterSb),
            _ => false,
        }
    }
}

impl fmt::Display for AfterSbPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `rr-conflict` policy: what a Primary does when the handshake makes it SyncTarget. Wire
/// numbers as for [`AfterSbPolicy`] (DRBD shares the enumeration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RrConflict {
    /// Refuse the connection (0).
    Disconnect = 0,
    /// Run the `pri-lost` handler, then refuse the connection (9).
    CallPriLost = 9,
    /// Become SyncTarget anyway, changing data under the Primary's users (10).
    Violently = 10,
}

impl RrConflict {
    /// The policy with this wire number.
    pub fn from_wire(value: u32) -> Option<RrConflict> {
        match value {
            0 => Some(RrConflict::Disconnect),
            9 => Some(RrConflict::CallPriLost),
            10 => Some(RrConflict::Violently),
            _ => None,
        }
    }

    /// The wire number.
    pub fn wire(self) -> u32 {
        self as u32
    }

    /// The drbd.conf spelling.
    pub fn name(self) -> &'static str {
        match self {
            RrConflict::Disconnect => "disconnect",
            RrConflict::CallPriLost => "call-pri-lost",
            RrConflict::Violently => "violently",
        }
    }

    /// The policy with this drbd.conf spelling.
    pub fn from_name(name: &str) -> Option<RrConflict> {
        [
            RrConflict::Disconnect,
            RrConflict::CallPriLost,
            RrConflict::Violently,
        ]
        .into_iter()
        .find(|p| p.name() == name)
    }
}

/// The connection's split-brain configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SplitBrainPolicy {
    /// `after-sb-0pri`.
    pub after_sb_0pri: AfterSbPolicy,
    /// `after-sb-1pri`.
    pub after_sb_1pri: AfterSbPolicy,
    /// `after-sb-2pri`.
    pub after_sb_2pri: AfterSbPolicy,
    /// `rr-conflict`.
    pub rr_conflict: RrConflict,
    /// `always-asbp`: apply the policies also when the UUIDs relate only through history
    /// (rule 100); a resolution then forces a full resync.
    pub always_asbp: bool,
}

impl Default for SplitBrainPolicy {
    /// DRBD's defaults: disconnect everywhere, no `always-asbp`.
    fn default() -> SplitBrainPolicy {
        SplitBrainPolicy {
            after_sb_0pri: AfterSbPolicy::Disconnect,
            after_sb_1pri: AfterSbPolicy::Disconnect,
            after_sb_2pri: AfterSbPolicy::Disconnect,
            rr_conflict: RrConflict::Disconnect,
            always_asbp: false,
        }
    }
}

impl SplitBrainPolicy {
    /// Checks each policy against the number of Primaries it is for.
    pub fn validate(&self) -> Result<(), UuidError> {
        let levels = [
            (0, self.after_sb_0pri),
            (1, self.after_sb_1pri),
            (2, self.after_sb_2pri),
        ];
        for (primaries, policy) in levels {
            if !policy.valid_for(primaries) {
                return Err(UuidError::InvalidPolicy { primaries, policy });
            }
        }
        Ok(())
    }

    /// The configuration the peer holds when this node holds `self`: discard-local and
    /// discard-remote swapped (drbdadm writes `discard-node-NAME` that way on the two nodes,
    /// and DRBD's `P_PROTOCOL` check compares the peer's policies after this swap).
    pub fn mirrored(&self) -> SplitBrainPolicy {
        SplitBrainPolicy {
            after_sb_0pri: self.after_sb_0pri.mirrored(),
            after_sb_1pri: self.after_sb_1pri.mirrored(),
            after_sb_2pri: self.after_sb_2pri.mirrored(),
            ..*self
        }
    }
}

// ------------------------------------------------------------------------------------------
// The sync handshake
// ------------------------------------------------------------------------------------------

/// Everything the sync handshake looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeInput {
    /// This node's `P_UUIDS` content (its UUIDs, bitmap weight and flags).
    pub local: UuidInfo,
    /// The peer's `P_UUIDS`.
    pub peer: UuidInfo,
    /// Protocol version, features, roles, conflict resolver.
    pub context: CompareContext,
    /// This node's disk state now.
    pub local_disk: DiskState,
    /// When `local_disk` is Negotiating (attach while connected): the state the attach will
    /// settle on (DRBD's `new_state_tmp.disk`). Ignored otherwise.
    pub pending_disk: Option<DiskState>,
    /// The peer's disk state from its `P_STATE`.
    pub peer_disk: DiskState,
    /// The split-brain configuration.
    pub policy: SplitBrainPolicy,
    /// Whether this node could become Secondary right now (device not in use). Consulted only
    /// by `call-pri-lost-after-sb`, which demotes a losing Primary.
    pub can_demote: bool,
    /// A dry-run connect (`--dry-run` or the tentative option): decide, report, disconnect.
    pub dry_run: bool,
}

/// A resync plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resync {
    /// No resync: go Connected.
    None,
    /// Become SyncSource (via WFBitMapS).
    AsSource {
        /// Set every bitmap bit first.
        full: bool,
    },
    /// Become SyncTarget (via WFBitMapT): the local data is overwritten where out of sync.
    AsTarget {
        /// Set every bitmap bit first.
        full: bool,
    },
}

/// Why the handshake gives up the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    /// The UUIDs share no generation.
    UnrelatedData,
    /// The situation can only be resolved by a newer protocol.
    NeedsProtocol {
        /// Minimal protocol version.
        version: u32,
        /// Required feature flags (0: none).
        feature_flags: u32,
    },
    /// Split brain that neither the policies nor `discard-my-data` resolved.
    SplitBrain,
    /// This node should become SyncSource but its disk is Inconsistent or worse.
    InconsistentSyncSource,
    /// This node is Primary with usable data and should become SyncTarget (`rr-conflict`).
    RrConflict,
}

/// What the handshake says to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeOutcome {
    /// Continue with this resync plan.
    Proceed(Resync),
    /// Dry run: this would be the plan; the connection is dropped.
    DryRun(Resync),
    /// Drop the connection.
    Disconnect(DisconnectReason),
}

/// A user-space handler DRBD runs during the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Handler {
    /// A split brain was detected (before any resolution).
    InitialSplitBrain,
    /// `call-pri-lost-after-sb` discards this Primary's data and it could not be demoted.
    PriLostAfterSb,
    /// The split brain stays unresolved; the connection is dropped.
    SplitBrain,
    /// `rr-conflict call-pri-lost`: this Primary would have become SyncTarget.
    PriLost,
}

impl Handler {
    /// The handler's drbd.conf name.
    pub fn name(self) -> &'static str {
        match self {
            Handler::InitialSplitBrain => "initial-split-brain",
            Handler::PriLostAfterSb => "pri-lost-after-sb",
            Handler::SplitBrain => "split-brain",
            Handler::PriLost => "pri-lost",
        }
    }
}

/// A node, relative to the one deciding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// This node.
    Local,
    /// The peer.
    Peer,
}

impl Side {
    /// The other node.
    pub fn other(self) -> Side {
        match self {
            Side::Local => Side::Peer,
            Side::Peer => Side::Local,
        }
    }
}

/// How a detected split brain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SplitBrainResolution {
    /// An after-split-brain policy picked the survivor.
    Automatic {
        /// Primaries at handshake time (selected after-sb-0pri/1pri/2pri).
        primaries: u8,
        /// The node whose data survives (the SyncSource).
        survivor: Side,
        /// The resync is a full one (`always-asbp` on UUIDs related only through history).
        full_sync: bool,
    },
    /// `discard-my-data` on exactly one node decided.
    Manual {
        /// The node whose data survives.
        survivor: Side,
    },
    /// Nothing decided: the connection is dropped.
    Unresolved,
}

impl SplitBrainResolution {
    /// The node whose changes are discarded, if any.
    pub fn loser(&self) -> Option<Side> {
        match *self {
            SplitBrainResolution::Automatic { survivor, .. }
            | SplitBrainResolution::Manual { survivor } => Some(survivor.other()),
            SplitBrainResolution::Unresolved => None,
        }
    }
}

/// The result of [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeDecision {
    /// The UUID comparison (with any correction to apply).
    pub comparison: Comparison,
    /// What to do.
    pub outcome: HandshakeOutcome,
    /// Handlers to run, in order.
    pub handlers: Vec<Handler>,
    /// `call-pri-lost-after-sb` decided that this Primary loses and it can be demoted: make it
    /// Secondary (the decision already assumes it is).
    pub demote: bool,
    /// Set when a split brain was detected (relation ±100 after the disk-state override).
    pub split_brain: Option<SplitBrainResolution>,
    /// Exactly one disk was Inconsistent, which overrode the UUIDs' direction.
    pub by_disk_states: bool,
    /// `rr-conflict violently`: this Primary becomes SyncTarget anyway.
    pub rr_conflict_overridden: bool,
    /// A configured after-sb policy is not valid for the number of Primaries; DRBD logs a
    /// configuration error and treats it as unresolved.
    pub policy_error: bool,
    /// DRBD's integer after all adjustments (its `hg`), coded like [`Relation::to_drbd`].
    pub final_value: i32,
}

impl HandshakeDecision {
    /// The resync plan, if the connection proceeds.
    pub fn resync(&self) -> Option<Resync> {
        match self.outcome {
            HandshakeOutcome::Proceed(r) => Some(r),
            _ => None,
        }
    }
}

/// Facts the after-split-brain policies use.
struct SbFacts {
    /// Bit 0 of my bitmap UUID: was I Primary when the generations split?
    self_was_primary: bool,
    /// Same for the peer.
    peer_was_primary: bool,
    /// My bitmap weight.
    ch_self: u64,
    /// The peer's bitmap weight.
    ch_peer: u64,
    /// I hold RESOLVE_CONFLICTS.
    resolve_conflicts: bool,
}

/// What a policy function decided.
#[derive(Debug, Default)]
struct SbVerdict {
    /// The survivor, or `None` if unresolved.
    survivor: Option<Side>,
    /// This Primary loses and gets demoted.
    demote: bool,
    /// This Primary loses and cannot be demoted: run `pri-lost-after-sb`.
    pri_lost_handler: bool,
    /// The policy is not valid here.
    config_error: bool,
}

impl SbVerdict {
    fn survivor(survivor: Side) -> SbVerdict {
        SbVerdict {
            survivor: Some(survivor),
            ..SbVerdict::default()
        }
    }

    fn unresolved() -> SbVerdict {
        SbVerdict::default()
    }

    fn config_error() -> SbVerdict {
        SbVerdict {
            config_error: true,
            ..SbVerdict::default()
        }
    }
}

/// The agreed tie-break of the policies: the RESOLVE_CONFLICTS node is discarded.
fn sb_tie_break(resolve_conflicts: bool) -> Side {
    if resolve_conflicts {
        Side::Peer
    } else {
        Side::Local
    }
}

/// after-sb-0pri (DRBD's `drbd_asb_recover_0p`). The "younger/older primary" policies fall
/// through to "zero changes" and then to "least changes" when they cannot decide.
fn recover_0p(policy: AfterSbPolicy, f: &SbFacts) -> SbVerdict {
    use AfterSbPolicy::*;
    match policy {
        Consensus | DiscardSecondary | CallPriLostAfterSb | ViolentlyAs0p => {
            return SbVerdict::config_error()
        }
        Disconnect => return SbVerdict::unresolved(),
        DiscardLocal => return SbVerdict::survivor(Side::Peer),
        DiscardRemote => return SbVerdict::survivor(Side::Local),
        DiscardYoungerPrimary | DiscardOlderPrimary | DiscardZeroChanges | DiscardLeastChanges => {}
    }

    // Exactly one node was Primary at the split: the younger/older policies decide. (DRBD
    // lets discard-younger-primary fall into the discard-older-primary case too, but that can
    // only match the same two situations, which the first case already took.)
    let primary_at_split = match (f.self_was_primary, f.peer_was_primary) {
        (true, false) => Some(Side::Local),
        (false, true) => Some(Side::Peer),
        _ => None,
    };
    if let Some(was_primary) = primary_at_split {
        match policy {
            DiscardYoungerPrimary => return SbVerdict::survivor(was_primary),
            DiscardOlderPrimary => return SbVerdict::survivor(was_primary.other()),
            _ => {}
        }
    }

    if policy != DiscardLeastChanges {
        if f.ch_self == 0 && f.ch_peer == 0 {
            return SbVerdict::survivor(sb_tie_break(f.resolve_conflicts));
        }
        if f.ch_peer == 0 {
            return SbVerdict::survivor(Side::Local);
        }
        if f.ch_self == 0 {
            return SbVerdict::survivor(Side::Peer);
        }
        if policy == DiscardZeroChanges {
            return SbVerdict::unresolved();
        }
    }

    let survivor = match f.ch_self.cmp(&f.ch_peer) {
        std::cmp::Ordering::Less => Side::Peer,
        std::cmp::Ordering::Greater => Side::Local,
        std::cmp::Ordering::Equal => sb_tie_break(f.resolve_conflicts),
    };
    SbVerdict::survivor(survivor)
}

/// The `call-pri-lost-after-sb` step: a Primary whose data the 0pri policy discards gives up
/// its role if it can, else the `pri-lost-after-sb` handler runs and the split brain stays
/// unresolved.
fn demote_or_handler(can_demote: bool) -> SbVerdict {
    if can_demote {
        SbVerdict {
            survivor: Some(Side::Peer),
            demote: true,
            ..SbVerdict::default()
        }
    } else {
        SbVerdict {
            pri_lost_handler: true,
            ..SbVerdict::default()
        }
    }
}

/// after-sb-1pri (DRBD's `drbd_asb_recover_1p`).
fn recover_1p(policy: &SplitBrainPolicy, f: &SbFacts, role: Role, can_demote: bool) -> SbVerdict {
    use AfterSbPolicy::*;
    let primary = role.is_primary();
    match policy.after_sb_1pri {
        DiscardYoungerPrimary
        | DiscardOlderPrimary
        | DiscardLeastChanges
        | DiscardLocal
        | DiscardRemote
        | DiscardZeroChanges => SbVerdict::config_error(),
        Disconnect => SbVerdict::unresolved(),
        Consensus => {
            // Accept the 0pri verdict only if it discards the Secondary.
            let v = recover_0p(policy.after_sb_0pri, f);
            match v.survivor {
                Some(Side::Peer) if role == Role::Secondary => v,
                Some(Side::Local) if primary => v,
                _ => SbVerdict {
                    config_error: v.config_error,
                    ..SbVerdict::unresolved()
                },
            }
        }
        ViolentlyAs0p => recover_0p(policy.after_sb_0pri, f),
        DiscardSecondary => SbVerdict::survivor(if primary { Side::Local } else { Side::Peer }),
        CallPriLostAfterSb => {
            let v = recover_0p(policy.after_sb_0pri, f);
            if v.survivor == Some(Side::Peer) && primary {
                demote_or_handler(can_demote)
            } else {
                v
            }
        }
    }
}

/// after-sb-2pri (DRBD's `drbd_asb_recover_2p`).
fn recover_2p(policy: &SplitBrainPolicy, f: &SbFacts, can_demote: bool) -> SbVerdict {
    use AfterSbPolicy::*;
    match policy.after_sb_2pri {
        DiscardYoungerPrimary
        | DiscardOlderPrimary
        | DiscardLeastChanges
        | DiscardLocal
        | DiscardRemote
        | Consensus
        | DiscardSecondary
        | DiscardZeroChanges => SbVerdict::config_error(),
        ViolentlyAs0p => recover_0p(policy.after_sb_0pri, f),
        Disconnect => SbVerdict::unresolved(),
        CallPriLostAfterSb => {
            // Both are Primary: whoever loses demotes (or runs the handler).
            let v = recover_0p(policy.after_sb_0pri, f);
            if v.survivor == Some(Side::Peer) {
                demote_or_handler(can_demote)
            } else {
                v
            }
        }
    }
}

/// DRBD's integer for "this side survives" (+1), "the peer survives" (-1), unresolved (-100).
fn survivor_value(survivor: Option<Side>) -> i32 {
    match survivor {
        Some(Side::Local) => 1,
        Some(Side::Peer) => -1,
        None => -100,
    }
}

/// The sync handshake (DRBD 8.4's `drbd_sync_handshake`): compares the UUIDs, then
///
/// 1. refuses unrelated data and "needs protocol" results;
/// 2. lets the disk states override the direction when exactly one disk is Inconsistent (the
///    other becomes source; full if the relation was full or an unresolvable split brain);
/// 3. on a split brain (±100) calls `initial-split-brain`, then for +100 (or -100 with
///    `always-asbp`) applies after-sb-0pri/1pri/2pri according to the number of Primaries;
/// 4. lets `discard-my-data` on exactly one node resolve what is still unresolved, else calls
///    `split-brain` and disconnects;
/// 5. refuses to become SyncSource with an Inconsistent disk, and applies `rr-conflict` when a
///    Primary with Consistent or better data would become SyncTarget.
pub fn decide(input: &HandshakeInput) -> HandshakeDecision {
    let comparison = compare(&input.local, &input.peer, &input.context);
    let mut decision = HandshakeDecision {
        comparison,
        outcome: HandshakeOutcome::Proceed(Resync::None),
        handlers: Vec::new(),
        demote: false,
        split_brain: None,
        by_disk_states: false,
        rr_conflict_overridden: false,
        policy_error: false,
        final_value: comparison.to_drbd(),
    };

    match comparison.relation {
        Relation::Unrelated => {
            decision.outcome = HandshakeOutcome::Disconnect(DisconnectReason::UnrelatedData);
            return decision;
        }
        Relation::NeedsProtocol {
            version,
            feature_flags,
        } => {
            decision.outcome = HandshakeOutcome::Disconnect(DisconnectReason::NeedsProtocol {
                version,
                feature_flags,
            });
            return decision;
        }
        _ => {}
    }

    // Only the ±1, ±2, ±100 and 0 codes remain; work on DRBD's integer from here on, its
    // arithmetic (doubling for full syncs) is what the steps below are defined on.
    let mut hg = comparison.to_drbd();
    let my_disk = match (input.local_disk, input.pending_disk) {
        (DiskState::Negotiating, Some(pending)) => pending,
        (disk, _) => disk,
    };
    let peer_disk = input.peer_disk;
    let mut role = input.context.local_role;
    debug_assert!(role != Role::Unknown, "the local role is always known");

    let one_inconsistent = (my_disk == DiskState::Inconsistent
        && peer_disk > DiskState::Inconsistent)
        || (peer_disk == DiskState::Inconsistent && my_disk > DiskState::Inconsistent);
    if one_inconsistent {
        let full = hg == -100 || hg.abs() == 2;
        hg = if my_disk > DiskState::Inconsistent {
            1
        } else {
            -1
        };
        if full {
            hg *= 2;
        }
        decision.by_disk_states = true;
    }

    if hg.abs() == 100 {
        decision.handlers.push(Handler::InitialSplitBrain);
        decision.split_brain = Some(SplitBrainResolution::Unresolved);
    }

    let policy = &input.policy;
    if hg == 100 || (hg == -100 && policy.always_asbp) {
        let primaries =
            u8::from(role.is_primary()) + u8::from(input.context.peer_role.is_primary());
        let forced = hg == -100;
        let facts = SbFacts {
            self_was_primary: input.local.uuids.was_primary_at_split(),
            peer_was_primary: input.peer.uuids.was_primary_at_split(),
            ch_self: input.local.dirty_bits,
            ch_peer: input.peer.dirty_bits,
            resolve_conflicts: input.context.resolve_conflicts,
        };
        let verdict = match primaries {
            0 => recover_0p(policy.after_sb_0pri, &facts),
            1 => recover_1p(policy, &facts, role, input.can_demote),
            _ => recover_2p(policy, &facts, input.can_demote),
        };
        decision.policy_error = verdict.config_error;
        if verdict.pri_lost_handler {
            decision.handlers.push(Handler::PriLostAfterSb);
        }
        if verdict.demote {
            decision.demote = true;
            role = Role::Secondary;
        }
        hg = survivor_value(verdict.survivor);
        if let Some(survivor) = verdict.survivor {
            if forced {
                hg *= 2;
            }
            decision.split_brain = Some(SplitBrainResolution::Automatic {
                primaries,
                survivor,
                full_sync: forced,
            });
        }
    }

    if hg == -100 {
        let mine = input.local.flags.discard_my_data();
        let theirs = input.peer.flags.discard_my_data();
        // Note: a manual resolution is a bitmap-based resync even for a -100 relation.
        let survivor = match (mine, theirs) {
            (true, false) => Some(Side::Peer),
            (false, true) => Some(Side::Local),
            _ => None,
        };
        if let Some(survivor) = survivor {
            hg = survivor_value(Some(survivor));
            decision.split_brain = Some(SplitBrainResolution::Manual { survivor });
        }
    }

    decision.final_value = hg;
    if hg == -100 {
        decision.handlers.push(Handler::SplitBrain);
        decision.split_brain = Some(SplitBrainResolution::Unresolved);
        decision.outcome = HandshakeOutcome::Disconnect(DisconnectReason::SplitBrain);
        return decision;
    }
    assert!(hg.abs() <= 2, "only resync codes remain, got {hg}");

    if hg > 0 && my_disk <= DiskState::Inconsistent {
        decision.outcome = HandshakeOutcome::Disconnect(DisconnectReason::InconsistentSyncSource);
        return decision;
    }

    // rr-conflict looks at the real disk state, not the pending one (as DRBD does on purpose),
    // and at the role after a possible demotion above.
    if hg < 0 && role.is_primary() && input.local_disk >= DiskState::Consistent {
        match policy.rr_conflict {
            RrConflict::CallPriLost => {
                decision.handlers.push(Handler::PriLost);
                decision.outcome = HandshakeOutcome::Disconnect(DisconnectReason::RrConflict);
                return decision;
            }
            RrConflict::Disconnect => {
                decision.outcome = HandshakeOutcome::Disconnect(DisconnectReason::RrConflict);
                return decision;
            }
            RrConflict::Violently => decision.rr_conflict_overridden = true,
        }
    }

    let resync = match hg {
        0 => Resync::None,
        h if h > 0 => Resync::AsSource { full: h >= 2 },
        h => Resync::AsTarget { full: h <= -2 },
    };
    decision.outcome = if input.dry_run {
        HandshakeOutcome::DryRun(resync)
    } else {
        HandshakeOutcome::Proceed(resync)
    };
    decision
}

// ------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------

/// Errors of the UUID operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UuidError {
    /// `new-current-uuid` needs a StandAlone node, unless it skips the initial sync of a fresh
    /// Connected pair (DRBD's `ERR_CONNECTED`).
    #[error("new-current-uuid needs StandAlone (or a fresh Connected pair and --clear-bitmap)")]
    Connected,
    /// An after-sb policy does not fit the number of Primaries it is configured for.
    #[error("{policy} is not a valid after-sb-{primaries}pri policy")]
    InvalidPolicy {
        /// 0, 1 or 2.
        primaries: u8,
        /// The offending policy.
        policy: AfterSbPolicy,
    },
    /// Text that is not `CURRENT:BITMAP:HISTORY0:HISTORY1` in hex.
    #[error("not a UUID set (want four colon-separated hex numbers): {text:?}")]
    Parse {
        /// The text.
        text: String,
    },
}

#[cfg(test)]
mod tests;
