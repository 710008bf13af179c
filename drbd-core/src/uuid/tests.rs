//! Tests of the UUID operations, the comparison rules and the sync handshake.
//!
//! The scenario tests replay the kernel log of the two-node capture run (DRBD 8.4.11, protocol
//! 101, `after-sb-0pri discard-zero-changes; after-sb-1pri discard-secondary; after-sb-2pri
//! disconnect`): every UUID set and every `uuid_compare()=N by rule M` line printed by `alpha`
//! and `bravo` is a test vector here.

use proptest::prelude::*;

use super::*;
use crate::meta::{SuperblockV08, Uuids};

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

/// Parses a UUID set as the kernel prints it.
fn g(text: &str) -> GenerationUuids {
    text.parse().expect("valid UUID set")
}

/// A `P_UUIDS` content.
fn info(text: &str, bits: u64, flags: u64) -> UuidInfo {
    UuidInfo::new(g(text), bits, UuidFlags(flags))
}

/// Protocol 101 with all four 8.4 feature flags, as in the captures.
fn ctx101() -> CompareContext {
    CompareContext {
        feature_flags: 0xf,
        ..CompareContext::new(101)
    }
}

fn ctx_apv(protocol_version: u32) -> CompareContext {
    CompareContext {
        protocol_version,
        ..ctx101()
    }
}

fn with_roles(ctx: CompareContext, local: Role, peer: Role) -> CompareContext {
    CompareContext {
        local_role: local,
        peer_role: peer,
        ..ctx
    }
}

// Distinct generations (bit 0 clear) for hand-made cases.
const A: u64 = 0xA000_0000_0000_00A0;
const B: u64 = 0xB000_0000_0000_00B0;
const C: u64 = 0xC000_0000_0000_00C0;
const D: u64 = 0xD000_0000_0000_00D0;
const E: u64 = 0xE000_0000_0000_00E0;
const F: u64 = 0xF000_0000_0000_00F0;
const G: u64 = 0x1000_0000_0000_0010;
const H: u64 = 0x2000_0000_0000_0020;

fn u(c: u64, b: u64, h0: u64, h1: u64) -> UuidInfo {
    UuidInfo::new(
        GenerationUuids::from_array([c, b, h0, h1]),
        0,
        UuidFlags::empty(),
    )
}

fn flagged(mut i: UuidInfo, flags: UuidFlags) -> UuidInfo {
    i.flags = flags;
    i
}

// ------------------------------------------------------------------------------------------
// Conversions
// ------------------------------------------------------------------------------------------

#[test]
fn display_matches_the_kernel_format_and_parses_back() {
    let text = "0A9D5F8CA5FFA3CF:2F64746BA5AA8EED:071396C2E111147A:0000000000000004";
    let uuids = g(text);
    assert_eq!(uuids.current, 0x0A9D_5F8C_A5FF_A3CF);
    assert_eq!(uuids.history, [0x0713_96C2_E111_147A, 4]);
    assert_eq!(uuids.to_string(), text);
    assert_eq!(g("4:0:0:0"), GenerationUuids::just_created());
    assert_eq!(g("a:B:c:D").to_array(), [0xa, 0xb, 0xc, 0xd]);
}

