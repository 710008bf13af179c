//! The wire codec against real kernel traffic, and the capture reader against synthetic
//! captures.
//!
//! The real captures live in `shared/captures` next to the repository (two QEMU VMs running
//! in-kernel DRBD 8.4.11; see its README). Every DRBD packet in every one of them must decode,
//! and re-encode to exactly the captured bytes. When `tshark` is installed, our packet counts
//! per command must equal the Wireshark dissector's. Without the captures (or tshark) the
//! tests print `SKIP:` and pass, except under CI (`CI` set), where that is a failure.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use bytes::{Bytes, BytesMut};
use drbd_net::capture::packet::{build_ethernet_tcp, flags};
use drbd_net::capture::pcap::{self, ByteOrder, PcapWriter, TsResolution};
use drbd_net::capture::{analyze, analyze_file, Analysis, AnalyzeOptions, DrbdRecord, Notice};
use drbd_net::wire::{
    encode, BlockId, Command, ConnectionFeatures, DataPacket, Frame, HeaderKind, Packet, Protocol,
    Sizes, WireContext, ID_IN_SYNC,
};

fn under_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// The shared captures directory, or `None` (after printing SKIP) when it is missing
/// outside CI. Under CI a missing directory fails the test.
fn captures_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/captures");
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        !under_ci(),
        "shared captures not found at {} (required under CI)",
        dir.display()
    );
    println!("SKIP: shared captures not found");
    None
}

