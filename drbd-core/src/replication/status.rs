//! What an operator sees of one replicated volume, and the administrative requests it accepts.
//! The daemon fills [`VolumeStatus`] from the replication machine; `drbdadm` prints it in
//! drbd-utils' formats.

use crate::state::{ConnState, DiskState, Role};

/// A snapshot of one volume's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStatus {
    /// Volume number.
    pub volume: u16,
    /// Minor number (`/dev/drbdN`).
    pub minor: u32,
    pub role: Role,
    /// `Unknown` while not connected.
    pub peer_role: Role,
    pub conn: ConnState,
    pub disk: DiskState,
    /// `DUnknown` while not connected.
    pub peer_disk: DiskState,
    /// Device size in sectors.
    pub size_sectors: u64,
    /// Out-of-sync data according to the local bitmap, in KiB.
    pub out_of_sync_kib: u64,
    /// The resync in progress, if any.
    pub resync: Option<ResyncProgress>,
    /// The agreed replication protocol: 'A', 'B' or 'C'.
    pub protocol: char,
    /// The generation UUIDs `[current, bitmap, history0, history1]`.
    pub uuids: [u64; 4],
    /// Writes waiting for the peer or the local disk.
    pub pending_writes: u32,
    /// Counters in KiB: written to the local disk, read from it, sent, received.
    pub written_kib: u64,
    pub read_kib: u64,
    pub sent_kib: u64,
    pub received_kib: u64,
    /// Why the connection is StandAlone, if it is (protocol error, split brain, ...).
    pub standalone_reason: Option<String>,
    /// Why application I/O is suspended, if it is.
    pub suspended: Suspended,
}

/// Why application I/O is suspended (8.4's `susp` and `susp_fen` state bits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Suspended {
    /// `suspend-io`, until `resume-io`.
    pub user: bool,
    /// `fencing resource-and-stonith` lost the peer: until fence-peer answers decisively,
    /// the peer is back, or `resume-io`.
    pub fencing: bool,
}

impl Suspended {
    /// drbdsetup's `suspended:` value (`user`, `fencing`, `user,fencing`), None when I/O runs.
    pub fn names(&self) -> Option<String> {
        let names: Vec<&str> = [(self.user, "user"), (self.fencing, "fencing")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
        (!names.is_empty()).then(|| names.join(","))
    }
}

/// Progress of a resync, as `drbdadm status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncProgress {
    /// 4 KiB blocks that were out of sync when the resync started.
    pub total_blocks: u64,
    /// Blocks still out of sync.
    pub remaining_blocks: u64,
    /// Recent rate in KiB/s.
    pub rate_kib_s: u64,
    /// Estimated seconds left (0 if unknown).
    pub eta_s: u64,
    /// Paused by this node's `pause-sync`.
    pub paused_user: bool,
    /// Paused by the peer's `pause-sync`.
    pub paused_peer: bool,
}

impl ResyncProgress {
    /// Percentage done, with one decimal, as DRBD prints it (`done:42.3`).
    pub fn percent_done(&self) -> f64 {
        if self.total_blocks == 0 {
            return 100.0;
        }
        let done = self.total_blocks.saturating_sub(self.remaining_blocks);
        (done as f64 * 1000.0 / self.total_blocks as f64).floor() / 10.0
    }
}

/// Why an administrative request was refused: the 8.4 state-change result code (negative,
/// `enum drbd_state_rv`) with its text, which `drbdadm` prints as
/// `State change failed: (CODE) TEXT` and turns into `drbdsetup`'s exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateRefusal {
    /// -1: a second Primary without `allow-two-primaries`.
    TwoPrimaries,
    /// -2: promotion (or a resync source) without UpToDate data.
    NoUpToDateDisk,
    /// -4: resync requested without a local disk.
    NoLocalDisk,
    /// -5: resync requested without the peer's disk.
    NoRemoteDisk,
    /// -6: `outdate` while connected.
    ConnectedOutdates,
    /// -7 (`SS_PRIMARY_NOP`): promotion while the peer might hold newer data (fencing).
    PeerNotOutdated,
    /// -8: a resync or verify is already running.
    ResyncRunning,
    /// -10: the peer refused the change.
    RefusedByPeer,
    /// -12: demotion while the device is in use.
    DeviceInUse,
    /// -14: online verify without a `verify-alg`.
    NoVerifyAlg,
    /// -15: the request needs a connection.
    NeedConnection,
    /// -16: the disk is worse than Outdated.
    LowerThanOutdated,
    /// -19: another state change is in progress.
    ConcurrentChange,
}

