//! Serving replicated devices to local and remote clients over NBD.
//!
//! Every resource becomes one NBD export named after it, reachable on a Unix socket
//! (`DIR/RES.nbd`) and optionally on TCP, so that qemu, Xen, nbdcopy, fio or the kernel's
//! nbd client can use it without a kernel module of ours.
//!
//! * [`proto`]: the protocol as sans-IO state machines (handshake, request decoding, reply
//!   encoding), with every limit a named constant.
//! * [`BlockDevice`]: what an export serves. The server acknowledges a write only after
//!   the device completed it, so the device's completion semantics are the client's.
//! * [`FileDevice`] (a file or device node; the daemon's local-only mode) and
//!   [`MemDevice`] (tests).
//! * [`NbdServer`]: the tokio server with its listeners and connections.
//!
//! Offered: fixed newstyle negotiation; `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`,
//! `NBD_OPT_LIST`, `NBD_OPT_INFO`, `NBD_OPT_GO` (export, name, description and block size
//! information); simple replies; `NBD_CMD_READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM` and
//! `WRITE_ZEROES` with `FUA` and `NO_HOLE`; `NBD_FLAG_CAN_MULTI_CONN` where the device says
//! so. Answered with `NBD_REP_ERR_UNSUP`: TLS, structured replies, metadata contexts,
//! extended headers.

#![deny(missing_docs)]

mod device;
mod file;
pub mod proto;
mod server;

pub use device::{check_range, BlockDevice, BlockError, BoxFuture, MemDevice};
pub use file::FileDevice;
pub use server::{
    ExportError, ListenAddr, Listener, NbdServer, DRAIN_TIMEOUT, HANDSHAKE_TIMEOUT,
    MAX_CONNECTIONS_PER_LISTENER, MAX_IN_FLIGHT_BYTES, MAX_IN_FLIGHT_REQUESTS,
    SHUTDOWN_HANDSHAKE_GRACE,
};

#[cfg(test)]
mod tests;