/// Every capture file of the directory, sorted by name.
fn capture_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read captures dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().to_string());
            name.is_some_and(|n| n.ends_with(".pcap") || n.ends_with(".pcap.gz"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no capture files in {}", dir.display());
    files
}

fn analyze_path(path: &Path) -> Analysis {
    analyze_file(path, AnalyzeOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load(name: &str) -> Option<Analysis> {
    let dir = captures_dir()?;
    Some(analyze_path(&dir.join(name)))
}

fn of(a: &Analysis, cmd: Command) -> Vec<&DrbdRecord> {
    a.records
        .iter()
        .filter(|r| r.decoded.packet.command() == cmd)
        .collect()
}

fn data_payloads(a: &Analysis, cmd: Command) -> Vec<(&DrbdRecord, &DataPacket)> {
    a.records
        .iter()
        .filter_map(|r| match &r.decoded.packet {
            Packet::Data(d) if cmd == Command::Data => Some((r, d)),
            Packet::DataReply(d) if cmd == Command::DataReply => Some((r, d)),
            Packet::RsDataReply(d) if cmd == Command::RsDataReply => Some((r, d)),
            _ => None,
        })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn every_capture_decodes_and_reencodes_byte_for_byte() {
    let Some(dir) = captures_dir() else { return };
    let mut total = 0usize;
    for path in capture_files(&dir) {
        let name = path.display().to_string();
        let a = analyze_path(&path);
        assert!(
            a.failures.is_empty(),
            "{name}: undecodable DRBD packets: {}",
            a.failures
                .iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        );
        assert!(
            a.notices.is_empty(),
            "{name}: unexpected notices: {:?}",
            a.notices
        );
        assert!(!a.records.is_empty(), "{name}: no DRBD packets found");
        let mut last = (0u64, 0usize, 0u64);
        for r in &a.records {
            let mut out = BytesMut::new();
            encode(&r.decoded, &r.context, &mut out).unwrap_or_else(|e| {
                panic!(
                    "{name}: frame {} s{} {} offset {}: re-encoding {} failed: {e}",
                    r.frame,
                    r.stream,
                    r.direction,
                    r.offset,
                    r.decoded.packet.command()
                )
            });
            assert!(
                out[..] == r.raw[..],
                "{name}: frame {} s{} {} offset {}: {} re-encodes differently\n ours {:02x?}\n  cap {:02x?}",
                r.frame,
                r.stream,
                r.direction,
                r.offset,
                r.decoded.packet.command(),
                &out[..out.len().min(64)],
                &r.raw[..r.raw.len().min(64)]
            );
            assert_eq!(r.header.command, r.decoded.packet.command().code());
            assert_eq!(r.header.kind, r.decoded.kind);
            assert_eq!(r.raw.len(), r.header.kind.size() + r.header.length as usize);
            // Capture order: by completing frame, then stream, then offset.
            let key = (r.frame, r.stream, r.offset);
            assert!(key >= last, "{name}: records out of order at {key:?}");
            last = key;
        }
        total += a.records.len();
    }
    println!("decoded and re-encoded {total} DRBD packets");
}

#[test]
fn handshake_capture_holds_the_whole_handshake() {
    let Some(a) = load("01-handshake.pcap.gz") else {
        return;
    };
    let counts = a.command_counts();
    for (name, n) in [
        ("P_INITIAL_DATA", 1),
        ("P_INITIAL_META", 1),
        ("P_CONNECTION_FEATURES", 2),
        ("P_AUTH_CHALLENGE", 2),
        ("P_AUTH_RESPONSE", 2),
        ("P_PROTOCOL", 2),
        ("P_SYNC_PARAM89", 2),
        ("P_SIZES", 2),
        ("P_UUIDS", 2),
        ("P_STATE", 4),
    ] {
        assert_eq!(counts.get(name), Some(&n), "{name} in {counts:?}");
    }
    for r in of(&a, Command::ConnectionFeatures) {
        let Packet::ConnectionFeatures(f) = &r.decoded.packet else {
            unreachable!()
        };
        assert_eq!((f.protocol_max, f.feature_flags), (101, 0xf));
        assert_eq!(r.decoded.kind, HeaderKind::H80);
    }
    for r in of(&a, Command::AuthChallenge) {
        assert_eq!(r.header.length, 64);
        assert_eq!(r.decoded.kind, HeaderKind::H100);
    }
    for r in of(&a, Command::AuthResponse) {
        assert_eq!(r.header.length, 20);
    }
    for r in of(&a, Command::Protocol) {
        let Packet::Protocol(p) = &r.decoded.packet else {
            unreachable!()
        };
        assert_eq!((p.protocol, p.two_primaries), (3, 1));
        assert_eq!(p.integrity_alg, "");
    }
    // The agreed context reached every h100 packet, the meta socket's included.
    let agreed = (101, 0xf);
    for r in a
        .records
        .iter()
        .filter(|r| r.decoded.kind == HeaderKind::H100)
    {
        assert_eq!(
            (r.context.protocol_version, r.context.features),
            agreed,
            "frame {}",
            r.frame
        );
    }
    // With FF_WSAME agreed, P_SIZES carries the queue limits.
    for r in of(&a, Command::Sizes) {
        let Packet::Sizes(s) = &r.decoded.packet else {
            unreachable!()
        };
        assert!(s.queue_limits.is_some());
        assert_eq!(s.d_size, 32688);
    }
    // Data and meta socket are two TCP connections between the same hosts.
    let data = of(&a, Command::InitialData)[0];
    let meta = of(&a, Command::InitialMeta)[0];
    assert_ne!(data.stream, meta.stream);
    let hosts = |r: &DrbdRecord| {
        let mut v = [r.direction.src.ip(), r.direction.dst.ip()];
        v.sort();
        v
    };
    assert_eq!(hosts(data), hosts(meta));
    // It ends Connected Secondary/Secondary Inconsistent/Inconsistent.
    let last_state = of(&a, Command::State)
        .last()
        .map(|r| r.decoded.packet.clone());
    let Some(Packet::State(st)) = last_state else {
        panic!("no P_STATE")
    };
    assert_eq!(
        (st.role(), st.peer(), st.conn(), st.disk(), st.pdsk()),
        (2, 2, 10, 4, 4)
    );
}

#[test]
fn full_sync_capture_moves_the_whole_device_of_zeros() {
    let Some(a) = load("02-initial-full-sync.pcap.gz") else {
        return;
    };
    let replies = data_payloads(&a, Command::RsDataReply);
    assert_eq!(replies.len(), 16);
    let mut bytes = 0;
    for (r, d) in &replies {
        assert!(d.data.len() <= 1 << 20, "frame {}", r.frame);
        assert!(d.data.iter().all(|&b| b == 0));
        assert_eq!(d.block_id, BlockId::SYNCER);
        bytes += d.data.len();
    }
    // The whole usable device: 32688 sectors (16344 KiB), in requests of at most 1 MiB.
    assert_eq!(bytes, 32688 * 512);
    assert_eq!(of(&a, Command::RsDataRequest).len(), 16);
    assert_eq!(of(&a, Command::RsWriteAck).len(), 16);
    assert_eq!(of(&a, Command::CompressedBitmap).len(), 2);
    assert_eq!(of(&a, Command::SyncUuid).len(), 1);
}

#[test]
fn dual_primary_capture_carries_the_written_patterns() {
    let Some(a) = load("03-dual-primary-writes.pcap.gz") else {
        return;
    };
    let data = data_payloads(&a, Command::Data);
    assert_eq!(data.len(), 34);
    for (tag, sector) in [
        ("alpha-w1 off=0k", 0u64),
        ("bravo-w1 off=1024k", 2048),
        ("alpha-w2 off=4k", 8),
        ("bravo-w2 off=2048k", 4096),
    ] {
        let needle = format!("drbdlab {tag}");
        let hit = data
            .iter()
            .find(|(_, d)| contains(&d.data, needle.as_bytes()))
            .unwrap_or_else(|| panic!("no P_DATA holds {needle:?}"));
        assert_eq!(hit.1.sector, sector, "{needle}");
    }
    assert_eq!(of(&a, Command::WriteAck).len(), 34);
    assert_eq!(of(&a, Command::Barrier).len(), 34);
    assert_eq!(of(&a, Command::BarrierAck).len(), 34);
    // Every write ack echoes the block_id of a P_DATA.
    for r in of(&a, Command::WriteAck) {
        let Packet::WriteAck(ack) = &r.decoded.packet else {
            unreachable!()
        };
        assert!(data
            .iter()
            .any(|(_, d)| d.block_id == ack.block_id && d.sector == ack.sector));
    }
    // Both nodes end up Primary.
    assert!(of(&a, Command::State).iter().any(|r| matches!(
        &r.decoded.packet,
        Packet::State(s) if s.role() == 1 && s.peer() == 1
    )));
}

#[test]
fn reconnect_capture_resyncs_264_kib() {
    let Some(a) = load("04-disconnect-bitmap-resync.pcap.gz") else {
        return;
    };
    for cmd in [
        Command::ConnStChgReq,
        Command::ConnStChgReply,
        Command::InitialData,
        Command::InitialMeta,
        Command::SyncUuid,
    ] {
        assert!(!of(&a, cmd).is_empty(), "{cmd}");
    }
    assert_eq!(of(&a, Command::ConnectionFeatures).len(), 2);
    let resynced: usize = data_payloads(&a, Command::RsDataReply)
        .iter()
        .map(|(_, d)| d.data.len())
        .sum();
    assert_eq!(resynced, 264 * 1024);
    let all: Vec<u8> = data_payloads(&a, Command::RsDataReply)
        .iter()
        .flat_map(|(_, d)| d.data.to_vec())
        .collect();
    assert!(contains(&all, b"drbdlab alpha-degraded-2 off=5120k"));
}

#[test]
fn verify_capture_has_4086_in_sync_results() {
    let Some(a) = load("05-online-verify.pcap.gz") else {
        return;
    };
    assert_eq!(of(&a, Command::OvRequest).len(), 4086);
    let replies = of(&a, Command::OvReply);
    assert_eq!(replies.len(), 4086);
    for r in &replies {
        let Packet::OvReply(d) = &r.decoded.packet else {
            unreachable!()
        };
        assert_eq!(d.digest.len(), 20, "sha1 digest, frame {}", r.frame);
    }
    let results = of(&a, Command::OvResult);
    assert_eq!(results.len(), 4086);
    assert!(results.iter().all(|r| matches!(
        &r.decoded.packet,
        Packet::OvResult(ack) if ack.block_id == ID_IN_SYNC
    )));
}

#[test]
fn diskless_capture_has_both_bitmap_kinds() {
    let Some(a) = load("09-diskless-read-reattach.pcap.gz") else {
        return;
    };
    let alpha: std::net::IpAddr = "10.99.0.11".parse().expect("ip");
    let bravo: std::net::IpAddr = "10.99.0.12".parse().expect("ip");
    let plain = of(&a, Command::Bitmap);
    assert!(!plain.is_empty());
    assert!(plain.iter().all(|r| r.direction.src.ip() == alpha));
    let compressed = of(&a, Command::CompressedBitmap);
    assert!(compressed.iter().any(|r| r.direction.src.ip() == bravo));
    assert_eq!(of(&a, Command::DataRequest).len(), 16);
    assert_eq!(data_payloads(&a, Command::DataReply).len(), 16);
    assert!(data_payloads(&a, Command::Data)
        .iter()
        .any(|(_, d)| contains(&d.data, b"drbdlab bravo-diskless off=10240k")));
    assert_eq!(of(&a, Command::ProtocolUpdate).len(), 1);
}

#[test]
fn down_capture_tears_down() {
    let Some(a) = load("10-down.pcap.gz") else {
        return;
    };
    let counts = a.command_counts();
    assert_eq!(counts.get("P_CONN_ST_CHG_REQ"), Some(&1));
    assert_eq!(counts.get("P_CONN_ST_CHG_REPLY"), Some(&1));
    assert_eq!(counts.get("P_STATE"), Some(&1));
}

#[test]
fn host_peer_captures_agree_on_no_features() {
    let Some(dir) = captures_dir() else { return };
    for name in [
        "host-peer-tap.pcap",
        "host-peer-slirp.pcap",
        "host-peer-slirp-guest-side.pcap",
    ] {
        let a = analyze_path(&dir.join(name));
        // The Python peer announced feature flags 0, so the agreement is 0 and the kernel
        // sends the short 32-byte P_SIZES without queue limits.
        let features: Vec<u32> = of(&a, Command::ConnectionFeatures)
            .iter()
            .map(|r| match &r.decoded.packet {
                Packet::ConnectionFeatures(f) => f.feature_flags,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(features.len(), 2, "{name}");
        assert!(features.contains(&0) && features.contains(&0xf), "{name}");
        let sizes = of(&a, Command::Sizes);
        assert_eq!(sizes.len(), 1, "{name}");
        assert_eq!(sizes[0].header.length, 32, "{name}");
        assert!(matches!(
            &sizes[0].decoded.packet,
            Packet::Sizes(Sizes {
                queue_limits: None,
                ..
            })
        ));
        assert_eq!(sizes[0].context.features, 0, "{name}");
        assert_eq!(sizes[0].context.protocol_version, 101, "{name}");
        // The meta socket (different ports, same hosts) took the same agreement.
        let meta = of(&a, Command::InitialMeta);
        assert_eq!(meta.len(), 1, "{name}");
        for r in a.records.iter().filter(|r| r.stream == meta[0].stream) {
            if r.decoded.kind == HeaderKind::H100 {
                assert_eq!(r.context.features, 0, "{name} frame {}", r.frame);
            }
        }
    }
}

/// Per-command counts from tshark's DRBD dissector, keyed by command code.
fn tshark_counts(tshark: &Path, file: &Path) -> BTreeMap<u16, usize> {
    let out = Process::new(tshark)
        .args(["-r"])
        .arg(file)
        .args([
            "--enable-heuristic",
            "drbd_tcp",
            // DRBD's heuristic before port-registered dissectors: an ephemeral port
            // such as 48049 (CBSP) must not claim a DRBD connection.
            "-o",
            "tcp.try_heuristic_first:TRUE",
            "-Y",
            "drbd",
            "-T",
            "fields",
            "-e",
            "drbd.command",
        ])
        .output()
        .expect("run tshark");
    assert!(
        out.status.success(),
        "tshark failed on {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut counts = BTreeMap::new();
    for field in String::from_utf8_lossy(&out.stdout)
        .split(['\n', ','])
        .map(str::trim)
        .filter(|f| !f.is_empty())
    {
        let code = u16::from_str_radix(field.trim_start_matches("0x"), 16)
            .unwrap_or_else(|_| panic!("tshark printed {field:?}"));
        *counts.entry(code).or_insert(0) += 1;
    }
    counts
}

fn find_tshark() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("tshark"))
            .find(|p| p.is_file())
    })
}

#[test]
fn packet_counts_match_tshark() {
    let Some(dir) = captures_dir() else { return };
    let Some(tshark) = find_tshark() else {
        assert!(!under_ci(), "tshark is not installed (required under CI)");
        println!("SKIP: tshark not installed");
        return;
    };
    for path in capture_files(&dir) {
        let a = analyze_path(&path);
        let mut ours = BTreeMap::new();
        for r in &a.records {
            *ours.entry(r.header.command).or_insert(0usize) += 1;
        }
        let theirs = tshark_counts(&tshark, &path);
        assert_eq!(
            ours,
            theirs,
            "{}: per-command counts (code -> count) differ from tshark",
            path.display()
        );
    }
}

fn wiredump() -> Process {
    Process::new(env!("CARGO_BIN_EXE_drbd-wiredump"))
}

#[test]
fn wiredump_prints_the_handshake() {
    let Some(dir) = captures_dir() else { return };
    let path = dir.join("01-handshake.pcap.gz");
    let out = wiredump().arg(&path).output().expect("run drbd-wiredump");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    let a = analyze_path(&path);
    assert_eq!(lines.len(), a.records.len());
    let data = of(&a, Command::InitialData)[0];
    assert_eq!(
        lines[0],
        format!(
            "#{} s{} {} P_INITIAL_DATA cmd=0xfff2 len=0 hdr=h80",
            data.frame, data.stream, data.direction
        )
    );
    assert!(lines.iter().any(|l| l.contains(
        "P_CONNECTION_FEATURES cmd=0xfffe len=72 hdr=h80 proto_min=86 proto_max=101 features=0xf"
    )));
    assert!(lines.iter().any(|l| l
        .contains("P_PROTOCOL cmd=0x000b len=25 hdr=h100 vol=0 protocol=C")
        && l.contains("two_primaries=1 integrity_alg=\"\"")));
    assert!(lines
        .iter()
        .any(|l| l.contains("P_SIZES cmd=0x000d len=56") && l.contains("d_size=32688")));
    assert!(lines.iter().any(|l| l.ends_with(
        "P_STATE cmd=0x000e len=4 hdr=h100 vol=0 role=Secondary peer=Secondary conn=Connected \
         disk=Inconsistent pdsk=Inconsistent"
    )));
    assert!(lines
        .iter()
        .any(|l| l.contains("P_SYNC_PARAM89") && l.contains("rate=102400 verify_alg=\"sha1\"")));
}

fn gunzip(path: &Path) -> Vec<u8> {
    let file = std::fs::File::open(path).expect("open capture");
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(file)
        .read_to_end(&mut out)
        .expect("gunzip");
    out
}

#[test]
fn wiredump_names_the_stream_of_a_corrupted_packet() {
    let Some(dir) = captures_dir() else { return };
    let path = dir.join("01-handshake.pcap.gz");
    let a = analyze_path(&path);
    // Corrupt the magic of the first P_PROTOCOL (an h100 packet of the data socket).
    let victim = of(&a, Command::Protocol)[0];
    let mut bytes = gunzip(&path);
    let head = &victim.raw[..8];
    let at = bytes
        .windows(head.len())
        .position(|w| w == head)
        .expect("packet bytes in the file");
    bytes[at] ^= 0xff;
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad = tmp.path().join("corrupt.pcap");
    std::fs::write(&bad, &bytes).expect("write copy");
    let out = wiredump().arg(&bad).output().expect("run drbd-wiredump");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "cannot decode s{} {} offset {}",
        victim.stream, victim.direction, victim.offset
    );
    assert!(err.contains(&expected), "stderr {err:?} lacks {expected:?}");
    assert!(err.contains("bad magic"), "{err}");
    // The packets before it are still printed.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("P_AUTH_RESPONSE"));
}

#[test]
fn wiredump_arguments_and_bad_files() {
    let out = wiredump().arg("--help").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("usage: drbd-wiredump"));
    let out = wiredump().output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no capture file given"));
    let out = wiredump()
        .args(["--bogus", "x.pcap"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown option --bogus"));
    let out = wiredump().args(["a.pcap", "b.pcap"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));

    let tmp = tempfile::tempdir().expect("tempdir");
    let text = tmp.path().join("notes.txt");
    std::fs::write(&text, "this is not a capture\n").expect("write");
    let out = wiredump().arg(&text).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a pcap file"), "{err}");
    let out = wiredump()
        .arg(tmp.path().join("missing.pcap"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open"));
}

// ---------------------------------------------------------------------------------------
// Synthetic captures: the reassembly and context tracking, without the shared captures.
// ---------------------------------------------------------------------------------------

const ALPHA: &str = "10.0.0.1";
const BRAVO: &str = "10.0.0.2";

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port)
}

fn frame_bytes(kind: HeaderKind, packet: Packet, ctx: &WireContext) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(
        &Frame {
            kind,
            volume: 0,
            packet,
        },
        ctx,
        &mut out,
    )
    .expect("encode");
    out.to_vec()
}

/// One direction's TCP segments: (sequence number relative to the ISN + 1, flags, bytes).
struct Seg {
    from_client: bool,
    rel_seq: u32,
    flags: u8,
    data: Vec<u8>,
}

/// A TCP connection between `client` and `server` for building synthetic captures.
struct Conn {
    client: SocketAddr,
    server: SocketAddr,
    isn_c: u32,
    isn_s: u32,
}

impl Conn {
    fn frame(&self, s: &Seg) -> Vec<u8> {
        let (src, dst, isn) = if s.from_client {
            (self.client, self.server, self.isn_c)
        } else {
            (self.server, self.client, self.isn_s)
        };
        let seq = if s.flags & flags::SYN != 0 {
            isn
        } else {
            isn.wrapping_add(1).wrapping_add(s.rel_seq)
        };
        build_ethernet_tcp(src, dst, seq, 0, s.flags, &s.data)
    }

    fn handshake(&self) -> Vec<Vec<u8>> {
        vec![
            self.frame(&Seg {
                from_client: true,
                rel_seq: 0,
                flags: flags::SYN,
                data: vec![],
            }),
            self.frame(&Seg {
                from_client: false,
                rel_seq: 0,
                flags: flags::SYN | flags::ACK,
                data: vec![],
            }),
        ]
    }
}

fn seg(from_client: bool, rel_seq: usize, data: &[u8]) -> Seg {
    Seg {
        from_client,
        rel_seq: u32::try_from(rel_seq).expect("small"),
        flags: flags::ACK | flags::PSH,
        data: data.to_vec(),
    }
}

fn write_pcap(frames: &[Vec<u8>], order: ByteOrder, res: TsResolution) -> Vec<u8> {
    let mut w = PcapWriter::new(order, res, 1);
    for (i, f) in frames.iter().enumerate() {
        w.push(1_700_000_000, u32::try_from(i).expect("small") * 1000, f);
    }
    w.into_bytes()
}

fn analyze_bytes(bytes: Vec<u8>) -> Analysis {
    let reader = pcap::from_reader(std::io::Cursor::new(bytes)).expect("pcap header");
    analyze(reader, AnalyzeOptions::default())
}

/// The packets a synthetic DRBD connection exchanges, and the capture of it.
struct Synthetic {
    /// Client-to-server data-socket bytes.
    c2s: Vec<u8>,
    /// Server-to-client data-socket bytes.
    s2c: Vec<u8>,
    data: Conn,
    meta: Conn,
    /// Meta socket, client to server.
    meta_c2s: Vec<u8>,
    /// Meta socket, server to client.
    meta_s2c: Vec<u8>,
}

/// A data socket where the sides offer (101, 0xf) and (100, 0x1): the agreement is
/// protocol 100 with TRIM only, so P_SIZES is the 32-byte form; the client's P_PROTOCOL
/// names sha1, so its P_DATA carries a 20-byte digest. A meta socket between the same
/// hosts carries P_INITIAL_META, then pings.
fn synthetic() -> Synthetic {
    let pre = WireContext::default();
    let agreed = WireContext {
        integrity_digest_len: 0,
        features: 0x1,
        protocol_version: 100,
        integrity: None,
    };
    let with_digest = WireContext {
        integrity_digest_len: 20,
        ..agreed
    };
    let mut c2s = frame_bytes(HeaderKind::H80, Packet::InitialData, &pre);
    c2s.extend(frame_bytes(
        HeaderKind::H80,
        Packet::ConnectionFeatures(ConnectionFeatures::new(86, 0xf, 101)),
        &pre,
    ));
    let mut s2c = frame_bytes(
        HeaderKind::H80,
        Packet::ConnectionFeatures(ConnectionFeatures::new(86, 0x1, 100)),
        &pre,
    );
    let protocol = Protocol {
        protocol: 3,
        integrity_alg: "sha1".to_string(),
        ..Protocol::default()
    };
    c2s.extend(frame_bytes(
        HeaderKind::H100,
        Packet::Protocol(protocol.clone()),
        &agreed,
    ));
    s2c.extend(frame_bytes(
        HeaderKind::H100,
        Packet::Protocol(protocol),
        &agreed,
    ));
    let sizes = Sizes {
        d_size: 2048,
        c_size: 2048,
        max_bio_size: 1 << 20,
        ..Sizes::default()
    };
    c2s.extend(frame_bytes(HeaderKind::H100, Packet::Sizes(sizes), &agreed));
    let mut block = vec![0u8; 4096];
    for (i, b) in block.iter_mut().enumerate() {
        *b = u8::try_from(i % 251).expect("small");
    }
    c2s.extend(frame_bytes(
        HeaderKind::H100,
        Packet::Data(DataPacket {
            sector: 8,
            block_id: BlockId([1, 2, 3, 4, 5, 6, 7, 8]),
            seq_num: 1,
            dp_flags: 0x102,
            digest: Bytes::from(vec![0xab; 20]),
            data: Bytes::from(block),
        }),
        &with_digest,
    ));
    let meta_c2s = frame_bytes(HeaderKind::H80, Packet::InitialMeta, &pre);
    let mut meta_s2c = frame_bytes(HeaderKind::H100, Packet::Ping, &agreed);
    meta_s2c.extend(frame_bytes(HeaderKind::H100, Packet::PingAck, &agreed));
    Synthetic {
        c2s,
        s2c,
        data: Conn {
            client: sa(ALPHA, 40000),
            server: sa(BRAVO, 7789),
            isn_c: 1000,
            isn_s: u32::MAX - 100, // wraps during the stream
        },
        meta: Conn {
            client: sa(BRAVO, 40001),
            server: sa(ALPHA, 7789),
            isn_c: 5,
            isn_s: 77,
        },
        meta_c2s,
        meta_s2c,
    }
}

/// Packet boundaries in a byte stream of h80/h100 frames.
fn boundaries(stream: &[u8]) -> Vec<usize> {
    let mut at = 0;
    let mut out = vec![0];
    while at < stream.len() {
        let h = drbd_net::wire::Header::parse(&stream[at..])
            .expect("header")
            .expect("complete");
        at += h.kind.size() + h.length as usize;
        out.push(at);
    }
    out
}

/// Builds the capture in the natural order, each data-socket direction cut into the given
/// segment sizes (no reordering); `mangle` may rearrange the client-to-server segments.
fn capture_frames(
    sy: &Synthetic,
    cut: usize,
    mangle: impl Fn(Vec<Seg>) -> Vec<Seg>,
) -> Vec<Vec<u8>> {
    let mut frames = sy.data.handshake();
    frames.extend(sy.meta.handshake());
    let b = boundaries(&sy.c2s);
    // Client: initial data + features; server: features; then the rest.
    let split_c = b[2];
    let split_s = boundaries(&sy.s2c)[1];
    frames.push(sy.data.frame(&seg(true, 0, &sy.c2s[..split_c])));
    frames.push(sy.meta.frame(&seg(true, 0, &sy.meta_c2s)));
    frames.push(sy.data.frame(&seg(false, 0, &sy.s2c[..split_s])));
    frames.push(sy.data.frame(&seg(false, split_s, &sy.s2c[split_s..])));
    let mut segs = Vec::new();
    let mut at = split_c;
    while at < sy.c2s.len() {
        let end = (at + cut).min(sy.c2s.len());
        segs.push(seg(true, at, &sy.c2s[at..end]));
        at = end;
    }
    for s in mangle(segs) {
        frames.push(sy.data.frame(&s));
    }
    frames.push(sy.meta.frame(&seg(false, 0, &sy.meta_s2c)));
    frames
}

fn summarize(a: &Analysis) -> Vec<(usize, &'static str, u64, WireContext, Vec<u8>)> {
    a.records
        .iter()
        .map(|r| {
            (
                r.stream,
                r.decoded.packet.command().name(),
                r.offset,
                r.context,
                r.raw.to_vec(),
            )
        })
        .collect()
}

fn check_synthetic(a: &Analysis, sy: &Synthetic) {
    assert!(a.failures.is_empty(), "{:?}", a.failures);
    assert!(a.notices.is_empty(), "{:?}", a.notices);
    let names: Vec<&str> = a
        .records
        .iter()
        .map(|r| r.decoded.packet.command().name())
        .collect();
    assert_eq!(
        names,
        [
            "P_INITIAL_DATA",
            "P_CONNECTION_FEATURES",
            "P_INITIAL_META",
            "P_CONNECTION_FEATURES",
            "P_PROTOCOL",
            "P_PROTOCOL",
            "P_SIZES",
            "P_DATA",
            "P_PING",
            "P_PING_ACK"
        ]
    );
    let by_name = |n: &str| {
        a.records
            .iter()
            .find(|r| r.decoded.packet.command().name() == n)
            .expect("present")
    };
    let sizes = by_name("P_SIZES");
    assert_eq!(sizes.header.length, 32);
    assert_eq!(
        (sizes.context.protocol_version, sizes.context.features),
        (100, 0x1)
    );
    let data = by_name("P_DATA");
    assert_eq!(data.context.integrity_digest_len, 20);
    let Packet::Data(d) = &data.decoded.packet else {
        unreachable!()
    };
    assert_eq!((d.digest.len(), d.data.len(), d.sector), (20, 4096, 8));
    // The meta socket took the data socket's agreement.
    let ping = by_name("P_PING");
    assert_eq!(
        (ping.context.protocol_version, ping.context.features),
        (100, 0x1)
    );
    assert_eq!(ping.direction.src, sy.meta.server);
    // Raw bytes are the stream's bytes.
    let c2s: Vec<u8> = a
        .records
        .iter()
        .filter(|r| r.direction.src == sy.data.client)
        .flat_map(|r| r.raw.to_vec())
        .collect();
    assert_eq!(c2s, sy.c2s);
}

#[test]
fn synthetic_in_order_capture_decodes_with_tracked_context() {
    let sy = synthetic();
    let frames = capture_frames(&sy, 1448, |s| s);
    let a = analyze_bytes(write_pcap(&frames, ByteOrder::Little, TsResolution::Micro));
    check_synthetic(&a, &sy);
    assert_eq!(a.streams.len(), 2);
}

#[test]
fn synthetic_out_of_order_retransmitted_and_overlapping_segments() {
    let sy = synthetic();
    let reference = analyze_bytes(write_pcap(
        &capture_frames(&sy, 1000, |s| s),
        ByteOrder::Little,
        TsResolution::Micro,
    ));
    // Reverse the order of all segments, retransmit the first twice, and add a segment that
    // overlaps two others with wrong bytes (the first-received bytes must win).
    let frames = capture_frames(&sy, 1000, |segs| {
        let mut out: Vec<Seg> = Vec::new();
        let overlap_at = segs[1].rel_seq as usize + 500;
        let mut junk = seg(true, overlap_at, &[0xee; 1000]);
        junk.rel_seq = u32::try_from(overlap_at).expect("small");
        out.push(junk);
        for s in segs.iter().rev() {
            out.push(seg(true, s.rel_seq as usize, &s.data));
        }
        out.push(seg(true, segs[0].rel_seq as usize, &segs[0].data));
        out.push(seg(true, segs[0].rel_seq as usize, &segs[0].data));
        out
    });
    let a = analyze_bytes(write_pcap(&frames, ByteOrder::Little, TsResolution::Micro));
    // The junk segment arrived first, so its bytes were kept: the P_DATA payload differs.
    // Rebuild the expectation: everything still decodes, in the same order.
    assert!(a.failures.is_empty(), "{:?}", a.failures);
    assert!(a.notices.is_empty(), "{:?}", a.notices);
    let names = |a: &Analysis| -> Vec<&'static str> {
        a.records
            .iter()
            .map(|r| r.decoded.packet.command().name())
            .collect()
    };
    assert_eq!(names(&a), names(&reference));
    let data = a
        .records
        .iter()
        .find(|r| r.decoded.packet.command() == Command::Data)
        .expect("P_DATA");
    assert!(contains(&data.raw, &[0xee; 1000]));

    // Same again without the junk: reversed order plus retransmissions gives exactly the
    // reference records (except the completing frame numbers).
    let frames = capture_frames(&sy, 1000, |segs| {
        let mut out: Vec<Seg> = segs
            .iter()
            .rev()
            .map(|s| seg(true, s.rel_seq as usize, &s.data))
            .collect();
        out.push(seg(true, segs[0].rel_seq as usize, &segs[0].data));
        // An overlapping retransmission of bytes already delivered.
        let s = &segs[1];
        out.push(seg(true, s.rel_seq as usize + 10, &s.data[10..]));
        out
    });
    let a = analyze_bytes(write_pcap(&frames, ByteOrder::Little, TsResolution::Micro));
    check_synthetic(&a, &sy);
    assert_eq!(summarize(&a), summarize(&reference));
}

#[test]
fn synthetic_gap_stops_the_direction_and_is_reported() {
    let sy = synthetic();
    let frames = capture_frames(&sy, 1000, |mut segs| {
        segs.remove(3); // inside the P_DATA packet
        segs
    });
    let a = analyze_bytes(write_pcap(&frames, ByteOrder::Little, TsResolution::Micro));
    assert!(a.failures.is_empty(), "{:?}", a.failures);
    assert!(a
        .records
        .iter()
        .all(|r| r.decoded.packet.command() != Command::Data));
    let gaps: Vec<&Notice> = a
        .notices
        .iter()
        .filter(|n| matches!(n, Notice::Stream { .. }))
        .collect();
    assert_eq!(gaps.len(), 1, "{:?}", a.notices);
    let text = gaps[0].to_string();
    assert!(text.contains(&sy.data.client.to_string()), "{text}");
    assert!(text.contains("gap in the capture"), "{text}");
    // Everything before the gap decoded.
    assert!(a
        .records
        .iter()
        .any(|r| r.decoded.packet.command() == Command::Sizes));
}

#[test]
fn synthetic_capture_in_every_container_gives_the_same_records() {
    let sy = synthetic();
    let frames = capture_frames(&sy, 700, |s| s);
    let reference = analyze_bytes(write_pcap(&frames, ByteOrder::Little, TsResolution::Micro));
    check_synthetic(&reference, &sy);
    let want = summarize(&reference);
    for (order, res) in [
        (ByteOrder::Big, TsResolution::Micro),
        (ByteOrder::Little, TsResolution::Nano),
        (ByteOrder::Big, TsResolution::Nano),
    ] {
        let a = analyze_bytes(write_pcap(&frames, order, res));
        assert_eq!(summarize(&a), want, "{order:?} {res:?}");
    }
    // gzip.
    let plain = write_pcap(&frames, ByteOrder::Big, TsResolution::Nano);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&plain).expect("gzip");
    let a = analyze_bytes(gz.finish().expect("gzip"));
    assert_eq!(summarize(&a), want, "gzip");
    // Other link types: Linux cooked (113), raw IP (101), BSD NULL (0).
    for (link, rewrite) in [(113u32, 0usize), (101, 1), (0, 2)] {
        let mut w = PcapWriter::new(ByteOrder::Little, TsResolution::Micro, link);
        for f in &frames {
            let ip = &f[14..];
            let v6 = ip[0] >> 4 == 6;
            let mut out = Vec::new();
            match rewrite {
                0 => {
                    out.extend_from_slice(&[0, 0, 0, 1, 0, 6, 0x52, 0x54, 0, 0, 0, 1, 0, 0]);
                    out.extend_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
                }
                1 => {}
                _ => out.extend_from_slice(&(if v6 { 10u32 } else { 2u32 }).to_le_bytes()),
            }
            out.extend_from_slice(ip);
            w.push(1, 0, &out);
        }
        let a = analyze_bytes(w.into_bytes());
        assert_eq!(summarize(&a), want, "link type {link}");
    }
}

