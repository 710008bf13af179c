//! The option table: every option keyword of the 8.4 grammar, the section it belongs to, its
//! default, its unit and its range.
//!
//! Ranges and default units are DRBD 8.4's (`drbd_limits.h`); the parser checks the ranges that
//! drbd-utils' 8.4 front end checks at parse time (`range_checked`), and the typed model
//! ([`super::model`]) validates the rest when a resource is put to use.

/// Which section an option keyword belongs to, and how its value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `disk { NAME VALUE; }`
    DiskOption,
    /// `disk { NAME [yes|no]; }`
    DiskFlag,
    /// `disk { no-NAME; }`: the pre-8.4 spelling of `NAME no`.
    DiskNoFlag,
    /// `net { NAME VALUE; }`
    NetOption,
    /// `net { NAME [yes|no]; }`
    NetFlag,
    /// `net { no-NAME; }`
    NetNoFlag,
    /// `net { discard-my-data; }`: only meaningful on the command line.
    NetDelegate,
    /// `options { NAME VALUE; }` (resource options)
    ResOption,
    /// Accepted and ignored (options that older releases had).
    Deprecated,
    /// `startup { NAME VALUE; }`
    StartupOption,
    /// `startup { NAME [yes|no]; }`
    StartupFlag,
    /// `startup { become-primary-on ...; stacked-timeouts; }`: special syntax.
    StartupDelegate,
    /// `handlers { NAME "command"; }`
    Handler,
    /// `proxy { NAME VALUE; }`
    ProxyOption,
    /// `proxy { plugin { ... } }`
    ProxyDelegate,
}

/// The unit in which a bare number is read (`m_strtoll`'s default unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Plain count (or the option's own unit, e.g. tenths of a second).
    One,
    /// KiB.
    Kilo,
    /// 512-byte sectors.
    Sector,
}

/// A numeric range as DRBD 8.4 defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub min: u64,
    pub max: u64,
    pub scale: Scale,
    /// Whether the 8.4 parser checks it while reading the file (others are checked by the
    /// typed model when the resource is used).
    pub range_checked: bool,
}

/// Everything known about one option keyword.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptInfo {
    pub name: &'static str,
    pub class: Class,
    /// Also accepted in the 8.3 `syncer { }` section (and moved to its 8.4 section).
    pub syncer: bool,
    /// Also accepted inside a `proxy { }` section.
    pub proxy: bool,
    /// The 8.4 spelling a deprecated alias is rewritten to.
    pub canonical: Option<&'static str>,
    pub range: Option<Range>,
    /// Allowed values of an enumerated option (None = free text or number).
    pub values: Option<&'static [&'static str]>,
    /// Default value as DRBD 8.4 applies it (None = unset / off).
    pub default: Option<&'static str>,
}

const fn r(min: u64, max: u64, scale: Scale, range_checked: bool) -> Option<Range> {
    Some(Range {
        min,
        max,
        scale,
        range_checked,
    })
}

const fn opt(name: &'static str, class: Class) -> OptInfo {
    OptInfo {
        name,
        class,
        syncer: false,
        proxy: false,
        canonical: None,
        range: None,
        values: None,
        default: None,
    }
}

const fn syncer(mut o: OptInfo) -> OptInfo {
    o.syncer = true;
    o
}
const fn proxy(mut o: OptInfo) -> OptInfo {
    o.proxy = true;
    o
}
const fn ranged(mut o: OptInfo, range: Option<Range>) -> OptInfo {
    o.range = range;
    o
}
const fn def(mut o: OptInfo, default: &'static str) -> OptInfo {
    o.default = Some(default);
    o
}
const fn values(mut o: OptInfo, values: &'static [&'static str]) -> OptInfo {
    o.values = Some(values);
    o
}
const fn alias(mut o: OptInfo, canonical: &'static str) -> OptInfo {
    o.canonical = Some(canonical);
    o
}

use Class::*;
use Scale::*;

