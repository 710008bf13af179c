//! DRBD 8.4's state enumerations: node role, connection state and disk state, with the
//! numbers they carry on the wire (in `P_STATE`) and the names `drbdadm` prints. The order of
//! the variants is the numeric order, which DRBD's comparisons (`disk > Outdated`, ...) rely
//! on.

use std::fmt;

/// Defines a state enumeration with its wire values and 8.4 names.
macro_rules! wire_enum {
    ($(#[$doc:meta])* $ty:ident { $( $(#[$vdoc:meta])* $variant:ident = $value:literal, $name:literal; )* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $ty {
            $( $(#[$vdoc])* $variant = $value, )*
        }

        impl $ty {
            /// The value with this wire number, if any.
            pub fn from_wire(value: u8) -> Option<$ty> {
                match value {
                    $( $value => Some($ty::$variant), )*
                    _ => None,
                }
            }

            /// The wire number.
            pub fn wire(self) -> u8 {
                self as u8
            }

            /// The 8.4 name, as `drbdadm` prints it.
            pub fn name(self) -> &'static str {
                match self {
                    $( $ty::$variant => $name, )*
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

wire_enum! {
    /// A node role (2 bits in the state word).
    Role {
        /// Not known (the peer's role while disconnected).
        Unknown = 0, "Unknown";
        /// Primary.
        Primary = 1, "Primary";
        /// Secondary.
        Secondary = 2, "Secondary";
    }
}

wire_enum! {
    /// A DRBD 8.4 connection state (5 bits in the state word).
    ConnState {
        /// No network configuration.
        StandAlone = 0, "StandAlone";
        /// Transient, going StandAlone.
        Disconnecting = 1, "Disconnecting";
        /// Transient, about to connect.
        Unconnected = 2, "Unconnected";
        /// Transient after a timeout.
        Timeout = 3, "Timeout";
        /// Transient after a send error.
        BrokenPipe = 4, "BrokenPipe";
        /// Transient after a network error.
        NetworkFailure = 5, "NetworkFailure";
        /// Transient after a protocol error.
        ProtocolError = 6, "ProtocolError";
        /// The peer is closing the connection.
        TearDown = 7, "TearDown";
        /// Connecting / listening.
        WfConnection = 8, "WFConnection";
        /// Sockets up, exchanging parameters.
        WfReportParams = 9, "WFReportParams";
        /// Connected, no resync.
        Connected = 10, "Connected";
        /// Full sync requested, will be source.
        StartingSyncS = 11, "StartingSyncS";
        /// Full sync requested, will be target.
        StartingSyncT = 12, "StartingSyncT";
        /// Will be source, exchanging bitmaps.
        WfBitMapS = 13, "WFBitMapS";
        /// Will be target, exchanging bitmaps.
        WfBitMapT = 14, "WFBitMapT";
        /// Target waiting for `P_SYNC_UUID`.
        WfSyncUuid = 15, "WFSyncUUID";
        /// Resync source.
        SyncSource = 16, "SyncSource";
        /// Resync target.
        SyncTarget = 17, "SyncTarget";
        /// Online verify source.
        VerifyS = 18, "VerifyS";
        /// Online verify target.
        VerifyT = 19, "VerifyT";
        /// Paused resync source.
        PausedSyncS = 20, "PausedSyncS";
        /// Paused resync target.
        PausedSyncT = 21, "PausedSyncT";
        /// Congested: sending `P_OUT_OF_SYNC` instead of data.
        Ahead = 22, "Ahead";
        /// The peer is Ahead.
        Behind = 23, "Behind";
    }
}

wire_enum! {
    /// A DRBD 8.4 disk state (4 bits in the state word; 9.x numbers differ from 2 on).
    DiskState {
        /// No backing device.
        Diskless = 0, "Diskless";
        /// Reading metadata.
        Attaching = 1, "Attaching";
        /// I/O error, about to become Diskless.
        Failed = 2, "Failed";
        /// Late attach while connected.
        Negotiating = 3, "Negotiating";
        /// Data not usable.
        Inconsistent = 4, "Inconsistent";
        /// Consistent but known to be older than the peer.
        Outdated = 5, "Outdated";
        /// The peer's disk state is not known.
        DUnknown = 6, "DUnknown";
        /// Consistent, newest unknown.
        Consistent = 7, "Consistent";
        /// Current data.
        UpToDate = 8, "UpToDate";
    }
}

impl Role {
    /// Whether this is [`Role::Primary`].
    pub fn is_primary(self) -> bool {
        self == Role::Primary
    }
}
