//! Taking a captured frame apart down to its TCP segment: link layer (Ethernet with VLAN
//! tags, Linux cooked v1/v2, raw IP, BSD loopback), IPv4 or IPv6 (with extension headers),
//! then TCP.
//!
//! Everything is bounds-checked: a frame that is not TCP, or is malformed, yields a
//! [`Skip`] reason instead of a segment; nothing here panics on any input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::pcap::LinkType;

/// EtherType of IPv4.
const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
const ETHERTYPE_IPV6: u16 = 0x86dd;
/// EtherTypes of 802.1Q / 802.1ad / QinQ VLAN tags (each tag is 4 bytes).
const ETHERTYPE_VLAN: [u16; 3] = [0x8100, 0x88a8, 0x9100];
/// At most this many stacked VLAN tags are skipped (QinQ uses two; more is malformed).
const MAX_VLAN_TAGS: usize = 4;
/// At most this many IPv6 extension headers are walked before giving up.
const MAX_IPV6_EXT_HEADERS: usize = 8;
/// IP protocol number of TCP.
const IPPROTO_TCP: u8 = 6;
/// BSD address-family values that mean IPv6 (they differ between BSDs).
const AF_INET6_VALUES: [u32; 3] = [10, 24, 28];
/// BSD address-family values that mean IPv6 on macOS (30) as well.
const AF_INET6_DARWIN: u32 = 30;
/// BSD/Linux AF_INET.
const AF_INET: u32 = 2;

/// TCP header flag bits.
pub mod flags {
    /// FIN: the sender has no more data.
    pub const FIN: u8 = 0x01;
    /// SYN: synchronize sequence numbers.
    pub const SYN: u8 = 0x02;
    /// RST: reset the connection.
    pub const RST: u8 = 0x04;
    /// PSH: push.
    pub const PSH: u8 = 0x08;
    /// ACK: the acknowledgment field is significant.
    pub const ACK: u8 = 0x10;
}

/// A TCP segment found in a frame. `payload` borrows the frame's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSegment<'a> {
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// Sequence number of the first payload byte (or of the SYN/FIN).
    pub seq: u32,
    /// Acknowledgment number (meaningful when `flags & ACK`).
    pub ack: u32,
    /// The TCP flag bits (see [`flags`]).
    pub flags: u8,
    /// The captured payload bytes. When the snap length cut the frame, only the captured
    /// part: the bytes cut off show up as a hole (a gap) in the reassembled stream.
    pub payload: &'a [u8],
}

/// Why a frame yielded no TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The link type is not one this reader understands.
    UnsupportedLinkType,
    /// Not IPv4 or IPv6.
    NotIp,
    /// IP, but not TCP.
    NotTcp,
    /// A non-first IPv4 fragment, or a fragmented IPv6 packet (not reassembled).
    Fragment,
    /// A header was cut short or held impossible values.
    Malformed,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Extracts the TCP segment of one captured frame. `orig_len` is the frame's length on the
/// wire, used to tell how many payload bytes the snap length cut off.
pub fn parse_frame(link: LinkType, data: &[u8], orig_len: u32) -> Result<TcpSegment<'_>, Skip> {
    // Bytes of the frame the capture dropped at its end.
    let cut = (orig_len as usize).saturating_sub(data.len());
    let (ethertype_or_version, l3) = match link {
        LinkType::Ethernet => ethernet(data)?,
        LinkType::LinuxSll => {
            let proto = be16(data, 14).ok_or(Skip::Malformed)?;
            (Some(proto), data.get(16..).ok_or(Skip::Malformed)?)
        }
        LinkType::LinuxSll2 => {
            let proto = be16(data, 0).ok_or(Skip::Malformed)?;
            (Some(proto), data.get(20..).ok_or(Skip::Malformed)?)
        }
        LinkType::RawIp => (None, data),
        LinkType::Null | LinkType::Loop => {
            let fam = data.get(0..4).ok_or(Skip::Malformed)?;
            let fam = [fam[0], fam[1], fam[2], fam[3]];
            // NULL stores the family in the capturing host's byte order, which the file does
            // not record; LOOP stores it big-endian. Either order is accepted for both.
            let (le, be) = (u32::from_le_bytes(fam), u32::from_be_bytes(fam));
            let is = |f: &dyn Fn(u32) -> bool| f(le) || f(be);
            let proto = if is(&|v| v == AF_INET) {
                ETHERTYPE_IPV4
            } else if is(&|v| AF_INET6_VALUES.contains(&v) || v == AF_INET6_DARWIN) {
                ETHERTYPE_IPV6
            } else {
                return Err(Skip::NotIp);
            };
            (Some(proto), data.get(4..).ok_or(Skip::Malformed)?)
        }
        LinkType::Other(_) => return Err(Skip::UnsupportedLinkType),
    };
    let version = l3.first().ok_or(Skip::Malformed)? >> 4;
    match (ethertype_or_version, version) {
        (Some(ETHERTYPE_IPV4), 4) | (None, 4) => ipv4(l3, cut),
        (Some(ETHERTYPE_IPV6), 6) | (None, 6) => ipv6(l3, cut),
        (Some(ETHERTYPE_IPV4 | ETHERTYPE_IPV6), _) => Err(Skip::Malformed),
        _ => Err(Skip::NotIp),
    }
}

