use super::*;
use crate::meta::al::initialized_area;
use proptest::prelude::*;

const EXT: u64 = SECTORS_PER_EXTENT;

fn tr_of(d: &AlDecision) -> &AlWrite {
    match d {
        AlDecision::Transaction(w) => w,
        AlDecision::Proceed => panic!("expected a transaction"),
    }
}

#[test]
fn limits() {
    let g = AlGeometry::DEFAULT;
    assert_eq!(max_al_extents(g), 7 * 919);
    assert!(ActivityLog::new(66, g).is_err());
    assert!(ActivityLog::new(67, g).is_ok());
    assert_eq!(
        ActivityLog::new(6434, g).unwrap_err(),
        AlError::RingTooSmall {
            al_extents: 6434,
            max: 6433
        }
    );
    let big = AlGeometry::new(1, 73).unwrap();
    assert!(ActivityLog::new(MAX_AL_EXTENTS, big).is_ok());
    assert!(ActivityLog::new(MAX_AL_EXTENTS + 1, big).is_err());
    let mut al = ActivityLog::new(67, g).unwrap();
    assert!(matches!(
        al.begin_io(0, 0),
        Err(BeginIoError::BadRequest { .. })
    ));
    assert!(al.begin_io(0, MAX_IO_SECTORS + 1).is_err());
    assert!(al.begin_io(u64::MAX - 10, 8).is_err());
    assert_eq!(al.complete_io(0, 8), Err(AlError::NotActive(0)));
    assert!(matches!(
        al.complete_io(0, 0),
        Err(AlError::BadRequest { .. })
    ));
}

#[test]
fn transaction_contents() {
    let mut al = ActivityLog::new(1237, AlGeometry::DEFAULT).unwrap();
    // A write crossing an extent boundary needs two slots in one transaction.
    let d = al.begin_io(EXT - 8, 16).unwrap();
    let w = tr_of(&d);
    assert_eq!((w.tr_number, w.ring_block, w.byte_offset()), (0, 0, 0));
    let t = AlTransaction::decode(&w.block).unwrap();
    assert_eq!(t.transaction_type, AL_TR_UPDATE);
    assert_eq!(t.n_updates, 2);
    assert_eq!(t.context_size, 1237);
    assert_eq!(t.context_start_slot_nr, 0);
    assert_eq!(&t.update_slot_nr[..3], &[0, 1, 0xffff]);
    assert_eq!(&t.update_extent_nr[..3], &[0, 1, 0xffff_ffff]);
    assert_eq!(&t.context[..3], &[0, 1, 0xffff_ffff]);
    assert!(t.reserved == [0; 4]);
    // Already active: no transaction.
    assert_eq!(al.begin_io(8, 8).unwrap(), AlDecision::Proceed);
    assert_eq!(al.refs(0), 2);
    // Second transaction: context window moves by 919; third wraps to 0 (1838 >= 1237).
    let t = AlTransaction::decode(&tr_of(&al.begin_io(5 * EXT, 8).unwrap()).block).unwrap();
    assert_eq!((t.tr_number, t.context_start_slot_nr), (1, 919));
    assert_eq!(t.context[1237 - 919], 0xffff_ffff);
    let t = AlTransaction::decode(&tr_of(&al.begin_io(6 * EXT, 8).unwrap()).block).unwrap();
    assert_eq!((t.tr_number, t.context_start_slot_nr), (2, 0));
    assert_eq!(&t.context[..5], &[0, 1, 5, 6, 0xffff_ffff]);
    al.complete_io(EXT - 8, 16).unwrap();
    al.complete_io(8, 8).unwrap();
    assert_eq!(al.refs(0), 0);
    assert!(al.is_active(0));
}

#[test]
fn eviction_lru_and_busy() {
    let mut al = ActivityLog::new(67, AlGeometry::DEFAULT).unwrap();
    for e in 0..67u64 {
        al.begin_io(e * EXT, 8).unwrap();
    }
    assert_eq!(al.begin_io(100 * EXT, 8), Err(BeginIoError::Busy));
    // Nothing changed on Busy.
    assert_eq!(al.next_tr_number(), 67);
    assert!(!al.is_active(100));
    al.complete_io(5 * EXT, 8).unwrap();
    al.complete_io(3 * EXT, 8).unwrap();
    // Both unreferenced; extent 3 was used less recently.
    let d = al.begin_io(100 * EXT, 8).unwrap();
    let w = tr_of(&d);
    assert_eq!(w.evicted, vec![3]);
    assert_eq!(w.bitmap_pages, vec![0]);
    assert!(!al.is_active(3) && al.is_active(5) && al.is_active(100));
    assert_eq!(w.ring_block, 67 % 8);
    // Extent 2000 lives in bitmap page 2000 * 1024 / 32768 = 62.
    let mut al = ActivityLog::new(67, AlGeometry::DEFAULT).unwrap();
    al.begin_io(2000 * EXT, 8).unwrap();
    al.complete_io(2000 * EXT, 8).unwrap();
    for e in 0..66u64 {
        al.begin_io(e * EXT, 8).unwrap();
    }
    let d = al.begin_io(66 * EXT, 8).unwrap();
    assert_eq!(tr_of(&d).bitmap_pages, vec![62]);
}

