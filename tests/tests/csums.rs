//! Checksum-based resync (`csums-alg`) between two `drbdd` nodes: of a device whose two
//! halves are identical and different, only the different half travels.

use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use tests::{Pair, PairSpec};

#[test]
fn checksum_based_full_sync_moves_only_the_blocks_that_differ() {
    let mut p = Pair::new(PairSpec {
        addresses: ["127.0.0.1:7850", "127.0.0.2:7850"],
        size_mib: 16,
        net_extra: "csums-alg md5;",
        ..PairSpec::default()
    });
    // Both backing files are zeroes; alpha's blocks 2048..3072 (4 MiB) get other data.
    let differ = 2048u64..3072;
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p.nodes[0].disk)
            .expect("alpha's disk");
        f.seek(SeekFrom::Start(differ.start * 4096)).expect("seek");
        let mut rng = fastrand::Rng::with_seed(5);
        let data: Vec<u8> = (0..(differ.end - differ.start) * 4096)
            .map(|_| rng.u8(..))
            .collect();
        f.write_all(&data).expect("write");
        f.sync_all().expect("sync");
    }
    for i in 0..2 {
        p.start(i);
        p.adm_ok(i, &["up", "r0"]);
    }
    p.wait_until("Connected", Duration::from_secs(30), |p| {
        p.cstate(0) == "Connected" && p.cstate(1) == "Connected"
    });
    p.adm_ok(0, &["primary", "--force", "r0"]);
    p.wait_in_sync(Duration::from_secs(60));
    let log = p.log(1);
    assert!(log.contains("checksum based"), "{log}");
    // The full sync covered every block; only the 1024 different ones were sent.
    let blocks = log
        .lines()
        .find_map(|l| {
            let t = l.split("transferred ").nth(1)?;
            let kib: u64 = t.split('K').next()?.parse().ok()?;
            Some(kib / 4)
        })
        .unwrap_or_else(|| panic!("no transfer summary in bravo's log:\n{log}"));
    assert_eq!(blocks, differ.end - differ.start, "{log}");
    let len = 4000 * 4096;
    assert!(
        p.data(0, len) == p.data(1, len),
        "the disks differ after the resync"
    );
}
