//! The packet command codes of DRBD 8.4.

use std::fmt;

/// Defines [`Command`] from one table: variant, code, kernel name, socket, doc.
macro_rules! commands {
    ($( $(#[$doc:meta])* $variant:ident = $code:literal, $name:literal, $meta:literal; )*) => {
        /// A packet command code of the DRBD 8.4 protocol (all of them, including the unused
        /// legacy codes 0x05/0x06 and the handshake specials 0xfff1, 0xfff2 and 0xfffe).
        ///
        /// DRBD 9-only codes (0x2e..0x30, 0x35, 0x40 and up) and the 0x100/0x101 markers are
        /// not commands here: [`Command::from_code`] returns `None` for them, and the decoder
        /// rejects them as an 8.4 peer does.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Command {
            $( $(#[$doc])* $variant, )*
        }

        impl Command {
            /// Every command, in code order.
            pub const ALL: &'static [Command] = &[ $( Command::$variant, )* ];

            /// The command with this code, if it is an 8.4 command.
            pub fn from_code(code: u16) -> Option<Command> {
                match code {
                    $( $code => Some(Command::$variant), )*
                    _ => None,
                }
            }

            /// The 16-bit code in the header.
            pub fn code(self) -> u16 {
                match self {
                    $( Command::$variant => $code, )*
                }
            }

            /// The kernel's (and Wireshark's) name, e.g. `"P_DATA"`.
            pub fn name(self) -> &'static str {
                match self {
                    $( Command::$variant => $name, )*
                }
            }

            /// Whether DRBD sends this command on the meta socket (pings and acks) rather
            /// than the data socket. `P_DELAY_PROBE` is accepted on both and reported as a
            /// data-socket command.
            pub fn on_meta_socket(self) -> bool {
                match self {
                    $( Command::$variant => $meta, )*
                }
            }
        }
    };
}

commands! {
    /// `P_DATA` (0x00): a replicated write.
    Data = 0x00, "P_DATA", false;
    /// `P_DATA_REPLY` (0x01): the answer to `P_DATA_REQUEST`.
    DataReply = 0x01, "P_DATA_REPLY", false;
    /// `P_RS_DATA_REPLY` (0x02): the answer to a resync request.
    RsDataReply = 0x02, "P_RS_DATA_REPLY", false;
    /// `P_BARRIER` (0x03): closes a write epoch.
    Barrier = 0x03, "P_BARRIER", false;
    /// `P_BITMAP` (0x04): plain bitmap words.
    Bitmap = 0x04, "P_BITMAP", false;
    /// `P_BECOME_SYNC_TARGET` (0x05): legacy, unused by 8.4.
    BecomeSyncTarget = 0x05, "P_BECOME_SYNC_TARGET", false;
    /// `P_BECOME_SYNC_SOURCE` (0x06): legacy, unused by 8.4.
    BecomeSyncSource = 0x06, "P_BECOME_SYNC_SOURCE", false;
    /// `P_UNPLUG_REMOTE` (0x07): hint to kick the peer's backing queue.
    UnplugRemote = 0x07, "P_UNPLUG_REMOTE", false;
    /// `P_DATA_REQUEST` (0x08): remote read.
    DataRequest = 0x08, "P_DATA_REQUEST", false;
    /// `P_RS_DATA_REQUEST` (0x09): resync read request.
    RsDataRequest = 0x09, "P_RS_DATA_REQUEST", false;
    /// `P_SYNC_PARAM` (0x0a): sync parameters (protocol <= 88).
    SyncParam = 0x0a, "P_SYNC_PARAM", false;
    /// `P_PROTOCOL` (0x0b): connection settings.
    Protocol = 0x0b, "P_PROTOCOL", false;
    /// `P_UUIDS` (0x0c): data generation UUIDs.
    Uuids = 0x0c, "P_UUIDS", false;
    /// `P_SIZES` (0x0d): device sizes.
    Sizes = 0x0d, "P_SIZES", false;
    /// `P_STATE` (0x0e): the sender's state.
    State = 0x0e, "P_STATE", false;
    /// `P_SYNC_UUID` (0x0f): the new sync UUID.
    SyncUuid = 0x0f, "P_SYNC_UUID", false;
    /// `P_AUTH_CHALLENGE` (0x10): cram-hmac challenge.
    AuthChallenge = 0x10, "P_AUTH_CHALLENGE", false;
    /// `P_AUTH_RESPONSE` (0x11): cram-hmac response.
    AuthResponse = 0x11, "P_AUTH_RESPONSE", false;
    /// `P_STATE_CHG_REQ` (0x12): per-volume state change request.
    StateChgReq = 0x12, "P_STATE_CHG_REQ", false;
    /// `P_PING` (0x13).
    Ping = 0x13, "P_PING", true;
    /// `P_PING_ACK` (0x14).
    PingAck = 0x14, "P_PING_ACK", true;
    /// `P_RECV_ACK` (0x15): protocol B ack.
    RecvAck = 0x15, "P_RECV_ACK", true;
    /// `P_WRITE_ACK` (0x16): protocol C ack.
    WriteAck = 0x16, "P_WRITE_ACK", true;
    /// `P_RS_WRITE_ACK` (0x17): write ack that also marks the block in sync.
    RsWriteAck = 0x17, "P_RS_WRITE_ACK", true;
    /// `P_SUPERSEDED` (0x18): dual-primary conflict, write superseded.
    Superseded = 0x18, "P_SUPERSEDED", true;
    /// `P_NEG_ACK` (0x19): the peer could not write.
    NegAck = 0x19, "P_NEG_ACK", true;
    /// `P_NEG_DREPLY` (0x1a): the peer could not serve a `P_DATA_REQUEST`.
    NegDReply = 0x1a, "P_NEG_DREPLY", true;
    /// `P_NEG_RS_DREPLY` (0x1b): the peer could not serve a resync/verify request.
    NegRsDReply = 0x1b, "P_NEG_RS_DREPLY", true;
    /// `P_BARRIER_ACK` (0x1c).
    BarrierAck = 0x1c, "P_BARRIER_ACK", true;
    /// `P_STATE_CHG_REPLY` (0x1d).
    StateChgReply = 0x1d, "P_STATE_CHG_REPLY", true;
    /// `P_OV_REQUEST` (0x1e): online verify request.
    OvRequest = 0x1e, "P_OV_REQUEST", false;
    /// `P_OV_REPLY` (0x1f): online verify digest.
    OvReply = 0x1f, "P_OV_REPLY", false;
    /// `P_OV_RESULT` (0x20): online verify result.
    OvResult = 0x20, "P_OV_RESULT", true;
    /// `P_CSUM_RS_REQUEST` (0x21): checksum-based resync request.
    CsumRsRequest = 0x21, "P_CSUM_RS_REQUEST", false;
    /// `P_RS_IS_IN_SYNC` (0x22): checksums matched.
    RsIsInSync = 0x22, "P_RS_IS_IN_SYNC", true;
    /// `P_SYNC_PARAM89` (0x23): sync parameters (protocol >= 89).
    SyncParam89 = 0x23, "P_SYNC_PARAM89", false;
    /// `P_COMPRESSED_BITMAP` (0x24): RLE/VLI coded bitmap.
    CompressedBitmap = 0x24, "P_COMPRESSED_BITMAP", false;
    /// `P_DELAY_PROBE` (0x27): delay probe (ignored by 8.4).
    DelayProbe = 0x27, "P_DELAY_PROBE", false;
    /// `P_OUT_OF_SYNC` (0x28): Ahead mode, mark a range out of sync.
    OutOfSync = 0x28, "P_OUT_OF_SYNC", false;
    /// `P_RS_CANCEL` (0x29): the sync source cancels a resync request.
    RsCancel = 0x29, "P_RS_CANCEL", true;
    /// `P_CONN_ST_CHG_REQ` (0x2a): connection-wide state change request.
    ConnStChgReq = 0x2a, "P_CONN_ST_CHG_REQ", false;
    /// `P_CONN_ST_CHG_REPLY` (0x2b).
    ConnStChgReply = 0x2b, "P_CONN_ST_CHG_REPLY", true;
    /// `P_RETRY_WRITE` (0x2c): dual-primary conflict, retry the write.
    RetryWrite = 0x2c, "P_RETRY_WRITE", true;
    /// `P_PROTOCOL_UPDATE` (0x2d): connection settings changed while connected.
    ProtocolUpdate = 0x2d, "P_PROTOCOL_UPDATE", false;
    /// `P_TRIM` (0x31): discard.
    Trim = 0x31, "P_TRIM", false;
    /// `P_RS_THIN_REQ` (0x32): thin resync request.
    RsThinReq = 0x32, "P_RS_THIN_REQ", false;
    /// `P_RS_DEALLOCATED` (0x33): the resync source block is all zeroes.
    RsDeallocated = 0x33, "P_RS_DEALLOCATED", false;
    /// `P_WSAME` (0x34): write-same.
    Wsame = 0x34, "P_WSAME", false;
    /// `P_ZEROES` (0x36): write-zeroes.
    Zeroes = 0x36, "P_ZEROES", false;
    /// `P_INITIAL_META` (0xfff1): first packet on the meta socket.
    InitialMeta = 0xfff1, "P_INITIAL_META", true;
    /// `P_INITIAL_DATA` (0xfff2): first packet on the data socket.
    InitialData = 0xfff2, "P_INITIAL_DATA", false;
    /// `P_CONNECTION_FEATURES` (0xfffe): feature negotiation.
    ConnectionFeatures = 0xfffe, "P_CONNECTION_FEATURES", false;
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