const YES_NO: &[&str] = &["yes", "no"];
const ASB_0P: &[&str] = &[
    "disconnect",
    "discard-younger-primary",
    "discard-older-primary",
    "discard-zero-changes",
    "discard-least-changes",
    "discard-local",
    "discard-remote",
];
const ASB_1P: &[&str] = &[
    "disconnect",
    "consensus",
    "violently-as0p",
    "discard-secondary",
    "call-pri-lost-after-sb",
];
const ASB_2P: &[&str] = &["disconnect", "violently-as0p", "call-pri-lost-after-sb"];
const RR_CONFLICT: &[&str] = &["disconnect", "violently", "call-pri-lost"];
const ON_IO_ERROR: &[&str] = &["pass_on", "call-local-io-error", "detach"];
const FENCING: &[&str] = &["dont-care", "resource-only", "resource-and-stonith"];
const ON_CONGESTION: &[&str] = &["block", "pull-ahead", "disconnect"];
const READ_BALANCING: &[&str] = &[
    "prefer-local",
    "prefer-remote",
    "round-robin",
    "least-pending",
    "when-congested-remote",
    "32K-striping",
    "64K-striping",
    "128K-striping",
    "256K-striping",
    "512K-striping",
    "1M-striping",
];
const ON_NO_DATA: &[&str] = &["io-error", "suspend-io"];