#[test]
fn malformed_uuid_sets_are_rejected() {
    for bad in [
        "",
        "1:2:3",
        "1:2:3:4:5",
        "1::3:4",
        "x:2:3:4",
        "+1:2:3:4",
        "11112222333344445:0:0:0",
    ] {
        assert!(
            matches!(bad.parse::<GenerationUuids>(), Err(UuidError::Parse { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn superblock_uuids_convert_both_ways() {
    use crate::meta::{AlGeometry, Layout, Placement};
    let layout =
        Layout::for_create(Placement::Internal, 64 << 20, AlGeometry::DEFAULT).expect("layout");
    let mut sb = SuperblockV08::new_created(&layout);
    assert_eq!(
        GenerationUuids::from(sb.uuids),
        GenerationUuids::just_created()
    );

    let uuids = g("CFE1C566185B7729:0A9D5F8CA5FFA3CF:2F65746BA5AA8EED:2F64746BA5AA8EED");
    sb.uuids = uuids.into();
    let back = SuperblockV08::parse(&sb.encode()).expect("parses");
    assert_eq!(GenerationUuids::from(back.uuids), uuids);
    assert_eq!(
        Uuids::from(uuids),
        Uuids {
            current: uuids.current,
            bitmap: uuids.bitmap,
            history: uuids.history
        }
    );
    let array: [u64; 4] = uuids.into();
    assert_eq!(GenerationUuids::from(array), uuids);
}

#[test]
fn p_uuids_words_round_trip() {
    let words = [1, 2, 3, 4, 2048, 2];
    let i = UuidInfo::from_wire(words);
    assert_eq!(i.uuids, GenerationUuids::from_array([1, 2, 3, 4]));
    assert_eq!(i.dirty_bits, 2048);
    assert!(i.flags.crashed_primary());
    assert!(!i.flags.discard_my_data());
    assert_eq!(i.to_wire(), words);
}

#[test]
fn flags_have_the_p_uuids_values() {
    assert_eq!(UuidFlags::DISCARD_MY_DATA.bits(), 1);
    assert_eq!(UuidFlags::CRASHED_PRIMARY.bits(), 2);
    assert_eq!(UuidFlags::INCONSISTENT.bits(), 4);
    assert_eq!(UuidFlags::SKIP_INITIAL_SYNC.bits(), 8);
    let mut f = UuidFlags::DISCARD_MY_DATA | UuidFlags::SKIP_INITIAL_SYNC;
    assert!(f.contains(UuidFlags::SKIP_INITIAL_SYNC));
    assert!(!f.contains(UuidFlags::CRASHED_PRIMARY));
    f |= UuidFlags::CRASHED_PRIMARY;
    assert_eq!(f.bits(), 11);
}

#[test]
fn state_enums_use_the_84_wire_numbers() {
    for v in 0..=8u8 {
        assert_eq!(DiskState::from_wire(v).expect("known").wire(), v);
    }
    assert_eq!(DiskState::from_wire(9), None);
    assert_eq!(DiskState::UpToDate.wire(), 8);
    assert_eq!(DiskState::Inconsistent.wire(), 4);
    assert!(DiskState::Consistent > DiskState::DUnknown);
    for v in 0..=2u8 {
        assert_eq!(Role::from_wire(v).expect("known").wire(), v);
    }
    assert_eq!(Role::from_wire(3), None);
}

#[test]
fn policies_use_drbd_net_wire_numbers_and_names() {
    // The numbering of drbd-net's handshake::asb.
    let expected = [
        "disconnect",
        "discard-younger-primary",
        "discard-older-primary",
        "discard-zero-changes",
        "discard-least-changes",
        "discard-local",
        "discard-remote",
        "consensus",
        "discard-secondary",
        "call-pri-lost-after-sb",
        "violently-as0p",
    ];
    for (n, name) in expected.iter().enumerate() {
        let p = AfterSbPolicy::from_wire(n as u32).expect("known");
        assert_eq!(p.wire(), n as u32);
        assert_eq!(p.name(), *name);
        assert_eq!(AfterSbPolicy::from_name(name), Some(p));
    }
    assert_eq!(AfterSbPolicy::from_wire(11), None);
    assert_eq!(
        AfterSbPolicy::DiscardLocal.mirrored(),
        AfterSbPolicy::DiscardRemote
    );
    assert_eq!(
        AfterSbPolicy::Consensus.mirrored(),
        AfterSbPolicy::Consensus
    );
    for p in [
        RrConflict::Disconnect,
        RrConflict::CallPriLost,
        RrConflict::Violently,
    ] {
        assert_eq!(RrConflict::from_wire(p.wire()), Some(p));
        assert_eq!(RrConflict::from_name(p.name()), Some(p));
    }
    assert_eq!(RrConflict::CallPriLost.wire(), 9);
    assert_eq!(RrConflict::Violently.wire(), 10);
}

#[test]
fn policy_validation_follows_the_primary_count() {
    assert_eq!(SplitBrainPolicy::default().validate(), Ok(()));
    let capture = SplitBrainPolicy {
        after_sb_0pri: AfterSbPolicy::DiscardZeroChanges,
        after_sb_1pri: AfterSbPolicy::DiscardSecondary,
        ..SplitBrainPolicy::default()
    };
    assert_eq!(capture.validate(), Ok(()));
    let bad = SplitBrainPolicy {
        after_sb_2pri: AfterSbPolicy::Consensus,
        ..SplitBrainPolicy::default()
    };
    assert_eq!(
        bad.validate(),
        Err(UuidError::InvalidPolicy {
            primaries: 2,
            policy: AfterSbPolicy::Consensus
        })
    );
    // Same sets as the config parser's value lists.
    let valid = |n| {
        AfterSbPolicy::all()
            .into_iter()
            .filter(|p| p.valid_for(n))
            .count()
    };
    assert_eq!((valid(0), valid(1), valid(2)), (7, 5, 3));
}

// ------------------------------------------------------------------------------------------
// DRBD's integer coding
// ------------------------------------------------------------------------------------------

#[test]
fn relations_map_to_drbds_integers() {
    let table = [
        (Relation::Equal, 0),
        (Relation::SyncSource { full: false }, 1),
        (Relation::SyncSource { full: true }, 2),
        (Relation::SyncTarget { full: false }, -1),
        (Relation::SyncTarget { full: true }, -2),
        (
            Relation::SplitBrain {
                auto_recoverable: true,
            },
            100,
        ),
        (
            Relation::SplitBrain {
                auto_recoverable: false,
            },
            -100,
        ),
        (Relation::Unrelated, -1000),
        (
            Relation::NeedsProtocol {
                version: 91,
                feature_flags: 0,
            },
            -1091,
        ),
        (
            Relation::NeedsProtocol {
                version: 96,
                feature_flags: 0,
            },
            -1096,
        ),
        // Rule 41: -(0x10000 | 101 | FF_WSAME << 8).
        (
            Relation::NeedsProtocol {
                version: 101,
                feature_flags: 4,
            },
            -0x10465,
        ),
    ];
    for (relation, value) in table {
        assert_eq!(relation.to_drbd(), value, "{relation:?}");
        assert_eq!(Relation::from_drbd(value), Some(relation), "{value}");
    }
    for unused in [3, -3, 99, 101, -99, -999, 1000, -0x20001] {
        assert_eq!(Relation::from_drbd(unused), None, "{unused}");
    }
}

// ------------------------------------------------------------------------------------------
// Every compare rule
// ------------------------------------------------------------------------------------------

struct Case {
    name: &'static str,
    local: UuidInfo,
    peer: UuidInfo,
    ctx: CompareContext,
    rule: u32,
    value: i32,
}

fn case(
    name: &'static str,
    local: UuidInfo,
    peer: UuidInfo,
    ctx: CompareContext,
    rule: u32,
    value: i32,
) -> Case {
    Case {
        name,
        local,
        peer,
        ctx,
        rule,
        value,
    }
}

#[test]
fn every_rule_is_reachable_with_its_result() {
    let crashed = UuidFlags::CRASHED_PRIMARY;
    let ctx = ctx101();
    let cases = [
        case(
            "10 both just created",
            u(4, 0, 0, 0),
            u(4, 0, 0, 0),
            ctx,
            10,
            0,
        ),
        case(
            "10 primary bit masked",
            u(5, 0, 0, 0),
            u(4, 0, 0, 0),
            ctx,
            10,
            0,
        ),
        case(
            "20 I am just created",
            u(4, 0, 0, 0),
            u(A, 4, 0, 0),
            ctx,
            20,
            -2,
        ),
        case(
            "20 my current is 0",
            u(0, 0, 0, 0),
            u(A, 0, 0, 0),
            ctx,
            20,
            -2,
        ),
        case(
            "30 peer just created",
            u(A, 4, 0, 0),
            u(4, 0, 0, 0),
            ctx,
            30,
            2,
        ),
        case(
            "30 peer current 0",
            u(A, 0, 0, 0),
            u(0, 0, 0, 0),
            ctx,
            30,
            2,
        ),
        case(
            "30: rules 34-37 need protocol 91",
            u(A, B, C, D),
            u(A, 0, B, C),
            ctx_apv(90),
            30,
            -1091,
        ),
        case(
            "30: rules 35/37 need protocol 91",
            u(A, 0, B, C),
            u(A, B, C, D),
            ctx_apv(86),
            30,
            -1091,
        ),
        case(
            "34 missed resync finished",
            u(A, B, C, D),
            u(A, 0, B, C),
            ctx,
            34,
            1,
        ),
        case(
            "35 peer missed resync end",
            u(A, 0, B, C),
            u(A, B, C, D),
            ctx,
            35,
            -1,
        ),
        case(
            "36 peer lost the sync uuid",
            u(A, B, C, D),
            u(A, 0, E, F),
            ctx,
            36,
            1,
        ),
        case(
            "37 I lost the sync uuid",
            u(A, 0, E, F),
            u(A, B, C, D),
            ctx,
            37,
            -1,
        ),
        case(
            "40 same, nobody crashed",
            u(A, 0, B, C),
            u(A | 1, 0, B, C),
            ctx,
            40,
            0,
        ),
        case(
            "40 same bitmap uuid",
            u(A, B, C, D),
            u(A, B | 1, C, D),
            ctx,
            40,
            0,
        ),
        case(
            "40 I crashed as primary",
            flagged(u(A, 0, B, C), crashed),
            u(A, 0, B, C),
            ctx,
            40,
            1,
        ),
        case(
            "40 peer crashed as primary",
            u(A, 0, B, C),
            flagged(u(A, 0, B, C), crashed),
            ctx,
            40,
            -1,
        ),
        case(
            "40 both crashed, I do not resolve conflicts",
            flagged(u(A, 0, B, C), crashed),
            flagged(u(A, 0, B, C), crashed),
            ctx,
            40,
            1,
        ),
        case(
            "40 both crashed, I resolve conflicts",
            flagged(u(A, 0, B, C), crashed),
            flagged(u(A, 0, B, C), crashed),
            CompareContext {
                resolve_conflicts: true,
                ..ctx
            },
            40,
            -1,
        ),
        case(
            "41 without FF_WSAME",
            flagged(u(A, 0, B, C), crashed),
            u(A, 0, B, C),
            CompareContext {
                feature_flags: 0x3,
                ..with_roles(ctx, Role::Primary, Role::Secondary)
            },
            41,
            -0x10465,
        ),
        case(
            "41 I am primary",
            u(A, 0, B, C),
            flagged(u(A, 0, B, C), crashed),
            with_roles(ctx, Role::Primary, Role::Secondary),
            41,
            1,
        ),
        case(
            "41 peer is primary",
            flagged(u(A, 0, B, C), crashed),
            u(A, 0, B, C),
            with_roles(ctx, Role::Secondary, Role::Primary),
            41,
            -1,
        ),
        case(
            "41 both primary",
            flagged(u(A, 0, B, C), crashed),
            u(A, 0, B, C),
            with_roles(ctx, Role::Primary, Role::Primary),
            41,
            -100,
        ),
        case(
            "50 peer's bitmap is my current",
            u(A, 0, C, D),
            u(B, A | 1, C, D),
            ctx,
            50,
            -1,
        ),
        case(
            "51 lost P_SYNC_UUID (offset test)",
            u(A, 0, C, D),
            u(B, A + UUID_NEW_BM_OFFSET, A, G),
            ctx,
            51,
            -1,
        ),
        case(
            "51 lost P_SYNC_UUID (history test, apv 95)",
            u(A, 0, C, D),
            u(B, E, A, C),
            ctx_apv(95),
            51,
            -1,
        ),
        case(
            "51 needs protocol 91",
            u(A, 0, C, D),
            u(B, E, A, C),
            ctx_apv(90),
            51,
            -1091,
        ),
        case(
            "60 my current in peer h0",
            u(A, 0, C, D),
            u(B, E, A, G),
            ctx,
            60,
            -2,
        ),
        case(
            "60 my current in peer h1",
            u(A, 0, C, D),
            u(B, E, F, A),
            ctx,
            60,
            -2,
        ),
        case(
            "70 my bitmap is peer's current",
            u(A, B | 1, C, D),
            u(B, 0, C, D),
            ctx,
            70,
            1,
        ),
        case(
            "71 my P_SYNC_UUID got lost (offset test)",
            u(A, B + UUID_NEW_BM_OFFSET, B, C),
            u(B, 0, G, H),
            ctx,
            71,
            1,
        ),
        case(
            "71 my P_SYNC_UUID got lost (history test, apv 91)",
            u(A, E, B, C),
            u(B, 0, C, D),
            ctx_apv(91),
            71,
            1,
        ),
        case(
            "71 needs protocol 91",
            u(A, E, B, C),
            u(B, 0, C, D),
            ctx_apv(89),
            71,
            -1091,
        ),
        case(
            "80 peer's current in my h0",
            u(A, E, B, G),
            u(B, 0, F, D),
            ctx,
            80,
            2,
        ),
        case(
            "80 peer's current in my h1",
            u(A, E, G, B),
            u(B, 0, F, D),
            ctx,
            80,
            2,
        ),
        case(
            "90 both diverged from one bitmap",
            u(A, C | 1, D, E),
            u(B, C, F, G),
            ctx,
            90,
            100,
        ),
        case(
            "100 related through history",
            u(A, E, C, D),
            u(B, F, D, G),
            ctx,
            100,
            -100,
        ),
        case(
            "100 empty histories count as related",
            u(A, E, 0, 0),
            u(B, F, 0, 0),
            ctx,
            100,
            -100,
        ),
        case(
            "unrelated (reported as rule 100)",
            u(A, E, C, D),
            u(B, F, G, H),
            ctx,
            100,
            -1000,
        ),
    ];
    let mut covered = std::collections::BTreeSet::new();
    for c in &cases {
        let got = compare(&c.local, &c.peer, &c.ctx);
        assert_eq!((got.rule, got.to_drbd()), (c.rule, c.value), "{}", c.name);
        covered.insert(c.rule);
    }
    let all_rules = [
        10, 20, 30, 34, 35, 36, 37, 40, 41, 50, 51, 60, 70, 71, 80, 90, 100,
    ];
    assert_eq!(covered.into_iter().collect::<Vec<_>>(), all_rules);
}

#[test]
fn rule_34_repairs_my_uuids_like_a_finished_resync() {
    let got = compare(&u(A, B, C, D), &u(A, 0, B, C), &ctx101());
    let repaired = GenerationUuids::from_array([A, 0, B, C]);
    assert_eq!(
        got.correction,
        Some(Correction::LocalMissedResyncFinished { local: repaired })
    );
    assert_eq!(got.correction.and_then(|c| c.peer()), None);
}

#[test]
fn rule_35_repairs_the_copy_of_the_peers_uuids() {
    let got = compare(&u(A, 0, B, C), &u(A, B, C, D), &ctx101());
    let repaired = GenerationUuids::from_array([A, 0, B, C]);
    assert_eq!(
        got.correction,
        Some(Correction::PeerMissedResyncFinished { peer: repaired })
    );
    assert_eq!(got.correction.and_then(|c| c.local()), None);
}

#[test]
fn rules_51_and_71_undo_the_last_sync_start() {
    let peer = u(B, A + UUID_NEW_BM_OFFSET, A, G);
    let got = compare(&u(A, 0, C, D), &peer, &ctx101());
    let undone = GenerationUuids::from_array([B, A, G, G]);
    assert_eq!(
        got.correction,
        Some(Correction::PeerSyncUuidLost { peer: undone })
    );

    let local = u(A, B + UUID_NEW_BM_OFFSET, B, C);
    let got = compare(&local, &u(B, 0, G, H), &ctx101());
    let undone = GenerationUuids::from_array([A, B, C, C]);
    assert_eq!(
        got.correction,
        Some(Correction::LocalSyncUuidLost { local: undone })
    );
    // Before protocol 91 nothing is repaired.
    let got = compare(&u(A, E, B, C), &u(B, 0, C, D), &ctx_apv(90));
    assert_eq!(got.correction, None);
}

#[test]
fn rule_51_without_a_visible_sync_step_falls_through() {
    // My current is the peer's h0, but the peer's bitmap is not h0 + offset (apv 96).
    let got = compare(&u(A, 0, C, D), &u(B, E, A, F), &ctx_apv(96));
    assert_eq!((got.rule, got.to_drbd()), (60, -2));
    // The same pair at apv 95 checks my h0 against the peer's h1 instead.
    let got = compare(&u(A, 0, F, D), &u(B, E, A, F), &ctx_apv(95));
    assert_eq!((got.rule, got.to_drbd()), (51, -1));
}

// ------------------------------------------------------------------------------------------
// Symmetry
// ------------------------------------------------------------------------------------------

/// A small pool, so that slots collide often and every rule gets exercised.
fn pooled_uuid() -> impl Strategy<Value = u64> {
    prop::sample::select(vec![
        0,
        1,
        UUID_JUST_CREATED,
        UUID_JUST_CREATED | 1,
        A,
        A | 1,
        B,
        B | 1,
        A + UUID_NEW_BM_OFFSET,
        (A + UUID_NEW_BM_OFFSET) | 1,
        C,
        C + UUID_NEW_BM_OFFSET,
    ])
}

fn any_info() -> impl Strategy<Value = UuidInfo> {
    (
        [pooled_uuid(), pooled_uuid(), pooled_uuid(), pooled_uuid()],
        0u64..4,
        0u64..16,
    )
        .prop_map(|(uuids, bits, flags)| {
            UuidInfo::new(GenerationUuids::from_array(uuids), bits, UuidFlags(flags))
        })
}

fn any_role() -> impl Strategy<Value = Role> {
    prop::sample::select(vec![Role::Primary, Role::Secondary])
}

fn any_context() -> impl Strategy<Value = CompareContext> {
    (
        prop::sample::select(vec![86u32, 89, 90, 91, 95, 96, 100, 101]),
        prop::sample::select(vec![0u32, 0x3, 0x4, 0xf]),
        any_role(),
        any_role(),
        any::<bool>(),
    )
        .prop_map(
            |(protocol_version, feature_flags, local_role, peer_role, rc)| CompareContext {
                protocol_version,
                feature_flags,
                local_role,
                peer_role,
                resolve_conflicts: rc,
            },
        )
}

/// The rule the peer must report when this node reports `rule` with `relation`.
fn mirror_rule(rule: u32, relation: Relation) -> u32 {
    match (rule, relation) {
        // The protocol-91 requirement of rules 34-37 is reported as rule 30 on both sides.
        (30, Relation::NeedsProtocol { .. }) => 30,
        (20, _) => 30,
        (30, _) => 20,
        (34, _) => 35,
        (35, _) => 34,
        (36, _) => 37,
        (37, _) => 36,
        (50, _) => 70,
        (70, _) => 50,
        (51, _) => 71,
        (71, _) => 51,
        (60, _) => 80,
        (80, _) => 60,
        (r, _) => r,
    }
}

/// Whether `a` sees a "become SyncTarget" condition against `b` (rules 50, 51, 60), once the
/// currents differ. Written independently of [`compare`] as the oracle of the property.
fn target_condition(a: &GenerationUuids, b: &GenerationUuids, apv: u32) -> bool {
    let cur = masked(a.current);
    let rule_50 = cur == masked(b.bitmap);
    let rule_51 = cur == masked(b.history[0])
        && if apv >= 96 {
            masked(b.history[0]).wrapping_add(UUID_NEW_BM_OFFSET) == masked(b.bitmap)
        } else {
            masked(a.history[0]) == masked(b.history[1])
        };
    let rule_60 = b.history.iter().any(|&h| masked(h) == cur);
    rule_50 || rule_51 || rule_60
}

/// Classifies a pair: `Some(reason)` for the documented asymmetric situations.
fn asymmetry(a: &UuidInfo, b: &UuidInfo, apv: u32) -> Option<&'static str> {
    let (ca, cb) = (masked(a.uuids.current), masked(b.uuids.current));
    if ca == 0 && cb == 0 {
        return Some("both currents zero");
    }
    let early = |c| c == 0 || c == UUID_JUST_CREATED;
    let crossed = ca != cb
        && !early(ca)
        && !early(cb)
        && target_condition(&a.uuids, &b.uuids, apv)
        // a's source conditions are b's target conditions.
        && target_condition(&b.uuids, &a.uuids, apv);
    crossed.then_some("crossed lineage")
}

/// The strategies behind the symmetry property reach every rule and both asymmetric
/// situations, so the property is not vacuous.
#[test]
fn symmetry_strategies_reach_every_rule_and_both_asymmetries() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = (any_info(), any_info(), any_context());
    let mut rules = std::collections::BTreeSet::new();
    let mut classes = std::collections::BTreeSet::new();
    let mut corrections = 0;
    for _ in 0..4000 {
        let (a, b, ctx) = strategy.new_tree(&mut runner).expect("value").current();
        let c = compare(&a, &b, &ctx);
        rules.insert(c.rule);
        corrections += usize::from(c.correction.is_some());
        classes.insert(asymmetry(&a, &b, ctx.protocol_version).unwrap_or("symmetric"));
    }
    let all_rules = [
        10, 20, 30, 34, 35, 36, 37, 40, 41, 50, 51, 60, 70, 71, 80, 90, 100,
    ];
    assert_eq!(rules.into_iter().collect::<Vec<_>>(), all_rules);
    assert_eq!(
        classes.into_iter().collect::<Vec<_>>(),
        ["both currents zero", "crossed lineage", "symmetric"]
    );
    assert!(corrections >= 10, "{corrections}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// compare(b, a) mirrors compare(a, b) (relation, rule and corrections), except in the two
    /// documented situations, where both nodes want to be SyncTarget.
    #[test]
    fn compare_is_symmetric_except_where_documented(
        a in any_info(),
        b in any_info(),
        ctx in any_context(),
    ) {
        let ab = compare(&a, &b, &ctx);
        let ba = compare(&b, &a, &ctx.mirrored());
        match asymmetry(&a, &b, ctx.protocol_version) {
            Some("both currents zero") => {
                prop_assert_eq!(ab.rule, 20);
                prop_assert_eq!(ba.rule, 20);
                prop_assert_eq!(ab.relation, Relation::SyncTarget { full: true });
                prop_assert_eq!(ba.relation, Relation::SyncTarget { full: true });
            }
            Some(_) => {
                // Each side finds one of its target rules first.
                prop_assert!(ab.to_drbd() < 0 && ba.to_drbd() < 0, "{:?} / {:?}", ab, ba);
                prop_assert!(matches!(ab.rule, 50 | 51 | 60), "{:?}", ab);
                prop_assert!(matches!(ba.rule, 50 | 51 | 60), "{:?}", ba);
            }
            None => {
                prop_assert_eq!(ba.relation, ab.relation.mirrored(), "{:?} / {:?}", ab, ba);
                prop_assert_eq!(ba.rule, mirror_rule(ab.rule, ab.relation));
                let ab_fix = ab.correction;
                let ba_fix = ba.correction;
                prop_assert_eq!(ab_fix.and_then(|c| c.local()), ba_fix.and_then(|c| c.peer()));
                prop_assert_eq!(ab_fix.and_then(|c| c.peer()), ba_fix.and_then(|c| c.local()));
            }
        }
    }

    /// Where the comparison is symmetric, two nodes running the whole handshake on mirrored
    /// inputs never both proceed into incompatible resyncs.
    #[test]
    fn handshakes_of_both_nodes_agree(
        a in any_info(),
        b in any_info(),
        ctx in any_context(),
        disks in (0usize..4, 0usize..4),
        policies in (0usize..7, 0usize..5, 0usize..3, 0usize..3, any::<bool>()),
    ) {
        prop_assume!(asymmetry(&a, &b, ctx.protocol_version).is_none());
        let disk = [
            DiskState::Inconsistent,
            DiskState::Outdated,
            DiskState::Consistent,
            DiskState::UpToDate,
        ];
        let pick = |n: u8, i: usize| {
            AfterSbPolicy::all().into_iter().filter(|p| p.valid_for(n)).nth(i).expect("in range")
        };
        let rr = [RrConflict::Disconnect, RrConflict::CallPriLost, RrConflict::Violently];
        let policy = SplitBrainPolicy {
            after_sb_0pri: pick(0, policies.0),
            after_sb_1pri: pick(1, policies.1),
            after_sb_2pri: pick(2, policies.2),
            rr_conflict: rr[policies.3],
            always_asbp: policies.4,
        };
        let mine = HandshakeInput {
            local: a,
            peer: b,
            context: ctx,
            local_disk: disk[disks.0],
            pending_disk: None,
            peer_disk: disk[disks.1],
            policy,
            can_demote: true,
            dry_run: false,
        };
        let theirs = HandshakeInput {
            local: b,
            peer: a,
            context: ctx.mirrored(),
            local_disk: disk[disks.1],
            peer_disk: disk[disks.0],
            policy: policy.mirrored(),
            ..mine
        };
        let (x, y) = (decide(&mine), decide(&theirs));
        if let (Some(rx), Some(ry)) = (x.resync(), y.resync()) {
            let complementary = match rx {
                Resync::None => ry == Resync::None,
                Resync::AsSource { full } => ry == Resync::AsTarget { full },
                Resync::AsTarget { full } => ry == Resync::AsSource { full },
            };
            prop_assert!(complementary, "{:?} / {:?}", x, y);
        }
    }

    #[test]
    fn display_and_parse_round_trip(uuids in any::<[u64; 4]>()) {
        let g = GenerationUuids::from_array(uuids);
        prop_assert_eq!(g.to_string().parse::<GenerationUuids>(), Ok(g));
    }
}

// ------------------------------------------------------------------------------------------
// UUID operations
// ------------------------------------------------------------------------------------------

/// Two nodes that completed a resync: same generation, no bitmap UUID.
fn synced_pair() -> (GenerationUuids, GenerationUuids) {
    let a = GenerationUuids::from_array([A, 0, B, C]);
    (a, a)
}

fn secondaries() -> CompareContext {
    ctx101()
}

#[test]
fn new_current_moves_the_old_current_into_the_bitmap() {
    let mut x = GenerationUuids::from_array([A | 1, 0, B, C]);
    assert_eq!(x.new_current(D | 1, Role::Secondary), None);
    assert_eq!(x.to_array(), [D, A | 1, B, C]);
    // With the bitmap already in use it is overwritten, not rotated.
    assert_eq!(x.new_current(E, Role::Primary), Some(A | 1));
    assert_eq!(x.to_array(), [E | 1, D, B, C]);
}

#[test]
fn promotion_draws_a_new_current_only_without_a_peer() {
    let (base, _) = synced_pair();

    let mut connected = base;
    assert!(!connected.promote(D, true, DiskState::UpToDate, false));
    assert_eq!(connected.to_array(), [A | 1, 0, B, C]);

    let mut alone = base;
    assert!(alone.promote(D, false, DiskState::DUnknown, false));
    assert_eq!(alone.to_array(), [D | 1, A, B, C]);

    let mut peer_failed = base;
    assert!(peer_failed.promote(D, true, DiskState::Failed, false));

    // Already diverged (bitmap in use): no second new current.
    let mut again = alone;
    assert!(!again.promote(E, false, DiskState::DUnknown, false));
    assert_eq!(again, alone);

    // Forced promotion always draws one.
    let mut forced = GenerationUuids::just_created();
    assert!(forced.promote(D, true, DiskState::Inconsistent, true));
    assert_eq!(forced.to_array(), [D | 1, UUID_JUST_CREATED, 0, 0]);

    forced.demote();
    assert_eq!(forced.current, D);
}

#[test]
fn promote_while_disconnected_then_reconnect_makes_that_node_sync_source() {
    let (mut a, b) = synced_pair();
    assert!(a.promote(D, false, DiskState::DUnknown, false));
    let ctx = with_roles(secondaries(), Role::Primary, Role::Secondary);
    let ai = UuidInfo::new(a, 10, UuidFlags::empty());
    let bi = UuidInfo::new(b, 0, UuidFlags::empty());

    let got = compare(&ai, &bi, &ctx);
    assert_eq!(
        (got.rule, got.relation),
        (70, Relation::SyncSource { full: false })
    );
    let got = compare(&bi, &ai, &ctx.mirrored());
    assert_eq!(
        (got.rule, got.relation),
        (50, Relation::SyncTarget { full: false })
    );
}

#[test]
fn both_promoting_while_disconnected_is_a_split_brain() {
    let (mut a, mut b) = synced_pair();
    assert!(a.promote(D, false, DiskState::DUnknown, false));
    assert!(b.promote(E, false, DiskState::DUnknown, false));
    let ctx = with_roles(secondaries(), Role::Primary, Role::Primary);
    let got = compare(
        &UuidInfo::new(a, 1, UuidFlags::empty()),
        &UuidInfo::new(b, 1, UuidFlags::empty()),
        &ctx,
    );
    assert_eq!(
        (got.rule, got.relation),
        (
            90,
            Relation::SplitBrain {
                auto_recoverable: true
            }
        )
    );
}

#[test]
fn a_completed_resync_leaves_equal_uuids() {
    let (mut source, mut target) = synced_pair();
    assert!(source.promote(D, false, DiskState::DUnknown, false));
    let handshake_view = source; // what the target received in P_UUIDS

    let sync_uuid = source.start_sync_source(0x1234);
    assert_eq!(sync_uuid, A + UUID_NEW_BM_OFFSET);
    assert_eq!(source.to_array(), [D | 1, sync_uuid, A, B]);

    target.adopt_sync_uuid(sync_uuid, Role::Secondary);
    assert_eq!(target.to_array(), [sync_uuid, 0, B, C]);

    source.finish_sync_source();
    target.finish_sync_target(&handshake_view, Role::Secondary);
    assert_eq!(source.to_array(), [D | 1, 0, sync_uuid, A]);
    assert_eq!(target.to_array(), [D, 0, sync_uuid, A]);

    let got = compare(
        &UuidInfo::new(source, 0, UuidFlags::empty()),
        &UuidInfo::new(target, 0, UuidFlags::empty()),
        &with_roles(secondaries(), Role::Primary, Role::Secondary),
    );
    assert_eq!((got.rule, got.relation), (40, Relation::Equal));
}

#[test]
fn sync_uuid_is_random_when_the_bitmap_uuid_is_empty_or_just_created() {
    for bitmap in [0, UUID_JUST_CREATED] {
        let mut s = GenerationUuids::from_array([A, bitmap, B, C]);
        assert_eq!(s.start_sync_source(E), E);
        let expect_history = if bitmap == 0 { [B, C] } else { [bitmap, B] };
        assert_eq!(s.history, expect_history);
    }
    // The primary bit of the old bitmap UUID carries over into the stepped one.
    let mut s = GenerationUuids::from_array([A, B | 1, C, D]);
    assert_eq!(s.start_sync_source(E), (B | 1) + UUID_NEW_BM_OFFSET);
}

#[test]
fn a_source_that_missed_the_resync_end_is_repaired_by_rule_34() {
    let (mut source, mut target) = synced_pair();
    source.promote(D, false, DiskState::DUnknown, false);
    let view = source;
    let sync_uuid = source.start_sync_source(0);
    target.adopt_sync_uuid(sync_uuid, Role::Secondary);
    target.finish_sync_target(&view, Role::Secondary);
    // The source crashed before it cleared its bitmap UUID.
    let got = compare(
        &UuidInfo::new(source, 0, UuidFlags::empty()),
        &UuidInfo::new(target, 0, UuidFlags::empty()),
        &secondaries(),
    );
    assert_eq!(got.rule, 34);
    let mut finished = source;
    finished.finish_sync_source();
    assert_eq!(got.correction.and_then(|c| c.local()), Some(finished));

    let got = compare(
        &UuidInfo::new(target, 0, UuidFlags::empty()),
        &UuidInfo::new(source, 0, UuidFlags::empty()),
        &secondaries(),
    );
    assert_eq!((got.rule, got.to_drbd()), (35, -1));
    assert_eq!(got.correction.and_then(|c| c.peer()), Some(finished));
}

#[test]
fn a_lost_sync_uuid_is_undone_by_rules_71_and_51() {
    // Source A diverged and started a resync, but P_SYNC_UUID never arrived at B.
    let (mut source, target) = synced_pair();
    source.promote(D, false, DiskState::DUnknown, false);
    let before = source;
    source.start_sync_source(0);
    let si = UuidInfo::new(source, 3, UuidFlags::empty());
    let ti = UuidInfo::new(target, 0, UuidFlags::empty());

    let got = compare(&si, &ti, &secondaries());
    assert_eq!((got.rule, got.to_drbd()), (71, 1));
    let undone = got
        .correction
        .and_then(|c| c.local())
        .expect("local repair");
    assert_eq!(undone.current, before.current);
    assert_eq!(undone.bitmap, before.bitmap);
    assert_eq!(undone.history[0], before.history[0]);

    let got = compare(&ti, &si, &secondaries());
    assert_eq!((got.rule, got.to_drbd()), (51, -1));
    assert_eq!(got.correction.and_then(|c| c.peer()), Some(undone));
}

#[test]
fn new_current_uuid_by_user_standalone() {
    let mut x = GenerationUuids::from_array([A, B, C, D]);
    let done = x.new_current_by_user(E, Role::Secondary, true, LinkState::StandAlone);
    assert_eq!(done, Ok(NewCurrentUuid::Generated { clear_bitmap: true }));
    // The bitmap UUID went into history first, then the old current became the bitmap UUID.
    assert_eq!(x.to_array(), [E, A, B, C]);

    for link in [
        LinkState::Other,
        LinkState::Connected {
            protocol_version: 101,
        },
    ] {
        let mut y = GenerationUuids::from_array([A, 0, C, D]);
        assert_eq!(
            y.new_current_by_user(E, Role::Secondary, true, link),
            Err(UuidError::Connected)
        );
        assert_eq!(y.to_array(), [A, 0, C, D], "unchanged on error");
    }
}

#[test]
fn skip_initial_sync_on_a_fresh_pair() {
    let link = LinkState::Connected {
        protocol_version: 101,
    };
    let mut a = GenerationUuids::just_created();
    let mut b = GenerationUuids::just_created();
    let done = a
        .new_current_by_user(E, Role::Secondary, true, link)
        .expect("allowed");
    let NewCurrentUuid::SkipInitialSync { announce } = done else {
        panic!("expected skip-initial-sync, got {done:?}");
    };
    assert_eq!(announce.to_array(), [E, UUID_JUST_CREATED, 0, 0]);
    assert_eq!(a.to_array(), [E, 0, 0, 0]);

    let packet = UuidInfo::new(announce, 0, UuidFlags::SKIP_INITIAL_SYNC);
    // Not without the flag, not below protocol 90, not when not "just created".
    let mut other = b;
    let plain = UuidInfo::new(announce, 0, UuidFlags::empty());
    assert!(!other.accept_skip_initial_sync(&plain, Role::Secondary, link));
    let old = LinkState::Connected {
        protocol_version: 89,
    };
    assert!(!other.accept_skip_initial_sync(&packet, Role::Secondary, old));
    let mut used = GenerationUuids::from_array([A, 0, 0, 0]);
    assert!(!used.accept_skip_initial_sync(&packet, Role::Secondary, link));
    assert_eq!(other, GenerationUuids::just_created());

    assert!(b.accept_skip_initial_sync(&packet, Role::Secondary, link));
    assert_eq!(b, a);
    let got = compare(
        &UuidInfo::new(a, 0, UuidFlags::empty()),
        &UuidInfo::new(b, 0, UuidFlags::empty()),
        &secondaries(),
    );
    assert_eq!((got.rule, got.relation), (40, Relation::Equal));

    // Without --clear-bitmap a connected node is refused.
    let mut c = GenerationUuids::just_created();
    assert_eq!(
        c.new_current_by_user(E, Role::Secondary, false, link),
        Err(UuidError::Connected)
    );
}

#[test]
fn losing_the_peers_data() {
    use DiskState::*;
    assert!(lost_peer_data(UpToDate, DUnknown));
    assert!(lost_peer_data(UpToDate, Failed));
    assert!(lost_peer_data(Inconsistent, Outdated));
    assert!(lost_peer_data(Consistent, Diskless));
    assert!(!lost_peer_data(Outdated, DUnknown));
    assert!(!lost_peer_data(DUnknown, Diskless));
    assert!(!lost_peer_data(UpToDate, Inconsistent));

    let (base, _) = synced_pair();
    let mut x = base;
    let act = x.on_peer_data_lost(D, Role::Secondary, Role::Unknown, UpToDate, false);
    assert_eq!(act, PeerLossAction::Nothing);
    let act = x.on_peer_data_lost(D, Role::Primary, Role::Unknown, Consistent, false);
    assert_eq!(act, PeerLossAction::Nothing);
    let act = x.on_peer_data_lost(D, Role::Primary, Role::Unknown, UpToDate, true);
    assert_eq!(act, PeerLossAction::DeferredUntilResume);
    assert_eq!(x, base);
    // A Secondary whose (connected) peer is Primary also diverges when the peer loses its disk.
    let act = x.on_peer_data_lost(D, Role::Secondary, Role::Primary, UpToDate, false);
    assert_eq!(act, PeerLossAction::NewCurrentUuid);
    assert_eq!(x.to_array(), [D, A, B, C]);
    // Only once: the bitmap is now in use.
    let act = x.on_peer_data_lost(E, Role::Primary, Role::Unknown, UpToDate, false);
    assert_eq!(act, PeerLossAction::Nothing);
}

// ------------------------------------------------------------------------------------------
// The sync handshake and the after-split-brain policies
// ------------------------------------------------------------------------------------------

fn input(local: UuidInfo, peer: UuidInfo) -> HandshakeInput {
    HandshakeInput {
        local,
        peer,
        context: ctx101(),
        local_disk: DiskState::UpToDate,
        pending_disk: None,
        peer_disk: DiskState::UpToDate,
        policy: SplitBrainPolicy::default(),
        can_demote: true,
        dry_run: false,
    }
}

/// A rule-90 pair (same bitmap base, different currents). `self_pri`/`peer_pri` set bit 0 of
/// the bitmap UUIDs (Primary when the split happened), `ch_*` are the bitmap weights.
fn split(self_pri: bool, peer_pri: bool, ch_self: u64, ch_peer: u64) -> HandshakeInput {
    let bit = |p: bool| u64::from(p);
    let mut local = u(A, C | bit(self_pri), D, E);
    let mut peer = u(B, C | bit(peer_pri), D, E);
    local.dirty_bits = ch_self;
    peer.dirty_bits = ch_peer;
    input(local, peer)
}

fn with_policy(
    mut i: HandshakeInput,
    p0: AfterSbPolicy,
    p1: AfterSbPolicy,
    p2: AfterSbPolicy,
) -> HandshakeInput {
    i.policy.after_sb_0pri = p0;
    i.policy.after_sb_1pri = p1;
    i.policy.after_sb_2pri = p2;
    i
}

fn p0(i: HandshakeInput, p: AfterSbPolicy) -> HandshakeInput {
    with_policy(i, p, AfterSbPolicy::Disconnect, AfterSbPolicy::Disconnect)
}

fn roles(mut i: HandshakeInput, local: Role, peer: Role) -> HandshakeInput {
    i.context = with_roles(i.context, local, peer);
    i
}

const SOURCE: HandshakeOutcome = HandshakeOutcome::Proceed(Resync::AsSource { full: false });
const TARGET: HandshakeOutcome = HandshakeOutcome::Proceed(Resync::AsTarget { full: false });
const SPLIT_BRAIN: HandshakeOutcome = HandshakeOutcome::Disconnect(DisconnectReason::SplitBrain);

#[test]
fn after_sb_0pri_policies() {
    use AfterSbPolicy::*;
    let rc = |mut i: HandshakeInput| {
        i.context.resolve_conflicts = true;
        i
    };
    let table: Vec<(&str, HandshakeInput, HandshakeOutcome)> = vec![
        (
            "disconnect",
            p0(split(false, false, 1, 1), Disconnect),
            SPLIT_BRAIN,
        ),
        // Younger primary: the node that was not Primary at the split loses... its peer was.
        (
            "younger: peer was primary",
            p0(split(false, true, 9, 1), DiscardYoungerPrimary),
            TARGET,
        ),
        (
            "younger: I was primary",
            p0(split(true, false, 1, 9), DiscardYoungerPrimary),
            SOURCE,
        ),
        (
            "younger undecided: zero changes",
            p0(split(true, true, 0, 5), DiscardYoungerPrimary),
            TARGET,
        ),
        (
            "younger undecided: least changes",
            p0(split(false, false, 7, 5), DiscardYoungerPrimary),
            SOURCE,
        ),
        (
            "older: peer was primary",
            p0(split(false, true, 1, 9), DiscardOlderPrimary),
            SOURCE,
        ),
        (
            "older: I was primary",
            p0(split(true, false, 9, 1), DiscardOlderPrimary),
            TARGET,
        ),
        (
            "older undecided: least changes",
            p0(split(true, true, 3, 5), DiscardOlderPrimary),
            TARGET,
        ),
        (
            "zero: both zero, no RC",
            p0(split(false, false, 0, 0), DiscardZeroChanges),
            SOURCE,
        ),
        (
            "zero: both zero, RC",
            rc(p0(split(false, false, 0, 0), DiscardZeroChanges)),
            TARGET,
        ),
        (
            "zero: peer zero",
            p0(split(false, false, 5, 0), DiscardZeroChanges),
            SOURCE,
        ),
        (
            "zero: mine zero",
            p0(split(false, false, 0, 5), DiscardZeroChanges),
            TARGET,
        ),
        (
            "zero: both wrote",
            p0(split(false, false, 1, 5), DiscardZeroChanges),
            SPLIT_BRAIN,
        ),
        (
            "least: fewer",
            p0(split(false, false, 3, 5), DiscardLeastChanges),
            TARGET,
        ),
        (
            "least: more",
            p0(split(false, false, 5, 3), DiscardLeastChanges),
            SOURCE,
        ),
        (
            "least: equal, no RC",
            p0(split(false, false, 4, 4), DiscardLeastChanges),
            SOURCE,
        ),
        (
            "least: equal, RC",
            rc(p0(split(false, false, 4, 4), DiscardLeastChanges)),
            TARGET,
        ),
        ("local", p0(split(false, false, 1, 9), DiscardLocal), TARGET),
        (
            "remote",
            p0(split(false, false, 9, 1), DiscardRemote),
            SOURCE,
        ),
    ];
    for (name, i, expected) in table {
        let d = decide(&i);
        assert_eq!(d.comparison.rule, 90, "{name}");
        assert_eq!(d.outcome, expected, "{name}");
        assert_eq!(
            d.handlers.first(),
            Some(&Handler::InitialSplitBrain),
            "{name}"
        );
        assert!(!d.policy_error, "{name}");
        match expected {
            HandshakeOutcome::Proceed(r) => {
                let survivor = if matches!(r, Resync::AsSource { .. }) {
                    Side::Local
                } else {
                    Side::Peer
                };
                assert_eq!(
                    d.split_brain,
                    Some(SplitBrainResolution::Automatic {
                        primaries: 0,
                        survivor,
                        full_sync: false
                    }),
                    "{name}"
                );
                assert_eq!(d.handlers, [Handler::InitialSplitBrain], "{name}");
            }
            _ => {
                assert_eq!(
                    d.split_brain,
                    Some(SplitBrainResolution::Unresolved),
                    "{name}"
                );
                assert_eq!(
                    d.handlers,
                    [Handler::InitialSplitBrain, Handler::SplitBrain],
                    "{name}"
                );
            }
        }
    }
}

#[test]
fn policy_configuration_errors_leave_the_split_brain_unresolved() {
    use AfterSbPolicy::*;
    let cases = [
        (p0(split(false, false, 1, 2), Consensus), "0pri consensus"),
        (
            roles(
                with_policy(
                    split(false, false, 1, 2),
                    DiscardLocal,
                    DiscardLocal,
                    Disconnect,
                ),
                Role::Primary,
                Role::Secondary,
            ),
            "1pri discard-local",
        ),
        (
            roles(
                with_policy(
                    split(false, false, 1, 2),
                    DiscardLocal,
                    Disconnect,
                    DiscardSecondary,
                ),
                Role::Primary,
                Role::Primary,
            ),
            "2pri discard-secondary",
        ),
    ];
    for (i, name) in cases {
        let d = decide(&i);
        assert!(d.policy_error, "{name}");
        assert_eq!(d.outcome, SPLIT_BRAIN, "{name}");
    }
}

#[test]
fn after_sb_1pri_policies() {
    use AfterSbPolicy::*;
    let one = |i: HandshakeInput, local_primary: bool| {
        if local_primary {
            roles(i, Role::Primary, Role::Secondary)
        } else {
            roles(i, Role::Secondary, Role::Primary)
        }
    };
    // 0pri verdict "least changes": with 5 vs 3 bits I survive, with 3 vs 5 the peer does.
    let pol = |p1| {
        with_policy(
            split(false, false, 0, 0),
            DiscardLeastChanges,
            p1,
            Disconnect,
        )
    };
    let bits = |mut i: HandshakeInput, mine: u64, theirs: u64| {
        i.local.dirty_bits = mine;
        i.peer.dirty_bits = theirs;
        i
    };

    // disconnect
    assert_eq!(decide(&one(pol(Disconnect), true)).outcome, SPLIT_BRAIN);

    // consensus: only if the 0pri verdict discards the Secondary.
    let d = decide(&one(bits(pol(Consensus), 5, 3), true));
    assert_eq!(d.outcome, SOURCE);
    let d = decide(&one(bits(pol(Consensus), 3, 5), false));
    assert_eq!(d.outcome, TARGET);
    let d = decide(&one(bits(pol(Consensus), 3, 5), true));
    assert_eq!(d.outcome, SPLIT_BRAIN);

    // discard-secondary
    assert_eq!(decide(&one(pol(DiscardSecondary), true)).outcome, SOURCE);
    assert_eq!(decide(&one(pol(DiscardSecondary), false)).outcome, TARGET);

    // violently-as0p discards the Primary's data too, but rr-conflict still guards it.
    let d = decide(&one(bits(pol(ViolentlyAs0p), 3, 5), true));
    assert_eq!(
        d.outcome,
        HandshakeOutcome::Disconnect(DisconnectReason::RrConflict)
    );
    let mut i = one(bits(pol(ViolentlyAs0p), 3, 5), true);
    i.policy.rr_conflict = RrConflict::Violently;
    let d = decide(&i);
    assert_eq!(d.outcome, TARGET);
    assert!(d.rr_conflict_overridden);

    // call-pri-lost-after-sb: the losing Primary demotes if it can ...
    let d = decide(&one(bits(pol(CallPriLostAfterSb), 3, 5), true));
    assert_eq!(d.outcome, TARGET);
    assert!(d.demote);
    assert!(
        !d.rr_conflict_overridden,
        "no rr-conflict after the demotion"
    );
    assert_eq!(d.handlers, [Handler::InitialSplitBrain]);
    // ... else runs pri-lost-after-sb, and the split brain stays.
    let mut i = one(bits(pol(CallPriLostAfterSb), 3, 5), true);
    i.can_demote = false;
    let d = decide(&i);
    assert_eq!(d.outcome, SPLIT_BRAIN);
    assert!(!d.demote);
    assert_eq!(
        d.handlers,
        [
            Handler::InitialSplitBrain,
            Handler::PriLostAfterSb,
            Handler::SplitBrain
        ]
    );
    // A losing Secondary just follows the 0pri verdict.
    let d = decide(&one(bits(pol(CallPriLostAfterSb), 3, 5), false));
    assert_eq!(d.outcome, TARGET);
    assert!(!d.demote);
}

#[test]
fn after_sb_2pri_policies() {
    use AfterSbPolicy::*;
    let two = |p2, mine: u64, theirs: u64| {
        let mut i = roles(
            with_policy(
                split(false, false, mine, theirs),
                DiscardLeastChanges,
                Disconnect,
                p2,
            ),
            Role::Primary,
            Role::Primary,
        );
        i.policy.rr_conflict = RrConflict::Violently;
        i
    };
    assert_eq!(decide(&two(Disconnect, 5, 3)).outcome, SPLIT_BRAIN);
    assert_eq!(decide(&two(ViolentlyAs0p, 5, 3)).outcome, SOURCE);
    let d = decide(&two(ViolentlyAs0p, 3, 5));
    assert_eq!(d.outcome, TARGET);
    assert!(d.rr_conflict_overridden);

    let d = decide(&two(CallPriLostAfterSb, 3, 5));
    assert_eq!((d.outcome, d.demote), (TARGET, true));
    assert!(!d.rr_conflict_overridden);
    let mut i = two(CallPriLostAfterSb, 3, 5);
    i.can_demote = false;
    let d = decide(&i);
    assert_eq!(d.outcome, SPLIT_BRAIN);
    assert!(d.handlers.contains(&Handler::PriLostAfterSb));
    let d = decide(&two(CallPriLostAfterSb, 5, 3));
    assert_eq!((d.outcome, d.demote), (SOURCE, false));
    assert_eq!(
        d.split_brain,
        Some(SplitBrainResolution::Automatic {
            primaries: 2,
            survivor: Side::Local,
            full_sync: false
        })
    );
}

/// A rule-100 pair: related only through history.
fn history_only() -> HandshakeInput {
    input(u(A, E, C, D), u(B, F, D, G))
}

#[test]
fn always_asbp_resolves_history_only_relations_with_a_full_sync() {
    let i = p0(history_only(), AfterSbPolicy::DiscardRemote);
    let d = decide(&i);
    assert_eq!((d.comparison.rule, d.outcome), (100, SPLIT_BRAIN));
    assert_eq!(d.final_value, -100);

    let mut i = i;
    i.policy.always_asbp = true;
    let d = decide(&i);
    assert_eq!(
        d.outcome,
        HandshakeOutcome::Proceed(Resync::AsSource { full: true })
    );
    assert_eq!(d.final_value, 2);
    assert_eq!(
        d.split_brain,
        Some(SplitBrainResolution::Automatic {
            primaries: 0,
            survivor: Side::Local,
            full_sync: true
        })
    );
}

#[test]
fn discard_my_data_resolves_by_hand() {
    let mut i = history_only();
    i.local.flags = UuidFlags::DISCARD_MY_DATA;
    let d = decide(&i);
    // A manual resolution resyncs from the bitmap even for a history-only relation.
    assert_eq!(d.outcome, TARGET);
    assert_eq!(
        d.split_brain,
        Some(SplitBrainResolution::Manual {
            survivor: Side::Peer
        })
    );
    assert_eq!(d.split_brain.and_then(|s| s.loser()), Some(Side::Local));
    assert_eq!(d.handlers, [Handler::InitialSplitBrain]);

    let mut i = split(false, false, 1, 1);
    i.peer.flags = UuidFlags::DISCARD_MY_DATA;
    assert_eq!(decide(&i).outcome, SOURCE);

    i.local.flags = UuidFlags::DISCARD_MY_DATA;
    assert_eq!(decide(&i).outcome, SPLIT_BRAIN, "both discard: no decision");
}

#[test]
fn rr_conflict_guards_a_primary_with_good_data() {
    // Rule 50: I should become SyncTarget.
    let base = roles(
        input(u(A, 0, C, D), u(B, A, C, D)),
        Role::Primary,
        Role::Secondary,
    );
    let with_rr = |rr| {
        let mut i = base;
        i.policy.rr_conflict = rr;
        decide(&i)
    };
    let d = with_rr(RrConflict::Disconnect);
    assert_eq!(
        d.outcome,
        HandshakeOutcome::Disconnect(DisconnectReason::RrConflict)
    );
    assert!(d.handlers.is_empty());
    let d = with_rr(RrConflict::CallPriLost);
    assert_eq!(
        d.outcome,
        HandshakeOutcome::Disconnect(DisconnectReason::RrConflict)
    );
    assert_eq!(d.handlers, [Handler::PriLost]);
    let d = with_rr(RrConflict::Violently);
    assert_eq!(d.outcome, TARGET);
    assert!(d.rr_conflict_overridden);

    // A Primary whose own disk is below Consistent is not protected.
    let mut i = base;
    i.local_disk = DiskState::Outdated;
    assert_eq!(decide(&i).outcome, TARGET);
}

#[test]
fn disk_states_override_the_uuids() {
    // Rule 70 says SyncSource, but my disk is Inconsistent and the peer's is not.
    let mut i = input(u(A, B, C, D), u(B, 0, C, D));
    i.local_disk = DiskState::Inconsistent;
    let d = decide(&i);
    assert_eq!(d.comparison.rule, 70);
    assert!(d.by_disk_states);
    assert_eq!(d.outcome, TARGET);

    // Both Inconsistent: no override, and an Inconsistent source is refused.
    i.peer_disk = DiskState::Inconsistent;
    let d = decide(&i);
    assert!(!d.by_disk_states);
    assert_eq!(
        d.outcome,
        HandshakeOutcome::Disconnect(DisconnectReason::InconsistentSyncSource)
    );

    // A rule-90 split brain is no split brain if one side is Inconsistent: no handlers.
    let mut i = split(false, false, 1, 1);
    i.peer_disk = DiskState::Inconsistent;
    let d = decide(&i);
    assert_eq!((d.outcome, d.split_brain), (SOURCE, None));
    assert!(d.handlers.is_empty());

    // -100 turns into a full sync.
    let mut i = history_only();
    i.local_disk = DiskState::Inconsistent;
    let d = decide(&i);
    assert_eq!(
        d.outcome,
        HandshakeOutcome::Proceed(Resync::AsTarget { full: true })
    );

    // A Negotiating disk is judged by the state it is about to take.
    let mut i = input(u(A, B, C, D), u(B, 0, C, D));
    i.local_disk = DiskState::Negotiating;
    i.pending_disk = Some(DiskState::Inconsistent);
    assert_eq!(decide(&i).outcome, TARGET);
    i.pending_disk = Some(DiskState::Consistent);
    assert_eq!(decide(&i).outcome, SOURCE);
}

#[test]
fn refusals_and_dry_runs() {
    let d = decide(&input(u(A, E, C, D), u(B, F, G, H)));
    assert_eq!(
        d.outcome,
        HandshakeOutcome::Disconnect(DisconnectReason::UnrelatedData)
    );
    assert_eq!(d.final_value, -1000);

    let mut i = input(u(A, B, C, D), u(A, 0, B, C));
    i.context.protocol_version = 90;
    assert_eq!(
        decide(&i).outcome,
        HandshakeOutcome::Disconnect(DisconnectReason::NeedsProtocol {
            version: 91,
            feature_flags: 0
        })
    );

    let mut i = input(u(A, B, C, D), u(B, 0, C, D));
    i.dry_run = true;
    assert_eq!(
        decide(&i).outcome,
        HandshakeOutcome::DryRun(Resync::AsSource { full: false })
    );
    assert_eq!(decide(&i).resync(), None);

    let d = decide(&input(u(A, 0, C, D), u(A, 0, C, D)));
    assert_eq!(d.outcome, HandshakeOutcome::Proceed(Resync::None));
    assert_eq!(d.resync(), Some(Resync::None));
}

// ------------------------------------------------------------------------------------------
// Scenario: the capture run (dmesg-alpha.txt / dmesg-bravo.txt)
// ------------------------------------------------------------------------------------------

/// The capture's split-brain configuration.
fn capture_policy() -> SplitBrainPolicy {
    SplitBrainPolicy {
        after_sb_0pri: AfterSbPolicy::DiscardZeroChanges,
        after_sb_1pri: AfterSbPolicy::DiscardSecondary,
        after_sb_2pri: AfterSbPolicy::Disconnect,
        ..SplitBrainPolicy::default()
    }
}

/// One `drbd_sync_handshake` of the logs.
struct Logged {
    /// Node and kernel timestamp, for messages.
    at: &'static str,
    /// `self ... bits:N` (the kernel prints the local flags as 0; `local_flags` holds what the
    /// node actually sent).
    local: UuidInfo,
    /// `peer ... bits:N flags:F`.
    peer: UuidInfo,
    roles: (Role, Role),
    disks: (DiskState, Option<DiskState>, DiskState),
    /// `uuid_compare()=N by rule M`.
    value: i32,
    rule: u32,
    outcome: HandshakeOutcome,
    handlers: &'static [Handler],
}

fn logged_handshakes() -> Vec<Logged> {
    use DiskState::*;
    use Role::*;
    let full_source = HandshakeOutcome::Proceed(Resync::AsSource { full: true });
    let full_target = HandshakeOutcome::Proceed(Resync::AsTarget { full: true });
    let none = HandshakeOutcome::Proceed(Resync::None);
    let sb: &'static [Handler] = &[Handler::InitialSplitBrain, Handler::SplitBrain];
    let isb: &'static [Handler] = &[Handler::InitialSplitBrain];
    vec![
        Logged {
            at: "alpha 6.210646",
            local: info(
                "0000000000000004:0000000000000000:0000000000000000:0000000000000000",
                4086,
                0,
            ),
            peer: info(
                "0000000000000004:0000000000000000:0000000000000000:0000000000000000",
                4086,
                0,
            ),
            roles: (Secondary, Secondary),
            disks: (Inconsistent, None, Inconsistent),
            value: 0,
            rule: 10,
            outcome: none,
            handlers: &[],
        },
        Logged {
            at: "bravo 5.862647",
            local: info(
                "0000000000000004:0000000000000000:0000000000000000:0000000000000000",
                4086,
                0,
            ),
            peer: info(
                "0000000000000004:0000000000000000:0000000000000000:0000000000000000",
                4086,
                0,
            ),
            roles: (Secondary, Secondary),
            disks: (Inconsistent, None, Inconsistent),
            value: 0,
            rule: 10,
            outcome: none,
            handlers: &[],
        },
        Logged {
            at: "alpha 6.541599",
            local: info(
                "2F64746BA5AA8EED:0000000000000004:0000000000000000:0000000000000000",
                4086,
                0,
            ),
            peer: info(
                "0000000000000004:0000000000000000:0000000000000000:0000000000000000",
                4086,
                0,
            ),
            roles: (Primary, Secondary),
            disks: (UpToDate, None, Inconsistent),
            value: 2,
            rule: 30,
            outcome: full_source,
            handlers: &[],
        },
        Logged {
            at: "bravo 6.188408",
            local: info(
                "0000000000000004:0000000000000000:0000000000000000:0000000000000000",
                4086,
                0,
            ),
            peer: info(
                "2F64746BA5AA8EED:0000000000000004:0000000000000000:0000000000000000",
                4086,
                0,
            ),
            roles: (Secondary, Primary),
            disks: (Inconsistent, None, UpToDate),
            value: -2,
            rule: 20,
            outcome: full_target,
            handlers: &[],
        },
        Logged {
            at: "alpha 9.514610",
            local: info(
                "0A9D5F8CA5FFA3CF:2F64746BA5AA8EED:071396C2E111147A:0000000000000004",
                66,
                0,
            ),
            peer: info(
                "2F64746BA5AA8EEC:0000000000000000:071396C2E111147A:0000000000000004",
                0,
                0,
            ),
            roles: (Primary, Secondary),
            disks: (UpToDate, None, Consistent),
            value: 1,
            rule: 70,
            outcome: SOURCE,
            handlers: &[],
        },
        Logged {
            at: "bravo 9.169936",
            local: info(
                "2F64746BA5AA8EEC:0000000000000000:071396C2E111147A:0000000000000004",
                0,
                0,
            ),
            peer: info(
                "0A9D5F8CA5FFA3CF:2F64746BA5AA8EED:071396C2E111147A:0000000000000004",
                66,
                0,
            ),
            roles: (Secondary, Primary),
            disks: (UpToDate, None, UpToDate),
            value: -1,
            rule: 50,
            outcome: TARGET,
            handlers: &[],
        },
        Logged {
            at: "alpha 13.355414",
            local: info(
                "CFE1C566185B7729:0A9D5F8CA5FFA3CF:2F65746BA5AA8EED:2F64746BA5AA8EED",
                1,
                0,
            ),
            peer: info(
                "3E9222EDF2D7446D:0A9D5F8CA5FFA3CF:2F65746BA5AA8EEC:2F64746BA5AA8EED",
                1,
                0,
            ),
            roles: (Primary, Primary),
            disks: (UpToDate, None, UpToDate),
            value: 100,
            rule: 90,
            outcome: SPLIT_BRAIN,
            handlers: sb,
        },
        Logged {
            at: "bravo 13.010619",
            local: info(
                "3E9222EDF2D7446D:0A9D5F8CA5FFA3CF:2F65746BA5AA8EEC:2F64746BA5AA8EED",
                1,
                0,
            ),
            peer: info(
                "CFE1C566185B7729:0A9D5F8CA5FFA3CF:2F65746BA5AA8EED:2F64746BA5AA8EED",
                1,
                0,
            ),
            roles: (Primary, Primary),
            disks: (UpToDate, None, UpToDate),
            value: 100,
            rule: 90,
            outcome: SPLIT_BRAIN,
            handlers: sb,
        },
        Logged {
            at: "alpha 14.734602",
            local: info(
                "CFE1C566185B7729:0A9D5F8CA5FFA3CF:2F65746BA5AA8EED:2F64746BA5AA8EED",
                1,
                0,
            ),
            peer: info(
                "3E9222EDF2D7446C:0A9D5F8CA5FFA3CF:2F65746BA5AA8EEC:2F64746BA5AA8EED",
                1,
                1,
            ),
            roles: (Primary, Secondary),
            disks: (UpToDate, None, UpToDate),
            value: 100,
            rule: 90,
            outcome: SOURCE,
            handlers: isb,
        },
        Logged {
            at: "bravo 14.386026",
            // bravo reconnected with --discard-my-data (alpha saw flags:1).
            local: info(
                "3E9222EDF2D7446C:0A9D5F8CA5FFA3CF:2F65746BA5AA8EEC:2F64746BA5AA8EED",
                1,
                1,
            ),
            peer: info(
                "CFE1C566185B7729:0A9D5F8CA5FFA3CF:2F65746BA5AA8EED:2F64746BA5AA8EED",
                1,
                0,
            ),
            roles: (Secondary, Primary),
            disks: (UpToDate, None, UpToDate),
            value: 100,
            rule: 90,
            outcome: TARGET,
            handlers: isb,
        },
        Logged {
            at: "alpha 17.896740",
            local: info(
                "9CBA40C84F8CBD07:CFE1C566185B7729:0A9E5F8CA5FFA3CF:0A9D5F8CA5FFA3CF",
                0,
                0,
            ),
            peer: info(
                "CFE1C566185B7729:0000000000000000:0A9E5F8CA5FFA3CE:0A9D5F8CA5FFA3CF",
                2048,
                2,
            ),
            roles: (Primary, Primary),
            disks: (UpToDate, None, Consistent),
            value: 1,
            rule: 70,
            outcome: SOURCE,
            handlers: &[],
        },
        Logged {
            at: "bravo 17.552638",
            // bravo re-attached after having been Primary: crashed-primary (alpha saw flags:2).
            local: info(
                "CFE1C566185B7729:0000000000000000:0A9E5F8CA5FFA3CE:0A9D5F8CA5FFA3CF",
                2048,
                2,
            ),
            peer: info(
                "9CBA40C84F8CBD07:CFE1C566185B7729:0A9E5F8CA5FFA3CF:0A9D5F8CA5FFA3CF",
                3,
                0,
            ),
            roles: (Primary, Primary),
            // Attaching while connected: Negotiating, about to be Inconsistent.
            disks: (Negotiating, Some(Inconsistent), UpToDate),
            value: -1,
            rule: 50,
            outcome: TARGET,
            handlers: &[],
        },
    ]
}

#[test]
fn capture_handshakes_reproduce_the_kernel_decisions() {
    for h in logged_handshakes() {
        let i = HandshakeInput {
            local: h.local,
            peer: h.peer,
            context: with_roles(ctx101(), h.roles.0, h.roles.1),
            local_disk: h.disks.0,
            pending_disk: h.disks.1,
            peer_disk: h.disks.2,
            policy: capture_policy(),
            can_demote: true,
            dry_run: false,
        };
        let d = decide(&i);
        assert_eq!(
            (d.comparison.to_drbd(), d.comparison.rule),
            (h.value, h.rule),
            "{}",
            h.at
        );
        assert_eq!(d.comparison.correction, None, "{}", h.at);
        assert_eq!(d.outcome, h.outcome, "{}", h.at);
        assert_eq!(d.handlers, h.handlers, "{}", h.at);
    }
}

#[test]
fn capture_split_brain_resolutions() {
    let logs = logged_handshakes();
    let find = |at: &str| {
        let h = logs.iter().find(|h| h.at.starts_with(at)).expect("logged");
        let i = HandshakeInput {
            local: h.local,
            peer: h.peer,
            context: with_roles(ctx101(), h.roles.0, h.roles.1),
            local_disk: h.disks.0,
            pending_disk: h.disks.1,
            peer_disk: h.disks.2,
            policy: capture_policy(),
            can_demote: true,
            dry_run: false,
        };
        decide(&i)
    };
    // "Split-Brain detected but unresolved, dropping connection!" on both.
    for at in ["alpha 13.", "bravo 13."] {
        assert_eq!(find(at).split_brain, Some(SplitBrainResolution::Unresolved));
    }
    // "Split-Brain detected, 1 primaries, automatically solved. Sync from this node".
    let d = find("alpha 14.");
    assert_eq!(
        d.split_brain,
        Some(SplitBrainResolution::Automatic {
            primaries: 1,
            survivor: Side::Local,
            full_sync: false
        })
    );
    // ... and "Sync from peer node" on bravo, whose changes are discarded.
    let d = find("bravo 14.");
    assert_eq!(d.split_brain.and_then(|s| s.loser()), Some(Side::Local));
    // "Becoming sync source/target due to disk states."
    assert!(find("alpha 6.54").by_disk_states);
    assert!(find("bravo 6.18").by_disk_states);
}

/// Replays every UUID change both nodes logged ("new current UUID", "updated sync UUID",
/// "updated sync uuid", "updated UUIDs") with the random values taken from the logs, and
/// checks that the states before each handshake are the ones the handshake printed.
#[test]
fn capture_uuid_timeline() {
    use DiskState::*;
    let handshakes = logged_handshakes();
    let hs = |at: &str| {
        handshakes
            .iter()
            .find(|h| h.at == at)
            .expect("logged handshake")
    };
    let check = |node: &GenerationUuids, text: &str| assert_eq!(node.to_string(), text);

    // Both attached to freshly created meta data.
    let mut alpha = GenerationUuids::just_created();
    let mut bravo = GenerationUuids::just_created();
    check(
        &alpha,
        "0000000000000004:0000000000000000:0000000000000000:0000000000000000",
    );
    assert_eq!(alpha, hs("alpha 6.210646").local.uuids);

    // alpha: primary --force while connected to an Inconsistent bravo.
    assert!(alpha.promote(0x2F64_746B_A5AA_8EEC, true, Inconsistent, true));
    check(
        &alpha,
        "2F64746BA5AA8EED:0000000000000004:0000000000000000:0000000000000000",
    );
    assert_eq!(alpha, hs("alpha 6.541599").local.uuids);
    assert_eq!(alpha, hs("bravo 6.188408").peer.uuids);
    let alpha_sent = alpha;

    // Full sync alpha -> bravo; the bitmap UUID was "just created", so the sync UUID is new.
    let sync = alpha.start_sync_source(0x0713_96C2_E111_147A);
    check(
        &alpha,
        "2F64746BA5AA8EED:071396C2E111147A:0000000000000004:0000000000000000",
    );
    bravo.adopt_sync_uuid(sync, Role::Secondary);
    check(
        &bravo,
        "071396C2E111147A:0000000000000000:0000000000000000:0000000000000000",
    );
    alpha.finish_sync_source();
    check(
        &alpha,
        "2F64746BA5AA8EED:0000000000000000:071396C2E111147A:0000000000000004",
    );
    bravo.finish_sync_target(&alpha_sent, Role::Secondary);
    check(
        &bravo,
        "2F64746BA5AA8EEC:0000000000000000:071396C2E111147A:0000000000000004",
    );
    let equal = compare(
        &UuidInfo::new(alpha, 0, UuidFlags::empty()),
        &UuidInfo::new(bravo, 0, UuidFlags::empty()),
        &with_roles(ctx101(), Role::Primary, Role::Secondary),
    );
    assert_eq!((equal.rule, equal.relation), (40, Relation::Equal));

    // bravo is Primary for a while (dual primary), connected: no new current UUID.
    assert!(!bravo.promote(0xdead, true, UpToDate, false));
    bravo.demote();
    // Disconnect: bravo is Secondary and the peer's role becomes Unknown: nothing.
    assert!(lost_peer_data(UpToDate, DUnknown));
    let act = bravo.on_peer_data_lost(0xdead, Role::Secondary, Role::Unknown, UpToDate, false);
    assert_eq!(act, PeerLossAction::Nothing);
    // alpha, Primary, loses bravo: new current UUID.
    let act = alpha.on_peer_data_lost(
        0x0A9D_5F8C_A5FF_A3CF,
        Role::Primary,
        Role::Unknown,
        UpToDate,
        false,
    );
    assert_eq!(act, PeerLossAction::NewCurrentUuid);
    check(
        &alpha,
        "0A9D5F8CA5FFA3CF:2F64746BA5AA8EED:071396C2E111147A:0000000000000004",
    );
    assert_eq!(alpha, hs("alpha 9.514610").local.uuids);
    assert_eq!(bravo, hs("alpha 9.514610").peer.uuids);
    let alpha_sent = alpha;

    // Bitmap resync alpha -> bravo: the sync UUID steps the old bitmap UUID.
    let sync = alpha.start_sync_source(0xdead);
    check(
        &alpha,
        "0A9D5F8CA5FFA3CF:2F65746BA5AA8EED:2F64746BA5AA8EED:071396C2E111147A",
    );
    bravo.adopt_sync_uuid(sync, Role::Secondary);
    check(
        &bravo,
        "2F65746BA5AA8EEC:0000000000000000:071396C2E111147A:0000000000000004",
    );
    alpha.finish_sync_source();
    check(
        &alpha,
        "0A9D5F8CA5FFA3CF:0000000000000000:2F65746BA5AA8EED:2F64746BA5AA8EED",
    );
    bravo.finish_sync_target(&alpha_sent, Role::Secondary);
    check(
        &bravo,
        "0A9D5F8CA5FFA3CE:0000000000000000:2F65746BA5AA8EEC:2F64746BA5AA8EED",
    );

    // bravo Primary while connected; then both lose each other as Primaries.
    assert!(!bravo.promote(0xdead, true, UpToDate, false));
    let act = bravo.on_peer_data_lost(
        0x3E92_22ED_F2D7_446D,
        Role::Primary,
        Role::Unknown,
        UpToDate,
        false,
    );
    assert_eq!(act, PeerLossAction::NewCurrentUuid);
    check(
        &bravo,
        "3E9222EDF2D7446D:0A9D5F8CA5FFA3CF:2F65746BA5AA8EEC:2F64746BA5AA8EED",
    );
    let act = alpha.on_peer_data_lost(
        0xCFE1_C566_185B_7729,
        Role::Primary,
        Role::Unknown,
        UpToDate,
        false,
    );
    assert_eq!(act, PeerLossAction::NewCurrentUuid);
    check(
        &alpha,
        "CFE1C566185B7729:0A9D5F8CA5FFA3CF:2F65746BA5AA8EED:2F64746BA5AA8EED",
    );
    assert_eq!(alpha, hs("alpha 13.355414").local.uuids);
    assert_eq!(bravo, hs("bravo 13.010619").local.uuids);

    // Unresolved split brain; bravo demotes and reconnects with --discard-my-data.
    bravo.demote();
    assert_eq!(bravo, hs("bravo 14.386026").local.uuids);
    let alpha_sent = alpha;
    let sync = alpha.start_sync_source(0xdead);
    check(
        &alpha,
        "CFE1C566185B7729:0A9E5F8CA5FFA3CF:0A9D5F8CA5FFA3CF:2F65746BA5AA8EED",
    );
    bravo.adopt_sync_uuid(sync, Role::Secondary);
    check(
        &bravo,
        "0A9E5F8CA5FFA3CE:0000000000000000:2F65746BA5AA8EEC:2F64746BA5AA8EED",
    );
    alpha.finish_sync_source();
    check(
        &alpha,
        "CFE1C566185B7729:0000000000000000:0A9E5F8CA5FFA3CF:0A9D5F8CA5FFA3CF",
    );
    bravo.finish_sync_target(&alpha_sent, Role::Secondary);
    check(
        &bravo,
        "CFE1C566185B7728:0000000000000000:0A9E5F8CA5FFA3CE:0A9D5F8CA5FFA3CF",
    );

    // bravo Primary again, then detaches: alpha (Primary) loses the peer's disk.
    assert!(!bravo.promote(0xdead, true, UpToDate, false));
    assert!(lost_peer_data(UpToDate, Failed));
    let act = alpha.on_peer_data_lost(
        0x9CBA_40C8_4F8C_BD07,
        Role::Primary,
        Role::Primary,
        UpToDate,
        false,
    );
    assert_eq!(act, PeerLossAction::NewCurrentUuid);
    check(
        &alpha,
        "9CBA40C84F8CBD07:CFE1C566185B7729:0A9E5F8CA5FFA3CF:0A9D5F8CA5FFA3CF",
    );
    assert_eq!(alpha, hs("alpha 17.896740").local.uuids);
    // bravo re-attaches its disk while Primary (the current UUID carries the primary bit).
    assert_eq!(bravo, hs("bravo 17.552638").local.uuids);
    let alpha_sent = alpha;
    let sync = alpha.start_sync_source(0xdead);
    check(
        &alpha,
        "9CBA40C84F8CBD07:CFE2C566185B7729:CFE1C566185B7729:0A9E5F8CA5FFA3CF",
    );
    bravo.adopt_sync_uuid(sync, Role::Primary);
    check(
        &bravo,
        "CFE2C566185B7729:0000000000000000:0A9E5F8CA5FFA3CE:0A9D5F8CA5FFA3CF",
    );
    alpha.finish_sync_source();
    check(
        &alpha,
        "9CBA40C84F8CBD07:0000000000000000:CFE2C566185B7729:CFE1C566185B7729",
    );
    bravo.finish_sync_target(&alpha_sent, Role::Primary);
    check(
        &bravo,
        "9CBA40C84F8CBD07:0000000000000000:CFE2C566185B7729:CFE1C566185B7729",
    );

    // Final teardown: alpha, still Primary, loses bravo once more.
    let act = alpha.on_peer_data_lost(
        0xC3E0_8006_089A_15EF,
        Role::Primary,
        Role::Unknown,
        UpToDate,
        false,
    );
    assert_eq!(act, PeerLossAction::NewCurrentUuid);
    check(
        &alpha,
        "C3E08006089A15EF:9CBA40C84F8CBD07:CFE2C566185B7729:CFE1C566185B7729",
    );
}