/// Skips the Ethernet header and any VLAN tags.
fn ethernet(data: &[u8]) -> Result<(Option<u16>, &[u8]), Skip> {
    let mut at = 12;
    let mut ethertype = be16(data, at).ok_or(Skip::Malformed)?;
    let mut tags = 0;
    while ETHERTYPE_VLAN.contains(&ethertype) {
        tags += 1;
        if tags > MAX_VLAN_TAGS {
            return Err(Skip::Malformed);
        }
        at += 4;
        ethertype = be16(data, at).ok_or(Skip::Malformed)?;
    }
    Ok((Some(ethertype), data.get(at + 2..).ok_or(Skip::Malformed)?))
}

/// Parses an IPv4 packet; `cut` bytes of the frame were not captured.
fn ipv4(p: &[u8], cut: usize) -> Result<TcpSegment<'_>, Skip> {
    let ihl = usize::from(p.first().ok_or(Skip::Malformed)? & 0x0f) * 4;
    if ihl < 20 || p.len() < ihl {
        return Err(Skip::Malformed);
    }
    let total = usize::from(be16(p, 2).ok_or(Skip::Malformed)?);
    let frag = be16(p, 6).ok_or(Skip::Malformed)?;
    let more_fragments = frag & 0x2000 != 0;
    let offset = frag & 0x1fff;
    if offset != 0 || more_fragments {
        return Err(Skip::Fragment);
    }
    if p[9] != IPPROTO_TCP {
        return Err(Skip::NotTcp);
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    // Total length 0 is what a capture on a TSO-sending host shows for a super-frame: the
    // length is filled in by the NIC. Then the frame's own length is the packet's.
    let wire_len = if total == 0 { p.len() + cut } else { total };
    if wire_len < ihl {
        return Err(Skip::Malformed);
    }
    let ip_payload_wire = wire_len - ihl;
    // Anything beyond the total length is link-layer padding.
    let captured_end = wire_len.min(p.len());
    let ip_payload = &p[ihl..captured_end];
    tcp(
        IpAddr::V4(src),
        IpAddr::V4(dst),
        ip_payload,
        ip_payload_wire,
    )
}

/// Parses an IPv6 packet, walking extension headers up to TCP.
fn ipv6(p: &[u8], cut: usize) -> Result<TcpSegment<'_>, Skip> {
    if p.len() < 40 {
        return Err(Skip::Malformed);
    }
    let payload_len = usize::from(be16(p, 4).ok_or(Skip::Malformed)?);
    let mut next = p[6];
    let mut src = [0u8; 16];
    src.copy_from_slice(&p[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&p[24..40]);
    // Payload length 0 with more bytes present is a jumbogram or a TSO super-frame: use the
    // frame's length.
    let wire_payload = if payload_len == 0 {
        (p.len() - 40) + cut
    } else {
        payload_len
    };
    let captured_end = (40 + wire_payload).min(p.len());
    let mut body = &p[40..captured_end];
    let mut body_wire = wire_payload;
    let mut walked = 0;
    loop {
        match next {
            IPPROTO_TCP => break,
            // Hop-by-hop, routing, destination options: length in 8-byte units, +8.
            0 | 43 | 60 => {
                let len = (usize::from(*body.get(1).ok_or(Skip::Malformed)?) + 1) * 8;
                next = body[0];
                body = body.get(len..).ok_or(Skip::Malformed)?;
                body_wire = body_wire.checked_sub(len).ok_or(Skip::Malformed)?;
            }
            // Authentication header: length in 4-byte units, +2.
            51 => {
                let len = (usize::from(*body.get(1).ok_or(Skip::Malformed)?) + 2) * 4;
                next = body[0];
                body = body.get(len..).ok_or(Skip::Malformed)?;
                body_wire = body_wire.checked_sub(len).ok_or(Skip::Malformed)?;
            }
            44 => return Err(Skip::Fragment),
            _ => return Err(Skip::NotTcp),
        }
        walked += 1;
        if walked > MAX_IPV6_EXT_HEADERS {
            return Err(Skip::Malformed);
        }
    }
    tcp(
        IpAddr::V6(Ipv6Addr::from(src)),
        IpAddr::V6(Ipv6Addr::from(dst)),
        body,
        body_wire,
    )
}

/// Parses the TCP header; `wire_len` is the segment's length on the wire, `t` what was
/// captured of it.
fn tcp(src: IpAddr, dst: IpAddr, t: &[u8], wire_len: usize) -> Result<TcpSegment<'_>, Skip> {
    let sport = be16(t, 0).ok_or(Skip::Malformed)?;
    let dport = be16(t, 2).ok_or(Skip::Malformed)?;
    let seq = be32(t, 4).ok_or(Skip::Malformed)?;
    let ack = be32(t, 8).ok_or(Skip::Malformed)?;
    let off = usize::from(t.get(12).ok_or(Skip::Malformed)? >> 4) * 4;
    let flag_bits = *t.get(13).ok_or(Skip::Malformed)?;
    if off < 20 || t.len() < off || wire_len < off {
        return Err(Skip::Malformed);
    }
    let payload = &t[off..];
    Ok(TcpSegment {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
        seq,
        ack,
        flags: flag_bits,
        payload,
    })
}