#[test]
fn synthetic_ipv6_capture_decodes() {
    let mut sy = synthetic();
    sy.data.client = sa("fd00::1", 40000);
    sy.data.server = sa("fd00::2", 7789);
    sy.meta.client = sa("fd00::2", 40001);
    sy.meta.server = sa("fd00::1", 7789);
    let frames = capture_frames(&sy, 1200, |s| s);
    let a = analyze_bytes(write_pcap(&frames, ByteOrder::Little, TsResolution::Micro));
    check_synthetic(&a, &sy);
}

#[test]
fn synthetic_mid_connection_capture_uses_the_assumed_context() {
    // No SYNs and no handshake: the stream starts at an h100 P_SIZES with queue limits,
    // which decodes only under the assumed kernel context (FF_WSAME agreed).
    let ctx = drbd_net::capture::drbd::KERNEL_84_CONTEXT;
    let sizes = Sizes {
        d_size: 1,
        queue_limits: Some(Default::default()),
        ..Sizes::default()
    };
    let bytes = frame_bytes(HeaderKind::H100, Packet::Sizes(sizes), &ctx);
    let conn = Conn {
        client: sa(ALPHA, 1),
        server: sa(BRAVO, 7789),
        isn_c: 9,
        isn_s: 9,
    };
    let frames = vec![conn.frame(&seg(true, 0, &bytes))];
    let a = analyze_bytes(write_pcap(&frames, ByteOrder::Little, TsResolution::Micro));
    assert!(a.failures.is_empty(), "{:?}", a.failures);
    assert_eq!(a.records.len(), 1);
    assert_eq!(a.records[0].context, ctx);
}

