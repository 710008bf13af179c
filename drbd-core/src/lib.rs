//! `drbd-core` is the sans-IO heart of the DRBD reimplementation.
//!
//! It holds everything that can be decided without touching a socket, a clock or a thread:
//!
//! * [`config`]: the drbd.conf model (every option with its default and unit), the parser for the
//!   grammar that drbd-utils' 8.4 front end accepts (8.3 and 8.4 spellings), and the canonical
//!   printer behind `drbdadm dump`.
//! * [`meta`]: the v08 on-disk metadata format (superblock, activity-log ring, bitmap area and
//!   their placement), byte-compatible with what `drbdmeta` writes.
//! * [`replication`]: the in-memory dirty bitmap (one bit per 4 KiB, with write-back of
//!   changed on-disk pages) and the activity log (active 4 MiB extents, the transactions that
//!   record them in the on-disk ring, and their replay after a crash).
//! * [`state`]: DRBD 8.4's role, connection-state and disk-state enumerations with their wire
//!   numbers and names.
//! * [`uuid`]: the data generation UUIDs and their transitions (promotion, resync start and
//!   end, `new-current-uuid`), DRBD 8.4's UUID comparison with its rule numbers, and the sync
//!   handshake with the after-split-brain and `rr-conflict` policies.
//!
//! Inputs come in as bytes or values and results go out as values: the callers (the CLI and the
//! daemon) do the I/O. The crate has no `unsafe` code, no tokio, no sockets, no clock reads and
//! no threads.
#![forbid(unsafe_code)]

pub mod config;
pub mod meta;
pub mod replication;
pub mod state;
pub mod uuid;
