//! `drbd-net` will hold the runtime side of replication: the DRBD 8.4 wire codec (h80, h95 and
//! h100 headers and every packet of the two-node protocol), the connection handshake (two TCP
//! sockets, feature negotiation, cram-hmac), the tokio transport, and the disk engines behind
//! one trait (io_uring on a dedicated thread, with a thread-pool fallback).