/// Test-support API: builds an Ethernet + IPv4/IPv6 + TCP frame with the given fields, for
/// synthetic captures (the integration tests in `tests/captures.rs` write them with
/// [`PcapWriter`](super::pcap::PcapWriter)). Checksums are left zero (nothing here verifies
/// them).
pub fn build_ethernet_tcp(
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: u32,
    flag_bits: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 40 + 20 + payload.len());
    f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1]);
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push(5 << 4);
    tcp.push(flag_bits);
    tcp.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let total = u16::try_from(20 + tcp.len()).unwrap_or(0);
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&total.to_be_bytes());
            f.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let to6 = |a: IpAddr| match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            let plen = u16::try_from(tcp.len()).unwrap_or(0);
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&plen.to_be_bytes());
            f.extend_from_slice(&[IPPROTO_TCP, 64]);
            f.extend_from_slice(&to6(s).octets());
            f.extend_from_slice(&to6(d).octets());
        }
    }
    f.extend_from_slice(&tcp);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn ethernet_ipv4_tcp() {
        let f = build_ethernet_tcp(
            addr("10.0.0.1:1000"),
            addr("10.0.0.2:7789"),
            100,
            5,
            flags::ACK | flags::PSH,
            b"hello",
        );
        let seg = parse_frame(LinkType::Ethernet, &f, f.len() as u32).expect("tcp");
        assert_eq!(seg.src, addr("10.0.0.1:1000"));
        assert_eq!(seg.dst, addr("10.0.0.2:7789"));
        assert_eq!((seg.seq, seg.ack), (100, 5));
        assert_eq!(seg.payload, b"hello");
        // Ethernet padding after the IP packet is not payload.
        let mut padded = f.clone();
        padded.extend_from_slice(&[0; 6]);
        let seg = parse_frame(LinkType::Ethernet, &padded, padded.len() as u32).expect("tcp");
        assert_eq!(seg.payload, b"hello");
        // A snap length that cut two bytes: only the captured bytes, none invented.
        let cut = &f[..f.len() - 2];
        let seg = parse_frame(LinkType::Ethernet, cut, f.len() as u32).expect("tcp");
        assert_eq!(seg.payload, b"hel");
    }

    #[test]
    fn ipv6_and_other_link_types() {
        let f = build_ethernet_tcp(
            addr("[fd00::1]:1000"),
            addr("[fd00::2]:7789"),
            7,
            0,
            flags::SYN,
            b"",
        );
        let seg = parse_frame(LinkType::Ethernet, &f, f.len() as u32).expect("tcp");
        assert_eq!(seg.src, addr("[fd00::1]:1000"));
        assert_eq!(seg.flags, flags::SYN);
        // Raw IP: drop the Ethernet header.
        let raw = &f[14..];
        let seg = parse_frame(LinkType::RawIp, raw, raw.len() as u32).expect("raw");
        assert_eq!(seg.dst, addr("[fd00::2]:7789"));
        // Linux cooked v1: 16-byte header with the protocol at 14.
        let mut sll = vec![0u8; 14];
        sll.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        sll.extend_from_slice(raw);
        let seg = parse_frame(LinkType::LinuxSll, &sll, sll.len() as u32).expect("sll");
        assert_eq!(seg.seq, 7);
        // NULL loopback with a little-endian AF_INET6 (Linux value 10) family.
        let mut null = 10u32.to_le_bytes().to_vec();
        null.extend_from_slice(raw);
        let seg = parse_frame(LinkType::Null, &null, null.len() as u32).expect("null");
        assert_eq!(seg.seq, 7);
        // VLAN-tagged IPv4.
        let v4 = build_ethernet_tcp(addr("1.2.3.4:1"), addr("5.6.7.8:2"), 1, 0, 0, b"x");
        let mut tagged = v4[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        tagged.extend_from_slice(&v4[12..]);
        let seg = parse_frame(LinkType::Ethernet, &tagged, tagged.len() as u32).expect("vlan");
        assert_eq!(seg.payload, b"x");
    }

    #[test]
    fn garbage_never_panics() {
        let links = [
            LinkType::Ethernet,
            LinkType::RawIp,
            LinkType::LinuxSll,
            LinkType::LinuxSll2,
            LinkType::Null,
            LinkType::Other(999),
        ];
        let f = build_ethernet_tcp(addr("1.2.3.4:1"), addr("5.6.7.8:2"), 1, 0, 0, b"payload");
        for link in links {
            for len in 0..f.len() {
                let _ = parse_frame(link, &f[..len], f.len() as u32);
                let mut g = f.clone();
                g[len] ^= 0xff;
                let _ = parse_frame(link, &g, g.len() as u32);
            }
        }
        assert_eq!(
            parse_frame(LinkType::Other(5), &f, f.len() as u32),
            Err(Skip::UnsupportedLinkType)
        );
    }
}
