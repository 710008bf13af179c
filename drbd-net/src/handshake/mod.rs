//! The connection handshake as a sans-IO state machine.
//!
//! Three pieces, each driven by explicit inputs and returning explicit outputs, with no
//! sockets, clocks or randomness of their own (time and random bytes are passed in):
//!
//! * [`SocketRoles`] decides which TCP connection is the data socket and which the meta
//!   socket, from the `P_INITIAL_DATA` / `P_INITIAL_META` packets, including connections that
//!   cross when both nodes connect at once, and which node resolves write conflicts.
//! * [`Handshake`] runs on the data socket: feature negotiation, cram-hmac authentication,
//!   then the parameter exchange (`P_PROTOCOL` with its compatibility checks, and per volume
//!   `P_SYNC_PARAM89`, `P_SIZES`, `P_UUIDS`, `P_STATE`).
//! * [`KeepAlive`] implements ping-int, ping-timeout, timeout and ko-count on the meta socket.
//!
//! The tokio transport ([`crate::transport`]) only moves bytes between sockets and these
//! machines.

mod auth;
mod keepalive;
mod roles;

pub use auth::{AuthConfig, HmacAlg};
pub use keepalive::{KeepAlive, KeepAliveAction, KeepAliveConfig};
pub use roles::{FirstPacket, RoleAction, SocketId, SocketRoles};

use bytes::Bytes;
use drbd_core::replication::digest::DigestAlg;

use crate::wire::{
    self, ConnectionFeatures, Frame, Packet, ProtocolPacket, Sizes, State, SyncParam, Uuids,
    WireContext,
};

/// Lowest protocol version we speak (DRBD 8.4's minimum).
pub const PROTOCOL_MIN: u32 = 86;
/// Highest protocol version we speak (DRBD 8.4.2 and later).
pub const PROTOCOL_MAX: u32 = 101;
/// Feature flags we offer: TRIM, THIN_RESYNC, WSAME, WZEROES (as mainline 8.4.11).
pub const FEATURES: u32 = 0xf;
/// Length of a cram-hmac challenge we send.
pub const CHALLENGE_LEN: usize = 64;

/// Wire values of the after-split-brain policies. The policies themselves (names, mirroring,
/// what each decides) live in [`drbd_core::uuid::AfterSbPolicy`]; these are its numbers as
/// P_PROTOCOL carries them.
pub mod asb {
    use drbd_core::uuid::AfterSbPolicy as P;

    pub const DISCONNECT: u32 = P::Disconnect as u32;
    pub const DISCARD_YOUNGER_PRI: u32 = P::DiscardYoungerPrimary as u32;
    pub const DISCARD_OLDER_PRI: u32 = P::DiscardOlderPrimary as u32;
    pub const DISCARD_ZERO_CHG: u32 = P::DiscardZeroChanges as u32;
    pub const DISCARD_LEAST_CHG: u32 = P::DiscardLeastChanges as u32;
    pub const DISCARD_LOCAL: u32 = P::DiscardLocal as u32;
    pub const DISCARD_REMOTE: u32 = P::DiscardRemote as u32;
    pub const CONSENSUS: u32 = P::Consensus as u32;
    pub const DISCARD_SECONDARY: u32 = P::DiscardSecondary as u32;
    pub const CALL_HELPER: u32 = P::CallPriLostAfterSb as u32;
    pub const VIOLENTLY: u32 = P::ViolentlyAs0p as u32;

    /// The policy number of a drbd.conf spelling (rr-conflict's `call-pri-lost` and
    /// `violently` included).
    pub fn from_name(name: &str) -> Option<u32> {
        match name {
            "call-pri-lost" => Some(CALL_HELPER),
            "violently" => Some(VIOLENTLY),
            _ => P::from_name(name).map(P::wire),
        }
    }

    /// The drbd.conf spelling of a policy number.
    pub fn name(policy: u32) -> Option<&'static str> {
        P::from_wire(policy).map(P::name)
    }

    /// The peer's view of a policy: what is "local" to it is "remote" to us. Unknown numbers
    /// are returned unchanged (the comparison then fails on them).
    pub fn mirrored(policy: u32) -> u32 {
        P::from_wire(policy).map_or(policy, |p| p.mirrored().wire())
    }
}

