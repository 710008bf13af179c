//! DRBD v08 on-disk meta data, byte-compatible with drbd-utils' `drbdmeta`.
//!
//! The meta data of a DRBD 8.4 device consists of three parts:
//!
//! * a 4 KiB **superblock** ([`SuperblockV08`]) with the generation UUIDs, flags
//!   ([`flags`]), the last agreed size and the positions of the other two parts;
//! * the **activity log** ([`al`]), a ring of 4 KiB transaction blocks recording which 4 MiB
//!   extents may have in-flight writes;
//! * the **bitmap**, one bit per 4 KiB of data, marking blocks that are out of sync.
//!
//! [`layout`] computes where these live for each placement (internal, flexible external,
//! indexed external) and device size, exactly as `drbdmeta create-md` places them. [`dump`]
//! and [`bitmap`] produce the text of `dump-md`, `show-gi` and `get-gi`; [`probe`] recognises
//! file systems that `create-md` must not overwrite.
//!
//! Everything here works on byte slices and values; reading and writing devices is the
//! caller's business.

pub mod al;
pub mod bitmap;
pub mod dump;
mod error;
pub mod flags;
pub mod layout;
pub mod probe;
pub mod superblock;

pub use error::MetaError;
pub use layout::{
    AlGeometry, Layout, Placement, BLOCK_BYTES, DEFAULT_BM_BYTES_PER_BIT,
    EXTERNAL_AL_OFFSET_SECTORS, MIN_DEVICE_BYTES, SECTOR_BYTES,
};
pub use superblock::{Magic, SuperblockV08, Uuids, V09Probe, SUPERBLOCK_BYTES};