/// The whole table. Order is irrelevant; names are unique.
pub static OPTIONS: &[OptInfo] = &[
    // disk { }
    ranged(
        def(opt("size", DiskOption), "0"),
        r(0, 2 << 40, Sector, true),
    ),
    values(def(opt("on-io-error", DiskOption), "detach"), ON_IO_ERROR),
    values(def(opt("fencing", DiskOption), "dont-care"), FENCING),
    ranged(
        def(opt("max-bio-bvecs", DiskOption), "0"),
        r(0, 128, One, false),
    ),
    ranged(
        def(opt("disk-timeout", DiskOption), "0"),
        r(0, 6000, One, false),
    ),
    values(
        def(opt("read-balancing", DiskOption), "prefer-local"),
        READ_BALANCING,
    ),
    def(opt("use-bmbv", DiskFlag), "no"),
    def(opt("disk-barrier", DiskFlag), "no"),
    def(opt("disk-flushes", DiskFlag), "yes"),
    def(opt("disk-drain", DiskFlag), "yes"),
    def(opt("md-flushes", DiskFlag), "yes"),
    opt("no-disk-barrier", DiskNoFlag),
    opt("no-disk-flushes", DiskNoFlag),
    opt("no-disk-drain", DiskNoFlag),
    opt("no-md-flushes", DiskNoFlag),
    ranged(
        def(opt("resync-rate", DiskOption), "250"),
        r(1, 4 << 20, Kilo, true),
    ),
    alias(
        syncer(ranged(opt("rate", DiskOption), r(1, 4 << 20, Kilo, true))),
        "resync-rate",
    ),
    alias(syncer(opt("after", DiskOption)), "resync-after"),
    opt("resync-after", DiskOption),
    syncer(ranged(
        def(opt("al-extents", DiskOption), "1237"),
        r(67, 0xfffe, One, false),
    )),
    def(opt("al-updates", DiskFlag), "yes"),
    def(opt("discard-zeroes-if-aligned", DiskFlag), "yes"),
    def(opt("disable-write-same", DiskFlag), "no"),
    ranged(
        def(opt("rs-discard-granularity", DiskOption), "0"),
        r(0, 1 << 20, One, false),
    ),
    syncer(ranged(
        def(opt("c-plan-ahead", DiskOption), "20"),
        r(0, 300, One, true),
    )),
    syncer(ranged(
        def(opt("c-delay-target", DiskOption), "10"),
        r(1, 100, One, true),
    )),
    syncer(ranged(
        def(opt("c-fill-target", DiskOption), "100"),
        r(0, 1 << 20, Sector, true),
    )),
    syncer(ranged(
        def(opt("c-max-rate", DiskOption), "102400"),
        r(250, 4 << 20, Kilo, true),
    )),
    syncer(ranged(
        def(opt("c-min-rate", DiskOption), "250"),
        r(0, 4 << 20, Kilo, true),
    )),
    // net { }
    ranged(def(opt("timeout", NetOption), "60"), r(1, 600, One, true)),
    values(def(opt("protocol", NetOption), "C"), &["A", "B", "C"]),
    ranged(def(opt("ko-count", NetOption), "7"), r(0, 200, One, true)),
    ranged(def(opt("ping-int", NetOption), "10"), r(1, 120, One, true)),
    ranged(
        def(opt("max-buffers", NetOption), "2048"),
        r(32, 131072, One, true),
    ),
    proxy(ranged(
        def(opt("sndbuf-size", NetOption), "0"),
        r(0, 10 << 20, One, true),
    )),
    proxy(ranged(
        def(opt("rcvbuf-size", NetOption), "0"),
        r(0, 10 << 20, One, true),
    )),
    ranged(
        def(opt("connect-int", NetOption), "10"),
        r(1, 120, One, true),
    ),
    opt("cram-hmac-alg", NetOption),
    opt("shared-secret", NetOption),
    ranged(
        def(opt("max-epoch-size", NetOption), "2048"),
        r(1, 20000, One, true),
    ),
    values(def(opt("after-sb-0pri", NetOption), "disconnect"), ASB_0P),
    values(def(opt("after-sb-1pri", NetOption), "disconnect"), ASB_1P),
    values(def(opt("after-sb-2pri", NetOption), "disconnect"), ASB_2P),
    values(
        def(opt("rr-conflict", NetOption), "disconnect"),
        RR_CONFLICT,
    ),
    proxy(ranged(
        def(opt("ping-timeout", NetOption), "5"),
        r(1, 300, One, false),
    )),
    ranged(
        def(opt("unplug-watermark", NetOption), "128"),
        r(1, 131072, One, false),
    ),
    opt("data-integrity-alg", NetOption),
    values(def(opt("on-congestion", NetOption), "block"), ON_CONGESTION),
    ranged(
        def(opt("socket-check-timeout", NetOption), "0"),
        r(0, 300, One, false),
    ),
    ranged(
        def(opt("congestion-fill", NetOption), "0"),
        r(0, 10 << 21, Sector, true),
    ),
    ranged(
        def(opt("congestion-extents", NetOption), "1237"),
        r(67, 0xfffe, One, true),
    ),
    def(opt("allow-two-primaries", NetFlag), "no"),
    def(opt("always-asbp", NetFlag), "no"),
    opt("no-tcp-cork", NetNoFlag),
    def(opt("tcp-cork", NetFlag), "yes"),
    opt("discard-my-data", NetDelegate),
    syncer(opt("verify-alg", NetOption)),
    syncer(opt("csums-alg", NetOption)),
    def(opt("csums-after-crash-only", NetFlag), "no"),
    syncer(def(opt("use-rle", NetFlag), "yes")),
    // options { }
    syncer(def(opt("cpu-mask", ResOption), "0")),
    syncer(values(
        def(opt("on-no-data-accessible", ResOption), "io-error"),
        ON_NO_DATA,
    )),
    // accepted and ignored
    opt("delay-probe-volume", Deprecated),
    opt("delay-probe-interval", Deprecated),
    opt("throttle-threshold", Deprecated),
    opt("hold-off-threshold", Deprecated),
    // startup { }
    ranged(
        def(opt("wfc-timeout", StartupOption), "0"),
        r(0, 300000, One, true),
    ),
    ranged(
        def(opt("degr-wfc-timeout", StartupOption), "0"),
        r(0, 300000, One, true),
    ),
    ranged(
        def(opt("outdated-wfc-timeout", StartupOption), "0"),
        r(0, 300000, One, true),
    ),
    opt("stacked-timeouts", StartupDelegate),
    opt("become-primary-on", StartupDelegate),
    def(opt("wait-after-sb", StartupFlag), "no"),
    // handlers { }
    opt("pri-on-incon-degr", Handler),
    opt("pri-lost-after-sb", Handler),
    opt("pri-lost", Handler),
    opt("initial-split-brain", Handler),
    opt("split-brain", Handler),
    alias(opt("outdate-peer", Handler), "fence-peer"),
    opt("fence-peer", Handler),
    opt("unfence-peer", Handler),
    opt("local-io-error", Handler),
    opt("before-resync-target", Handler),
    opt("after-resync-target", Handler),
    opt("before-resync-source", Handler),
    opt("out-of-sync", Handler),
    // proxy { }
    proxy(opt("memlimit", ProxyOption)),
    proxy(opt("read-loops", ProxyOption)),
    proxy(opt("compression", ProxyOption)),
    proxy(opt("bwlimit", ProxyOption)),
    opt("plugin", ProxyDelegate),
];

