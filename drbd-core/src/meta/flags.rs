//! `MDF_*` flags of the v08 superblock's `flags` field.

/// The local data is consistent (disk state above Inconsistent).
pub const MDF_CONSISTENT: u32 = 1 << 0;
/// This node is (or was, at a crash) Primary, or a diskless peer Primary uses this disk.
pub const MDF_PRIMARY_IND: u32 = 1 << 1;
/// The node is (or was) connected to its peer.
pub const MDF_CONNECTED_IND: u32 = 1 << 2;
/// A full sync is pending (set before writing an all-ones bitmap, cleared afterwards).
pub const MDF_FULL_SYNC: u32 = 1 << 3;
/// The data was up to date (disk state above Outdated).
pub const MDF_WAS_UP_TO_DATE: u32 = 1 << 4;
/// The peer's disk is known to be outdated or inconsistent.
pub const MDF_PEER_OUT_DATED: u32 = 1 << 5;
/// This node was a Primary when it crashed and has not seen its peer since.
pub const MDF_CRASHED_PRIMARY: u32 = 1 << 6;
/// The activity log is clean (set by drbdmeta after create-md or apply-al).
pub const MDF_AL_CLEAN: u32 = 1 << 7;
/// `al-updates no`: after a crash a full sync is assumed.
pub const MDF_AL_DISABLED: u32 = 1 << 8;

/// The seven flags `get-gi` prints after the UUIDs, in its order.
pub const GET_GI_FLAGS: [u32; 7] = [
    MDF_CONSISTENT,
    MDF_WAS_UP_TO_DATE,
    MDF_PRIMARY_IND,
    MDF_CONNECTED_IND,
    MDF_FULL_SYNC,
    MDF_PEER_OUT_DATED,
    MDF_CRASHED_PRIMARY,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_distinct_bits() {
        let all = [
            MDF_CONSISTENT,
            MDF_PRIMARY_IND,
            MDF_CONNECTED_IND,
            MDF_FULL_SYNC,
            MDF_WAS_UP_TO_DATE,
            MDF_PEER_OUT_DATED,
            MDF_CRASHED_PRIMARY,
            MDF_AL_CLEAN,
            MDF_AL_DISABLED,
        ];
        let mut seen = 0;
        for f in all {
            assert!(f.is_power_of_two());
            assert_eq!(seen & f, 0);
            seen |= f;
        }
        assert_eq!(seen, 0x1ff);
    }
}
