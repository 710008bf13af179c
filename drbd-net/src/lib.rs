//! `drbd-net` is the runtime side of replication.
//!
//! * [`wire`]: the DRBD 8.4 wire codec: h80, h95 and h100 headers, every packet of the
//!   two-node protocol with a typed payload, an incremental decoder that checks each
//!   command's length limits as soon as a header is complete, and the RLE/VLI bitmap code of
//!   the bitmap exchange.
//! * [`handshake`]: the connection handshake as sans-IO state machines: data/meta socket
//!   roles, feature negotiation, cram-hmac, the parameter exchange and keep-alive.
//! * [`peer`]: the mapping between the replication core's messages and wire packets (both
//!   directions, bitmap transfers included).
//! * [`transport`]: the tokio transport that moves bytes between two TCP sockets per peer and
//!   those machines, with retries after connect-int, and after the handshake carries the
//!   core's messages as a session.
//! * [`capture`]: pcap reading, TCP reassembly and DRBD stream decoding (`drbd-wiredump`).
//! * [`nbd`]: the NBD server through which resources are exported.
//! * [`disk`]: the disk engines behind one trait: io_uring on a dedicated thread, with a
//!   thread-pool fallback.

pub mod capture;
pub mod disk;
pub mod handlers;
pub mod handshake;
pub mod nbd;
pub mod peer;
pub mod replica;
pub mod transport;
pub mod wire;