#[test]
fn striped_ring_positions_and_wrapping_numbers() {
    let g = AlGeometry::new(2, 4).unwrap();
    let mut al = ActivityLog::new(67, g)
        .unwrap()
        .with_next_tr_number(u32::MAX - 1);
    let mut ring = initialized_area(g);
    let mut blocks = Vec::new();
    for e in 0..5u64 {
        let d = al.begin_io(e * EXT, 8).unwrap();
        let w = tr_of(&d);
        blocks.push(w.ring_block);
        let at = w.byte_offset() as usize;
        ring[at..at + AL_BLOCK_BYTES].copy_from_slice(&w.block);
    }
    // Transactions u32::MAX-1, u32::MAX, 0, 1, 2.
    let expected: Vec<u32> = [u32::MAX - 1, u32::MAX, 0, 1, 2]
        .iter()
        .map(|&t| block_of_transaction(t, g))
        .collect();
    assert_eq!(blocks, expected);
    let r = replay(&ring, g).unwrap();
    assert_eq!(r.newest_tr, Some(2));
    assert_eq!(r.applied, 5);
    assert_eq!(r.extents, (0..5).collect());
    assert!(replay(&ring[..100], g).is_err());
}

#[test]
fn replay_marks_bitmap() {
    let mut bm = DirtyBitmap::new(3 * EXT + 100).unwrap();
    let extents: BTreeSet<u32> = [1, 3, 7].into();
    // Extent 3 is partly beyond the device, extent 7 entirely.
    let n = mark_extents_dirty(&mut bm, &extents);
    assert_eq!(n, 1024 + 13);
    assert_eq!(
        bm.dirty_runs().collect::<Vec<_>>(),
        vec![1024..2048, 3072..3085]
    );
}

#[derive(Debug, Clone)]
enum Op {
    /// Start a write at (extent, offset sectors, length sectors).
    Begin(u32, u64, u64),
    /// Complete the n-th (modulo) in-flight write.
    Complete(usize),
}

fn arb_ops(extents: u32) -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            3 => (0..extents, 0..EXT, 1..=MAX_IO_SECTORS).prop_map(|(e, o, n)| Op::Begin(e, o, n)),
            2 => any::<usize>().prop_map(Op::Complete),
        ],
        0..400,
    )
}

fn extents_touched(sector: u64, sectors: u64) -> std::ops::RangeInclusive<u32> {
    (sector / EXT) as u32..=((sector + sectors - 1) / EXT) as u32
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random workloads against a model of the disk: every admitted write is covered by an
    /// active extent, extents with writes in flight are never evicted, and at every crash
    /// point (including a torn transaction block) the replayed ring covers every extent with
    /// writes in flight.
    #[test]
    fn crash_safety(
        cfg in 0usize..4,
        ops in arb_ops(200),
    ) {
        let (al_extents, g) = [
            (67, AlGeometry::DEFAULT),
            (1500, AlGeometry::DEFAULT),
            (6433, AlGeometry::DEFAULT),
            (100, AlGeometry::new(3, 4).unwrap()),
        ][cfg];
        let mut al = ActivityLog::new(al_extents, g).unwrap();
        let mut ring = initialized_area(g);
        let mut in_flight: Vec<(u64, u64)> = Vec::new();
        let in_flight_extents = |v: &[(u64, u64)]| -> BTreeSet<u32> {
            v.iter().flat_map(|&(s, n)| extents_touched(s, n)).collect()
        };
        for op in ops {
            match op {
                Op::Begin(e, o, n) => {
                    let sector = u64::from(e) * EXT + o;
                    let before = al.clone();
                    match al.begin_io(sector, n) {
                        Err(BeginIoError::Busy) => {
                            // Busy only if there really was no free slot.
                            let need = extents_touched(sector, n).filter(|x| !before.is_active(*x)).count();
                            let evictable = before.capacity() as usize
                                - in_flight_extents(&in_flight).len();
                            prop_assert!(evictable < need + extents_touched(sector, n).filter(|x| before.is_active(*x) && before.refs(*x) == 0).count());
                            continue;
                        }
                        Err(err) => return Err(TestCaseError::fail(format!("{err}"))),
                        Ok(AlDecision::Proceed) => {}
                        Ok(AlDecision::Transaction(w)) => {
                            // No evicted extent had writes in flight.
                            let busy = in_flight_extents(&in_flight);
                            prop_assert!(w.evicted.iter().all(|x| !busy.contains(x)));
                            // Crash while the block is being written: it is torn.
                            let at = w.byte_offset() as usize;
                            let mut torn = ring.clone();
                            torn[at + 100] ^= 0xff;
                            let r = replay(&torn, g).unwrap();
                            prop_assert!(r.extents.is_superset(&busy));
                            ring[at..at + AL_BLOCK_BYTES].copy_from_slice(&w.block);
                        }
                    }
                    for x in extents_touched(sector, n) {
                        prop_assert!(al.is_active(x));
                    }
                    in_flight.push((sector, n));
                }
                Op::Complete(i) => {
                    if !in_flight.is_empty() {
                        let (s, n) = in_flight.swap_remove(i % in_flight.len());
                        al.complete_io(s, n).unwrap();
                    }
                }
            }
            // Crash now.
            let busy = in_flight_extents(&in_flight);
            let r = replay(&ring, g).unwrap();
            prop_assert!(r.extents.is_superset(&busy), "lost {:?}", busy.difference(&r.extents).collect::<Vec<_>>());
            // The replayed set is exactly the active set (every transaction was written).
            prop_assert_eq!(&r.extents, &al.active_extents());
            for x in &busy {
                prop_assert!(al.refs(*x) > 0);
            }
        }
    }
}