/// Queue limits announced when the volume gave none: 512-byte logical and physical blocks,
/// no discard, no write-same.
pub const DEFAULT_QUEUE_LIMITS: wire::QueueLimits = wire::QueueLimits {
    physical_block_size: 512,
    logical_block_size: 512,
    alignment_offset: 0,
    io_min: 512,
    io_opt: 0,
    discard_enabled: 0,
    discard_zeroes_data: 0,
    write_same_capable: 0,
    pad: 0,
};

pub use crate::wire::{CF_DISCARD_MY_DATA, CF_DRY_RUN};

/// Connection-level parameters sent in P_PROTOCOL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolParams {
    /// 1 = A, 2 = B, 3 = C.
    pub wire_protocol: u32,
    pub after_sb_0p: u32,
    pub after_sb_1p: u32,
    pub after_sb_2p: u32,
    pub two_primaries: bool,
    pub discard_my_data: bool,
    /// `data-integrity-alg`, empty for none.
    pub integrity_alg: String,
}

impl Default for ProtocolParams {
    fn default() -> Self {
        ProtocolParams {
            wire_protocol: 3,
            after_sb_0p: asb::DISCONNECT,
            after_sb_1p: asb::DISCONNECT,
            after_sb_2p: asb::DISCONNECT,
            two_primaries: false,
            discard_my_data: false,
            integrity_alg: String::new(),
        }
    }
}

/// What one volume tells the peer when the connection comes up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeHello {
    pub volume: u16,
    pub sync_param: SyncParam,
    pub sizes: Sizes,
    pub uuids: Uuids,
    pub state: State,
}

/// Everything our side of the handshake needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeConfig {
    pub protocol_min: u32,
    pub protocol_max: u32,
    pub features: u32,
    pub auth: Option<AuthConfig>,
    pub protocol: ProtocolParams,
    pub volumes: Vec<VolumeHello>,
}

/// What the peer told us, once the handshake is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHello {
    pub protocol_version: u32,
    pub features: u32,
    pub protocol: ProtocolParams,
    pub volumes: Vec<VolumeHello>,
}

/// Why a handshake failed. [`HandshakeError::retry`] tells whether DRBD would try again after
/// connect-int or stay StandAlone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("incompatible DRBD dialects: I support {my_min}-{my_max}, peer supports {peer_min}-{peer_max}")]
    IncompatibleVersions {
        my_min: u32,
        my_max: u32,
        peer_min: u32,
        peer_max: u32,
    },
    #[error("expected {expected} but received {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    #[error("peer presented the same challenge as ours (reflection)")]
    ReflectedChallenge,
    #[error("authentication of peer failed")]
    AuthFailed,
    #[error("authentication failed: expected {expected} but received {got} (is cram-hmac-alg set on both sides?)")]
    AuthUnexpected {
        expected: &'static str,
        got: &'static str,
    },
    #[error("peer uses cram-hmac authentication but we have no shared secret")]
    AuthNotConfigured,
    #[error("incompatible {0}")]
    Incompatible(&'static str),
    #[error("data-integrity-alg '{0}' is not supported")]
    UnsupportedIntegrityAlg(String),
    #[error("peer describes volume {0}, which we do not have")]
    UnknownVolume(u16),
}

