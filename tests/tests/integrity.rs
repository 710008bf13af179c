//! data-integrity-alg between two `drbdd` nodes, through a proxy that corrupts one data
//! packet's payload on the way: the receiver detects it, drops the connection with a clear
//! reason, and the resync after the reconnect repairs the block; both disks end identical.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tests::{stamped_block, NbdClient, Pair, PairSpec};

const P_DATA: u16 = 0x0000;

/// Copies `from` to `to`, decoding the DRBD frames (h80, h95 and h100 headers); the payload
/// of the `corrupt_nth` P_DATA (counted over all connections) gets its last byte flipped.
fn pump(mut from: TcpStream, mut to: TcpStream, seen: Arc<AtomicUsize>, corrupt_nth: usize) {
    let mut head = [0u8; 16];
    loop {
        if from.read_exact(&mut head[..4]).is_err() {
            break;
        }
        let magic32 = u32::from_be_bytes(head[..4].try_into().unwrap());
        let (hlen, cmd, len) = if magic32 == 0x8620_ec20 {
            if from.read_exact(&mut head[4..16]).is_err() {
                break;
            }
            let cmd = u16::from_be_bytes([head[6], head[7]]);
            let len = u32::from_be_bytes(head[8..12].try_into().unwrap()) as usize;
            (16, cmd, len)
        } else if magic32 == 0x8374_0267 {
            if from.read_exact(&mut head[4..8]).is_err() {
                break;
            }
            let cmd = u16::from_be_bytes([head[4], head[5]]);
            let len = u16::from_be_bytes([head[6], head[7]]) as usize;
            (8, cmd, len)
        } else if head[..2] == [0x83, 0x5a] {
            if from.read_exact(&mut head[4..8]).is_err() {
                break;
            }
            let cmd = u16::from_be_bytes([head[2], head[3]]);
            let len = u32::from_be_bytes(head[4..8].try_into().unwrap()) as usize;
            (8, cmd, len)
        } else {
            break;
        };
        let mut body = vec![0u8; len];
        if from.read_exact(&mut body).is_err() {
            break;
        }
        // p_data is 24 bytes, then the digest, then the data.
        if cmd == P_DATA && len > 24 + 64 {
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            if n == corrupt_nth {
                *body.last_mut().unwrap() ^= 0xff;
            }
        }
        if to.write_all(&head[..hlen]).is_err() || to.write_all(&body).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// A TCP connection to `target` from the local address `source`.
fn connect_from(source: SocketAddr, target: SocketAddr) -> Option<TcpStream> {
    use rustix::net::{bind, connect, socket, AddressFamily, SocketType};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).ok()?;
    bind(&fd, &source).ok()?;
    connect(&fd, &target).ok()?;
    Some(TcpStream::from(fd))
}

/// Listens on `listen`; each connection is forwarded to `target`, dialled from `source`.
fn proxy(
    listen: SocketAddr,
    source: SocketAddr,
    target: SocketAddr,
    seen: Arc<AtomicUsize>,
    nth: usize,
) {
    let l = TcpListener::bind(listen).expect("proxy listen");
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(a) = c else { continue };
            let Some(b) = connect_from(source, target) else {
                let _ = a.shutdown(Shutdown::Both);
                continue;
            };
            let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let s1 = Arc::clone(&seen);
            let s2 = Arc::clone(&seen);
            std::thread::spawn(move || pump(a, b, s1, nth));
            std::thread::spawn(move || pump(b2, a2, s2, nth));
        }
    });
}

#[test]
fn a_payload_damaged_on_the_wire_is_detected_and_resynced() {
    let mut p = Pair::new(PairSpec {
        addresses: ["127.0.0.1:7860", "127.0.0.2:7860"],
        size_mib: 16,
        net_extra: "data-integrity-alg crc32c;",
        ..PairSpec::default()
    });
    // alpha reaches bravo through 127.0.0.3, bravo reaches alpha through 127.0.0.4; each
    // proxy dials from the address the other end expects its peer at.
    p.set_node_conf(0, |c| c.replace("127.0.0.2:7860", "127.0.0.3:7860"));
    p.set_node_conf(1, |c| c.replace("127.0.0.1:7860", "127.0.0.4:7860"));
    let seen = Arc::new(AtomicUsize::new(0));
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
    // The 5th application write on the way gets one byte flipped.
    proxy(
        addr("127.0.0.3:7860"),
        addr("127.0.0.4:0"),
        addr("127.0.0.2:7860"),
        Arc::clone(&seen),
        5,
    );
    proxy(
        addr("127.0.0.4:7860"),
        addr("127.0.0.3:0"),
        addr("127.0.0.1:7860"),
        Arc::clone(&seen),
        5,
    );
    p.up_and_sync();
    let mut nbd = NbdClient::connect(&p.nbd_socket(0), "r0").expect("NBD connect");
    for b in 0..20u64 {
        nbd.write(b * 4096, &stamped_block(b, 7)).expect("write");
    }
    nbd.flush().expect("flush");
    drop(nbd);
    assert!(
        seen.load(Ordering::SeqCst) >= 5,
        "no write went through the proxy"
    );
    p.wait_until(
        "the damaged write is detected",
        Duration::from_secs(20),
        |p| p.log(1).contains("data integrity check failed"),
    );
    let log = p.log(1);
    assert!(
        log.contains("data integrity check failed (crc32c): P_DATA"),
        "{log}"
    );
    // The connection comes back and the write the peer refused is resynced.
    p.wait_in_sync(Duration::from_secs(30));
    assert!(
        p.data(0, 20 * 4096) == p.data(1, 20 * 4096),
        "the disks differ"
    );
}
