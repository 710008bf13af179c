//! `drbd-cli`: the administration tool `drbdadm` and the daemon `drbdd`.
//!
//! `drbdadm` keeps drbd-utils' commands, options, output formats and exit codes, so that
//! operators' habits and the scripts that call it keep working. This library holds the pieces
//! the binaries share, so that tests can drive them in-process.

pub mod adm;
mod adm_daemon;
mod adm_meta;
pub mod alloc;
pub mod daemon;
pub mod meta_cmd;
pub mod runtime;
pub mod source;
