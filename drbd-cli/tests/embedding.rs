//! The replicated device used as a library, without NBD and without the daemon: two volumes
//! in one process replicate over loopback through `drbd_net::replica::Replica`'s read/write
//! API.

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use drbd_cli::daemon::host::load_config;
use drbd_cli::runtime::replica_config;
use drbd_core::config::model::ResourceModel;
use drbd_core::replication::device::IoError;
use drbd_core::replication::status::AdminRequest;
use drbd_core::state::{ConnState, DiskState, Role};
use drbd_net::replica::Replica;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_volumes_in_one_process_replicate_through_the_library_api() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("drbd.conf");
    for n in ["a", "b"] {
        let f = std::fs::File::create(dir.path().join(format!("{n}.img"))).unwrap();
        f.set_len(32 << 20).unwrap();
    }
    std::fs::write(
        &conf,
        format!(
            "resource r0 {{ net {{ connect-int 1; }} disk {{ resync-rate 500M; c-plan-ahead 0; }}\n\
             on alpha {{ device /dev/drbd0; disk {d}/a.img; address 127.0.0.1:7830; meta-disk internal; }}\n\
             on bravo {{ device /dev/drbd0; disk {d}/b.img; address 127.0.0.2:7830; meta-disk internal; }} }}\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let mut volumes = Vec::new();
    for node in ["alpha", "bravo"] {
        let st = Command::new(env!("CARGO_BIN_EXE_drbdadm"))
            .arg("-c")
            .arg(&conf)
            .args(["--node", node, "create-md", "--force", "r0"])
            .output()
            .unwrap();
        assert!(st.status.success(), "{st:?}");
        let cfg = load_config(&conf, node).unwrap();
        let model = ResourceModel::new(&cfg, "r0").unwrap();
        let rc = replica_config(&model).unwrap();
        volumes.push(Replica::start(rc).await.unwrap());
    }
    let (a, b) = (&volumes[0], &volumes[1]);
    let connected =
        |s: &drbd_core::replication::status::VolumeStatus| s.conn == ConnState::Connected;
    a.wait_for(Duration::from_secs(20), connected)
        .await
        .unwrap();
    b.wait_for(Duration::from_secs(20), connected)
        .await
        .unwrap();
    // A Secondary refuses writes.
    assert_eq!(
        a.write(0, Bytes::from(vec![1u8; 4096]), false).await,
        Err(IoError::ReadOnly)
    );
    a.admin(AdminRequest::Primary { force: true })
        .await
        .unwrap();
    let in_sync = |s: &drbd_core::replication::status::VolumeStatus| {
        s.conn == ConnState::Connected
            && s.disk == DiskState::UpToDate
            && s.peer_disk == DiskState::UpToDate
    };
    a.wait_for(Duration::from_secs(30), in_sync).await.unwrap();
    b.wait_for(Duration::from_secs(30), in_sync).await.unwrap();
    assert_eq!(a.status().role, Role::Primary);

    // Writes of several sizes, including one larger than a single request (split in chunks).
    let big: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
    a.write(1 << 20, Bytes::from(big.clone()), false)
        .await
        .unwrap();
    a.write(512, Bytes::from(vec![0xab; 1024]), true)
        .await
        .unwrap();
    a.discard(8 << 20, 1 << 20, true).await.unwrap();
    a.flush().await.unwrap();
    // Protocol C: acknowledged means written on the peer too; read it there.
    assert_eq!(&b.read(1 << 20, 3 << 20).await.unwrap()[..], &big[..]);
    assert_eq!(&b.read(512, 1024).await.unwrap()[..], &[0xab; 1024][..]);
    assert!(b
        .read(8 << 20, 1 << 20)
        .await
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    // Misaligned requests are refused.
    assert_eq!(a.read(100, 512).await, Err(IoError::Invalid));
    for v in &volumes {
        v.shutdown().await;
    }
}