/// Looks an option keyword up.
pub fn lookup(name: &str) -> Option<&'static OptInfo> {
    OPTIONS.iter().find(|o| o.name == name)
}

/// Yes/no values of flags.
pub const FLAG_VALUES: &[&str] = YES_NO;

/// Why a number was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NumberError {
    /// Not digits followed by at most one unit letter.
    Invalid,
    /// Does not fit in 64 bits once scaled.
    Overflow,
}

/// Reads a number with an optional unit suffix (`k`/`K`, `m`/`M`, `g`/`G` binary multiples,
/// `s` for 512-byte sectors) and converts it to `scale`, rounding up when the conversion
/// divides (as drbd-utils does: `1s` in KiB is 1).
pub fn parse_scaled(s: &str, scale: Scale) -> Result<u64, NumberError> {
    let digits = s.bytes().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return Err(NumberError::Invalid);
    }
    let value: u64 = s[..digits].parse().map_err(|_| NumberError::Overflow)?;
    let unit = &s[digits..];
    let mut shift: i32 = match scale {
        Scale::One => 0,
        Scale::Kilo => -10,
        Scale::Sector => -9,
    };
    match unit {
        "" => return Ok(value),
        "k" | "K" => shift += 10,
        "m" | "M" => shift += 20,
        "g" | "G" => shift += 30,
        "s" => shift += 9,
        _ => return Err(NumberError::Invalid),
    }
    if shift < 0 {
        let s = (-shift) as u32;
        let add = (1u64 << s) - 1;
        return Ok(value.saturating_add(add) >> s);
    }
    let s = shift as u32;
    if value > (u64::MAX >> s) {
        return Err(NumberError::Overflow);
    }
    Ok(value << s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        for (i, a) in OPTIONS.iter().enumerate() {
            for b in &OPTIONS[i + 1..] {
                assert_ne!(a.name, b.name);
            }
        }
    }

    #[test]
    fn defaults_lie_within_ranges_and_values() {
        for o in OPTIONS {
            if let (Some(d), Some(range)) = (o.default, o.range) {
                let v = parse_scaled(d, range.scale).unwrap();
                assert!(v >= range.min && v <= range.max, "{}", o.name);
            }
            if let (Some(d), Some(vals)) = (o.default, o.values) {
                assert!(vals.contains(&d), "{}", o.name);
            }
        }
    }

    #[test]
    fn scaled_numbers() {
        assert_eq!(parse_scaled("10G", Scale::Sector), Ok(10 << 21));
        assert_eq!(parse_scaled("100M", Scale::Kilo), Ok(100 << 10));
        assert_eq!(parse_scaled("1s", Scale::Kilo), Ok(1));
        assert_eq!(parse_scaled("3s", Scale::Kilo), Ok(2));
        assert_eq!(parse_scaled("8k", Scale::One), Ok(8192));
        assert_eq!(parse_scaled("512", Scale::Sector), Ok(512));
        assert_eq!(parse_scaled("x", Scale::One), Err(NumberError::Invalid));
        assert_eq!(parse_scaled("1T", Scale::One), Err(NumberError::Invalid));
        assert_eq!(
            parse_scaled("99999999999G", Scale::One),
            Err(NumberError::Overflow)
        );
    }
}
