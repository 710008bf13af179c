//! Integration tests of the workspace. The tests in `tests/tests/` drive the release binaries
//! (`drbdadm`, `drbdd`) and compare them with the real drbd-utils programs (`drbdadm-84`,
//! `drbdmeta`), which serve as oracles.