impl HandshakeError {
    /// Whether the node should retry after connect-int. Authentication failures and
    /// incompatible settings leave the connection StandAlone, as in DRBD: retrying cannot fix
    /// a configuration mismatch.
    pub fn retry(&self) -> bool {
        matches!(
            self,
            HandshakeError::Unexpected { .. } | HandshakeError::UnknownVolume(_)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the peer's P_CONNECTION_FEATURES.
    Features,
    /// Waiting for the peer's P_AUTH_CHALLENGE.
    AuthChallenge,
    /// Waiting for the peer's P_AUTH_RESPONSE.
    AuthResponse,
    /// Waiting for P_PROTOCOL and the per-volume packets.
    Params,
    Done,
    Failed,
}

/// The data-socket handshake of one connection attempt.
pub struct Handshake {
    cfg: HandshakeConfig,
    challenge: [u8; CHALLENGE_LEN],
    phase: Phase,
    ctx: WireContext,
    outbox: std::collections::VecDeque<Frame>,
    peer_protocol: Option<ProtocolParams>,
    /// Per volume of ours, what the peer sent so far.
    peer_volumes: Vec<PartialVolume>,
}

#[derive(Default, Clone)]
struct PartialVolume {
    sync_param: Option<SyncParam>,
    sizes: Option<Sizes>,
    uuids: Option<Uuids>,
    state: Option<State>,
}

/// What a handshake step produced besides frames to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Nothing visible yet; keep feeding frames.
    Continue,
    /// Features agreed: decode the following frames with this context.
    Agreed(WireContext),
    /// The handshake is complete.
    Established(Box<PeerHello>),
}

impl Handshake {
    /// A new attempt. `challenge` must be fresh random bytes for every attempt.
    pub fn new(cfg: HandshakeConfig, challenge: [u8; CHALLENGE_LEN]) -> Self {
        let volumes = cfg.volumes.len();
        let mut hs = Handshake {
            cfg,
            challenge,
            phase: Phase::Features,
            ctx: WireContext::default(),
            outbox: std::collections::VecDeque::new(),
            peer_protocol: None,
            peer_volumes: vec![PartialVolume::default(); volumes],
        };
        // Features are always sent first, with the old h80 header.
        let f = ConnectionFeatures::new(hs.cfg.protocol_min, hs.cfg.features, hs.cfg.protocol_max);
        hs.send(0, Packet::ConnectionFeatures(f));
        hs
    }

    /// The next frame to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.outbox.pop_front()
    }

    /// The decoding context agreed so far.
    pub fn context(&self) -> WireContext {
        self.ctx
    }

    pub fn is_failed(&self) -> bool {
        self.phase == Phase::Failed
    }

    fn send(&mut self, volume: u16, packet: Packet) {
        // Before features are agreed (version 0) this picks h80, as the kernel does.
        self.outbox
            .push_back(Frame::for_context(&self.ctx, volume, packet));
    }

    fn fail(&mut self, e: HandshakeError) -> Result<Progress, HandshakeError> {
        self.phase = Phase::Failed;
        Err(e)
    }

