//! Which TCP connection is the data socket, which the meta socket, and who resolves conflicts.
//!
//! Both nodes listen and connect at the same time. An accepted connection takes the role its
//! first packet announces (`P_INITIAL_DATA` or `P_INITIAL_META`); an outgoing one takes a role
//! that is still free. DRBD 8.4 always opens its data socket first, so two nodes started
//! together open their data sockets at once: each then receives a `P_INITIAL_DATA` while
//! already holding a data socket, the sockets "crossed". As in DRBD, the accepted one replaces
//! the own one and the node backs off at random; the transport then checks that the sockets it
//! kept are still open. To make such collisions rare between two of our nodes, the node with
//! the higher address opens its data socket first and the other its meta socket first (the
//! rule DRBD 9's TCP transport uses), which an 8.4 peer accepts either way. The node that
//! accepted the meta socket resolves concurrent-write conflicts in dual-primary mode.

/// A transport-chosen handle for one TCP connection.
pub type SocketId = u64;

/// What the transport must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleAction {
    /// Send P_INITIAL_DATA on this (outgoing) socket.
    SendInitialData(SocketId),
    /// Send P_INITIAL_META on this (outgoing) socket.
    SendInitialMeta(SocketId),
    /// Close this socket; it has no role.
    Close(SocketId),
    /// Sockets crossed: stop connecting out for a while and only accept.
    BackOff,
    /// Both sockets are there.
    Ready {
        data: SocketId,
        meta: SocketId,
        resolve_conflicts: bool,
    },
}

/// The socket-role state of one connection attempt.
#[derive(Debug, Default)]
pub struct SocketRoles {
    data: Option<SocketId>,
    meta: Option<SocketId>,
    resolve_conflicts: bool,
    /// Whether our first outgoing connection is the meta socket (the lower address's rule).
    meta_first: bool,
}

/// What an accepted connection announced as its first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstPacket {
    InitialData,
    InitialMeta,
    /// Anything else: not a DRBD peer's first packet.
    Other,
}

impl SocketRoles {
    /// Roles for a node that opens its data socket first (DRBD 8.4's behaviour).
    pub fn new() -> Self {
        Self::default()
    }

    /// Roles for a node that, having the lower address, opens its meta socket first.
    pub fn meta_first() -> Self {
        SocketRoles {
            meta_first: true,
            ..Self::default()
        }
    }

    /// An outgoing connection was established.
    pub fn on_connected(&mut self, id: SocketId) -> Vec<RoleAction> {
        let mut out = Vec::new();
        if self.meta_first && self.meta.is_none() {
            self.meta = Some(id);
            self.resolve_conflicts = false;
            out.push(RoleAction::SendInitialMeta(id));
        } else if self.data.is_none() {
            self.data = Some(id);
            out.push(RoleAction::SendInitialData(id));
        } else if self.meta.is_none() {
            self.meta = Some(id);
            // The node that opens the meta socket does not resolve conflicts.
            self.resolve_conflicts = false;
            out.push(RoleAction::SendInitialMeta(id));
        } else {
            out.push(RoleAction::Close(id));
        }
        self.ready(&mut out);
        out
    }

    /// An accepted connection sent its first packet. `coin` is a fresh random bit: on
    /// crossed sockets it decides whether this node backs off.
    pub fn on_accepted(&mut self, id: SocketId, first: FirstPacket, coin: bool) -> Vec<RoleAction> {
        let mut out = Vec::new();
        let slot = match first {
            FirstPacket::InitialData => &mut self.data,
            FirstPacket::InitialMeta => {
                self.resolve_conflicts = true;
                &mut self.meta
            }
            FirstPacket::Other => {
                out.push(RoleAction::Close(id));
                return out;
            }
        };
        if let Some(old) = slot.replace(id) {
            out.push(RoleAction::Close(old));
            if coin {
                out.push(RoleAction::BackOff);
            }
        }
        self.ready(&mut out);
        out
    }