impl StateRefusal {
    /// The `drbd_state_rv` number.
    pub fn code(self) -> i32 {
        match self {
            StateRefusal::TwoPrimaries => -1,
            StateRefusal::NoUpToDateDisk => -2,
            StateRefusal::NoLocalDisk => -4,
            StateRefusal::NoRemoteDisk => -5,
            StateRefusal::ConnectedOutdates => -6,
            StateRefusal::PeerNotOutdated => -7,
            StateRefusal::ResyncRunning => -8,
            StateRefusal::RefusedByPeer => -10,
            StateRefusal::DeviceInUse => -12,
            StateRefusal::NoVerifyAlg => -14,
            StateRefusal::NeedConnection => -15,
            StateRefusal::LowerThanOutdated => -16,
            StateRefusal::ConcurrentChange => -19,
        }
    }

    /// The refusal of a `drbd_state_rv` number, if it is one of these.
    pub fn from_code(code: i32) -> Option<StateRefusal> {
        [
            StateRefusal::TwoPrimaries,
            StateRefusal::NoUpToDateDisk,
            StateRefusal::NoLocalDisk,
            StateRefusal::NoRemoteDisk,
            StateRefusal::ConnectedOutdates,
            StateRefusal::PeerNotOutdated,
            StateRefusal::ResyncRunning,
            StateRefusal::RefusedByPeer,
            StateRefusal::DeviceInUse,
            StateRefusal::NoVerifyAlg,
            StateRefusal::NeedConnection,
            StateRefusal::LowerThanOutdated,
            StateRefusal::ConcurrentChange,
        ]
        .into_iter()
        .find(|r| r.code() == code)
    }

    /// DRBD's text for the code.
    pub fn text(self) -> &'static str {
        match self {
            StateRefusal::TwoPrimaries => "Multiple primaries not allowed by config",
            StateRefusal::NoUpToDateDisk => "Need access to UpToDate data",
            StateRefusal::NoLocalDisk => "Can not resync without local disk",
            StateRefusal::NoRemoteDisk => "Can not resync without remote disk",
            StateRefusal::PeerNotOutdated => "Refusing to be Primary while peer is not outdated",
            StateRefusal::ResyncRunning => "Can not start OV/resync since it is already active",
            StateRefusal::ConnectedOutdates => "Refusing to be Outdated while Connected",
            StateRefusal::RefusedByPeer => "State change was refused by peer node",
            StateRefusal::DeviceInUse => "Device is held open by someone",
            StateRefusal::NoVerifyAlg => "Need a verify algorithm to start online verify",
            StateRefusal::NeedConnection => "Need a connection to start verify or resync",
            StateRefusal::LowerThanOutdated => "Disk state is lower than outdated",
            StateRefusal::ConcurrentChange => "Concurrent state changes detected and aborted",
        }
    }

    /// The exit code `drbdsetup` (and so `drbdadm`) uses for it: 17 without UpToDate data,
    /// 16 without a local disk, 5 below Outdated, 11 for the other refusals.
    pub fn exit_code(self) -> i32 {
        match self {
            StateRefusal::NoUpToDateDisk => 17,
            StateRefusal::NoLocalDisk => 16,
            StateRefusal::LowerThanOutdated => 5,
            _ => 11,
        }
    }
}

/// An administrative request on one resource (the `drbdadm` commands that change state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRequest {
    /// Attach the backing device (open it, read the metadata).
    Attach,
    /// Detach the backing device (the node goes Diskless).
    Detach,
    /// Start connecting to the peer. `discard_my_data`: this node volunteers as the split-brain
    /// victim on the next handshake.
    Connect {
        discard_my_data: bool,
    },
    /// Drop the connection and stay StandAlone.
    Disconnect,
    /// Become Primary; `force` overrides missing UpToDate data (initial sync source).
    Primary {
        force: bool,
    },
    /// Become Secondary.
    Secondary,
    /// Mark all local data out of date: full resync from the peer.
    Invalidate,
    /// Mark all of the peer's data out of date: full resync to the peer.
    InvalidateRemote,
    /// Start a new data generation; with `clear_bitmap` on a fresh pair, skip the initial sync.
    NewCurrentUuid {
        clear_bitmap: bool,
    },
    /// Start an online verify of the whole device (`verify`).
    Verify,
    /// Mark the local data Outdated (`outdate`; fence-peer handlers run it on the peer).
    Outdate,
    /// Pause / resume the resync (`pause-sync`, `resume-sync`).
    PauseSync,
    ResumeSync,
    /// Suspend / resume application I/O (`suspend-io`, `resume-io`; resume-io also ends a
    /// suspension by fencing).
    SuspendIo,
    ResumeIo,
}

/// Why an administrative request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    /// A refused state change.
    State(StateRefusal),
    /// Anything else: `exit_code` as `drbdsetup` would exit, `message` for stderr.
    Other { exit_code: i32, message: String },
}

impl AdminError {
    /// The exit code `drbdadm` ends with.
    pub fn exit_code(&self) -> i32 {
        match self {
            AdminError::State(r) => r.exit_code(),
            AdminError::Other { exit_code, .. } => *exit_code,
        }
    }
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminError::State(r) => write!(f, "State change failed: ({}) {}", r.code(), r.text()),
            AdminError::Other { message, .. } => f.write_str(message),
        }
    }
}

impl std::error::Error for AdminError {}