    /// Feeds one frame received on the data socket.
    pub fn on_frame(&mut self, frame: Frame) -> Result<Progress, HandshakeError> {
        match (self.phase, frame.packet) {
            (Phase::Features, Packet::ConnectionFeatures(peer)) => {
                let mine = ConnectionFeatures::new(
                    self.cfg.protocol_min,
                    self.cfg.features,
                    self.cfg.protocol_max,
                );
                if !mine.compatible_with(&peer) {
                    return self.fail(HandshakeError::IncompatibleVersions {
                        my_min: self.cfg.protocol_min,
                        my_max: self.cfg.protocol_max,
                        peer_min: peer.protocol_min,
                        peer_max: peer.effective_max(),
                    });
                }
                (self.ctx.protocol_version, self.ctx.features) = mine.agree(&peer);
                if self.cfg.auth.is_some() {
                    let ch = Bytes::copy_from_slice(&self.challenge);
                    self.send(0, Packet::AuthChallenge(ch));
                    self.phase = Phase::AuthChallenge;
                } else {
                    self.send_params();
                    self.phase = Phase::Params;
                }
                Ok(Progress::Agreed(self.ctx))
            }
            (Phase::AuthChallenge, Packet::AuthChallenge(peer_challenge)) => {
                let Some(auth) = &self.cfg.auth else {
                    return self.fail(HandshakeError::AuthNotConfigured);
                };
                // A peer that echoes our own challenge would make us compute its answer.
                if peer_challenge[..] == self.challenge[..] {
                    return self.fail(HandshakeError::ReflectedChallenge);
                }
                let response = auth.respond(&peer_challenge);
                self.send(0, Packet::AuthResponse(Bytes::from(response)));
                self.phase = Phase::AuthResponse;
                Ok(Progress::Continue)
            }
            (Phase::AuthResponse, Packet::AuthResponse(resp)) => {
                let auth = self
                    .cfg
                    .auth
                    .as_ref()
                    .expect("auth phases only run with auth");
                if !auth.verify(&self.challenge, &resp) {
                    return self.fail(HandshakeError::AuthFailed);
                }
                self.send_params();
                self.phase = Phase::Params;
                Ok(Progress::Continue)
            }
            (Phase::Features, other) => self.unexpected("P_CONNECTION_FEATURES", &other),
            // A peer without cram-hmac skips straight to its parameters: authentication
            // failed, and like DRBD we do not retry.
            (Phase::AuthChallenge, other) => {
                let got = other.command().name();
                self.fail(HandshakeError::AuthUnexpected {
                    expected: "P_AUTH_CHALLENGE",
                    got,
                })
            }
            (Phase::AuthResponse, other) => {
                let got = other.command().name();
                self.fail(HandshakeError::AuthUnexpected {
                    expected: "P_AUTH_RESPONSE",
                    got,
                })
            }
            (Phase::Params, Packet::Protocol(p)) => {
                let peer = protocol_params(&p);
                if let Err(e) = self.check_protocol(&peer) {
                    return self.fail(e);
                }
                // Both sides agreed on the algorithm (checked above); without its digest
                // length no data packet could be decoded.
                let Some(len) = wire::integrity_digest_len(&peer.integrity_alg) else {
                    let alg = peer.integrity_alg.clone();
                    return self.fail(HandshakeError::UnsupportedIntegrityAlg(alg));
                };
                self.ctx.integrity_digest_len = len;
                if !peer.integrity_alg.is_empty() {
                    // Digests this side computes and checks itself.
                    match DigestAlg::from_name(&peer.integrity_alg) {
                        Ok(alg) if alg.digest_len() == len => self.ctx.integrity = Some(alg),
                        _ => {
                            let alg = peer.integrity_alg.clone();
                            return self.fail(HandshakeError::UnsupportedIntegrityAlg(alg));
                        }
                    }
                }
                self.peer_protocol = Some(peer);
                if self.cfg.volumes.is_empty() {
                    // Nothing more to wait for.
                    return self.complete();
                }
                Ok(Progress::Agreed(self.ctx))
            }
            (Phase::Params, packet) if self.peer_protocol.is_some() => {
                let idx = match self
                    .cfg
                    .volumes
                    .iter()
                    .position(|v| v.volume == frame.volume)
                {
                    Some(i) => i,
                    None => return self.fail(HandshakeError::UnknownVolume(frame.volume)),
                };
                let v = &mut self.peer_volumes[idx];
                match packet {
                    Packet::SyncParam(s) | Packet::SyncParam89(s) => {
                        // As 8.4's receive_SyncParam while connecting: both nodes digest
                        // with the same algorithms or not at all.
                        let mine = &self.cfg.volumes[idx].sync_param;
                        if s.verify_alg() != mine.verify_alg() {
                            return self.fail(HandshakeError::Incompatible("verify-alg settings"));
                        }
                        if s.csums_alg() != mine.csums_alg() {
                            return self.fail(HandshakeError::Incompatible("csums-alg settings"));
                        }
                        v.sync_param = Some(s);
                    }
                    Packet::Sizes(s) => v.sizes = Some(s),
                    Packet::Uuids(u) => v.uuids = Some(u),
                    Packet::State(s) => v.state = Some(s),
                    other => {
                        return self
                            .unexpected("P_SYNC_PARAM89, P_SIZES, P_UUIDS or P_STATE", &other)
                    }
                }
                self.complete()
            }
            // The peer authenticates, we have no secret: a configuration mismatch, as final
            // as a wrong secret.
            (Phase::Params, Packet::AuthChallenge(_)) => {
                self.fail(HandshakeError::AuthNotConfigured)
            }
            (Phase::Params, other) => self.unexpected("P_PROTOCOL", &other),
            (Phase::Done | Phase::Failed, other) => {
                self.unexpected("nothing (handshake over)", &other)
            }
        }
    }

    fn unexpected(
        &mut self,
        expected: &'static str,
        got: &Packet,
    ) -> Result<Progress, HandshakeError> {
        let got = got.command().name();
        self.fail(HandshakeError::Unexpected { expected, got })
    }