    /// A socket closed before the connection was complete: its role is free again.
    pub fn on_closed(&mut self, id: SocketId) {
        if self.data == Some(id) {
            self.data = None;
        }
        if self.meta == Some(id) {
            self.meta = None;
        }
    }

    fn ready(&self, out: &mut Vec<RoleAction>) {
        if let (Some(data), Some(meta)) = (self.data, self.meta) {
            out.push(RoleAction::Ready {
                data,
                meta,
                resolve_conflicts: self.resolve_conflicts,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connector_and_acceptor_agree_on_roles() {
        // Node A connects twice; node B accepts both.
        let (mut a, mut b) = (SocketRoles::new(), SocketRoles::new());
        assert_eq!(a.on_connected(1), vec![RoleAction::SendInitialData(1)]);
        assert_eq!(b.on_accepted(1, FirstPacket::InitialData, false), vec![]);
        let a_out = a.on_connected(2);
        assert_eq!(a_out[0], RoleAction::SendInitialMeta(2));
        assert_eq!(
            a_out[1],
            RoleAction::Ready {
                data: 1,
                meta: 2,
                resolve_conflicts: false
            }
        );
        let b_out = b.on_accepted(2, FirstPacket::InitialMeta, false);
        assert_eq!(
            b_out,
            vec![RoleAction::Ready {
                data: 1,
                meta: 2,
                resolve_conflicts: true
            }]
        );
    }

    #[test]
    fn mixed_directions_give_exactly_one_conflict_resolver() {
        // A's data socket goes A->B, B's meta socket... as in the kernel capture: bravo
        // connects first (data), alpha connects second (meta).
        let (mut alpha, mut bravo) = (SocketRoles::new(), SocketRoles::new());
        bravo.on_connected(10);
        alpha.on_accepted(10, FirstPacket::InitialData, false);
        // alpha now connects out: it already has a data socket, so this is its meta socket.
        let a = alpha.on_connected(11);
        assert!(a.contains(&RoleAction::Ready {
            data: 10,
            meta: 11,
            resolve_conflicts: false
        }));
        let b = bravo.on_accepted(11, FirstPacket::InitialMeta, false);
        assert!(b.contains(&RoleAction::Ready {
            data: 10,
            meta: 11,
            resolve_conflicts: true
        }));
    }

    #[test]
    fn crossed_data_sockets_replace_and_back_off() {
        let mut a = SocketRoles::new();
        a.on_connected(1);
        let out = a.on_accepted(2, FirstPacket::InitialData, true);
        assert_eq!(out, vec![RoleAction::Close(1), RoleAction::BackOff]);
        let out = a.on_accepted(3, FirstPacket::InitialMeta, false);
        assert_eq!(
            out,
            vec![RoleAction::Ready {
                data: 2,
                meta: 3,
                resolve_conflicts: true
            }]
        );
    }

    #[test]
    fn simultaneous_connects_do_not_cross_when_one_node_opens_meta_first() {
        let (mut high, mut low) = (SocketRoles::new(), SocketRoles::meta_first());
        assert_eq!(high.on_connected(1), vec![RoleAction::SendInitialData(1)]);
        assert_eq!(low.on_connected(2), vec![RoleAction::SendInitialMeta(2)]);
        let h = high.on_accepted(2, FirstPacket::InitialMeta, true);
        let l = low.on_accepted(1, FirstPacket::InitialData, true);
        assert_eq!(
            h,
            vec![RoleAction::Ready {
                data: 1,
                meta: 2,
                resolve_conflicts: true
            }]
        );
        assert_eq!(
            l,
            vec![RoleAction::Ready {
                data: 1,
                meta: 2,
                resolve_conflicts: false
            }]
        );
    }

    #[test]
    fn garbage_first_packet_is_closed_and_closed_sockets_free_their_role() {
        let mut a = SocketRoles::new();
        assert_eq!(
            a.on_accepted(5, FirstPacket::Other, false),
            vec![RoleAction::Close(5)]
        );
        a.on_connected(6);
        a.on_closed(6);
        assert_eq!(a.on_connected(7), vec![RoleAction::SendInitialData(7)]);
    }
}
