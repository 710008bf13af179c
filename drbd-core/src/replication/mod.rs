//! Replication-time bookkeeping of which parts of the device may differ from the peer.
//!
//! * [`bitmap`]: the in-memory dirty bitmap (one bit per 4 KiB block), with conversion to and
//!   from the on-disk v08 bitmap area and tracking of the 4 KiB bitmap pages that need writing.
//! * [`activity_log`]: the activity log, the bounded set of 4 MiB extents that may have writes
//!   in flight, with its on-disk transactions and crash replay.
//!
//! Both are sans-IO: they decide what has to be written and where; the caller writes it.

pub mod activity_log;
pub mod bitmap;
pub mod device;
pub mod digest;
pub mod msg;
pub mod status;