    fn complete(&mut self) -> Result<Progress, HandshakeError> {
        // The peer's P_STATE ends its volume's hello; all volumes must have said everything.
        let all = self
            .peer_volumes
            .iter()
            .all(|v| v.sizes.is_some() && v.uuids.is_some() && v.state.is_some());
        if !all {
            return Ok(Progress::Continue);
        }
        self.phase = Phase::Done;
        let volumes = self
            .cfg
            .volumes
            .iter()
            .zip(&self.peer_volumes)
            .map(|(mine, p)| VolumeHello {
                volume: mine.volume,
                sync_param: p
                    .sync_param
                    .clone()
                    .unwrap_or_else(|| mine.sync_param.clone()),
                sizes: p.sizes.expect("checked above"),
                uuids: p.uuids.expect("checked above"),
                state: p.state.expect("checked above"),
            })
            .collect();
        Ok(Progress::Established(Box::new(PeerHello {
            protocol_version: self.ctx.protocol_version,
            features: self.ctx.features,
            protocol: self
                .peer_protocol
                .clone()
                .expect("params phase has the protocol"),
            volumes,
        })))
    }

    /// DRBD's P_PROTOCOL checks: both sides must agree on everything that decides what is
    /// written where.
    fn check_protocol(&self, peer: &ProtocolParams) -> Result<(), HandshakeError> {
        let mine = &self.cfg.protocol;
        if peer.wire_protocol != mine.wire_protocol {
            return Err(HandshakeError::Incompatible("communication protocols"));
        }
        if asb::mirrored(peer.after_sb_0p) != mine.after_sb_0p {
            return Err(HandshakeError::Incompatible("after-sb-0pri settings"));
        }
        if asb::mirrored(peer.after_sb_1p) != mine.after_sb_1p {
            return Err(HandshakeError::Incompatible("after-sb-1pri settings"));
        }
        if asb::mirrored(peer.after_sb_2p) != mine.after_sb_2p {
            return Err(HandshakeError::Incompatible("after-sb-2pri settings"));
        }
        if peer.discard_my_data && mine.discard_my_data {
            return Err(HandshakeError::Incompatible(
                "both sides have the discard-my-data flag set",
            ));
        }
        if peer.two_primaries != mine.two_primaries {
            return Err(HandshakeError::Incompatible(
                "setting of allow-two-primaries",
            ));
        }
        if peer.integrity_alg != mine.integrity_alg {
            return Err(HandshakeError::Incompatible("data-integrity-alg"));
        }
        Ok(())
    }

    fn send_params(&mut self) {
        let p = &self.cfg.protocol;
        let conn_flags = if p.discard_my_data {
            CF_DISCARD_MY_DATA
        } else {
            0
        };
        let pkt = ProtocolPacket {
            protocol: p.wire_protocol,
            after_sb_0p: p.after_sb_0p,
            after_sb_1p: p.after_sb_1p,
            after_sb_2p: p.after_sb_2p,
            conn_flags,
            two_primaries: u32::from(p.two_primaries),
            integrity_alg: p.integrity_alg.clone(),
        };
        self.send(0, Packet::Protocol(pkt));
        for v in self.cfg.volumes.clone() {
            // Versions from 89 on use P_SYNC_PARAM89 (which from 95 on carries the resync
            // controller settings); older peers get the short P_SYNC_PARAM.
            if self.ctx.protocol_version >= 89 {
                self.send(v.volume, Packet::SyncParam89(v.sync_param));
            } else {
                self.send(v.volume, Packet::SyncParam(v.sync_param));
            }
            let mut sizes = v.sizes;
            // The queue limits travel exactly when WSAME was agreed.
            sizes.queue_limits = if self.ctx.features & wire::FF_WSAME != 0 {
                Some(sizes.queue_limits.unwrap_or(DEFAULT_QUEUE_LIMITS))
            } else {
                None
            };
            self.send(v.volume, Packet::Sizes(sizes));
            self.send(v.volume, Packet::Uuids(v.uuids));
            self.send(v.volume, Packet::State(v.state));
        }
    }
}

fn protocol_params(p: &ProtocolPacket) -> ProtocolParams {
    ProtocolParams {
        wire_protocol: p.protocol,
        after_sb_0p: p.after_sb_0p,
        after_sb_1p: p.after_sb_1p,
        after_sb_2p: p.after_sb_2p,
        two_primaries: p.two_primaries != 0,
        discard_my_data: p.conn_flags & CF_DISCARD_MY_DATA != 0,
        integrity_alg: p.integrity_alg.clone(),
    }
}

#[cfg(test)]
mod tests;