#[test]
fn non_drbd_streams_are_ignored() {
    let conn = Conn {
        client: sa(ALPHA, 1234),
        server: sa(BRAVO, 80),
        isn_c: 1,
        isn_s: 2,
    };
    let mut frames = conn.handshake();
    frames.push(conn.frame(&seg(true, 0, b"GET / HTTP/1.0\r\n\r\n")));
    frames.push(conn.frame(&seg(false, 0, b"HTTP/1.0 200 OK\r\n\r\n")));
    let a = analyze_bytes(write_pcap(&frames, ByteOrder::Little, TsResolution::Micro));
    assert!(a.records.is_empty() && a.failures.is_empty() && a.notices.is_empty());
    assert_eq!(a.streams.len(), 1);
    assert_eq!(a.streams[0].drbd, [false, false]);
}

/// Deterministic pseudo-random numbers (64-bit LCG, high bits) for the mutation test.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next()).unwrap_or(0) % n.max(1)
    }
}

#[test]
fn mutated_captures_never_panic() {
    let sy = synthetic();
    let mut inputs = vec![write_pcap(
        &capture_frames(&sy, 900, |s| s),
        ByteOrder::Little,
        TsResolution::Micro,
    )];
    if let Some(dir) = captures_dir() {
        inputs.push(gunzip(&dir.join("01-handshake.pcap.gz")));
    }
    let mut rng = Lcg(0x5eed);
    for base in &inputs {
        for round in 0..1500 {
            let mut bytes = base.clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(bytes.len());
                bytes[at] ^= u8::try_from(1 + rng.below(255)).unwrap_or(1);
            }
            if round % 10 == 0 {
                let keep = rng.below(bytes.len());
                bytes.truncate(keep);
            }
            if let Ok(reader) = pcap::from_reader(std::io::Cursor::new(bytes)) {
                let a = analyze(reader, AnalyzeOptions::default());
                // Whatever decoded still re-encodes to its bytes.
                for r in &a.records {
                    let mut out = BytesMut::new();
                    if encode(&r.decoded, &r.context, &mut out).is_ok() {
                        assert_eq!(&out[..], &r.raw[..]);
                    }
                }
            }
        }
    }
}
