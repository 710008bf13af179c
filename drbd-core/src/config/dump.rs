//! The canonical printer behind `drbdadm dump`.
//!
//! The layout is drbd-utils' 8.4 one, so that scripts and people who compare dumps see the
//! same text: four spaces per level, option names padded to a column that depends on the
//! level, short values right-aligned in three columns, and strings quoted only when they need
//! it. Reading a dump back gives the same dump.

use std::fmt::Write;

use super::{Address, Config, Global, Host, HostKind, Opt, Resource, UsageCount, Volume};
use super::{CMD_TIMEOUT_LONG_DEF, CMD_TIMEOUT_MEDIUM_DEF, CMD_TIMEOUT_SHORT_DEF};

/// Longest string printed without quotes.
const BARE_STRING_MAX: usize = 80;

/// Quotes a string when it holds anything but `[a-zA-Z0-9/._-]`, is empty, or is long;
/// backslash-escapes `"` and `\` inside quotes.
pub fn esc(s: &str) -> String {
    let bare = !s.is_empty()
        && s.len() <= BARE_STRING_MAX
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'/' | b'.' | b'_' | b'-'));
    if bare {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

struct Printer {
    out: String,
    indent: usize,
}

impl Printer {
    fn prefix(&mut self) {
        for _ in 0..self.indent * 4 {
            self.out.push(' ');
        }
    }

    fn line(&mut self, text: &str) {
        self.prefix();
        self.out.push_str(text);
        self.out.push('\n');
    }

    /// `name value;` with the name padded to `24 - 4 * level` and the value right-aligned in
    /// three columns.
    fn option(&mut self, name: &str, value: &str) {
        self.prefix();
        let width = 24isize - 4 * self.indent as isize;
        if width >= 0 {
            let _ = write!(self.out, "{name:<w$}", w = width as usize);
        } else {
            let _ = write!(self.out, "{name:>w$}", w = (-width) as usize);
        }
        let _ = writeln!(self.out, " {value:>3};");
    }

    fn options(&mut self, section: &str, opts: &[Opt]) {
        if opts.is_empty() {
            return;
        }
        self.line(&format!("{section} {{"));
        self.indent += 1;
        for o in opts {
            match &o.value {
                Some(v) if o.raw => self.option(&o.name, v),
                Some(v) => self.option(&o.name, &esc(v)),
                None => self.line(&format!("{};", o.name)),
            }
        }
        self.indent -= 1;
        self.line("}");
    }

    fn proxy_options(&mut self, section: &str, opts: &[Opt], plugins: &[Opt]) {
        if opts.is_empty() && plugins.is_empty() {
            return;
        }
        self.line(&format!("{section} {{"));
        self.indent += 1;
        for o in opts {
            match &o.value {
                Some(v) => self.option(&o.name, &esc(v)),
                None => self.line(&format!("{};", o.name)),
            }
        }
        self.options("plugin", plugins);
        self.indent -= 1;
        self.line("}");
    }

    fn address(&mut self, name: &str, a: &Address) {
        if a.af == "ipv6" {
            self.line(&format!("{name:<16} {} [{}]:{};", a.af, a.addr, a.port));
        } else {
            self.line(&format!("{name:<16} {} {}:{};", a.af, a.addr, a.port));
        }
    }

    fn volume(&mut self, has_lower: bool, vol: &Volume) {
        if !vol.implicit {
            self.line(&format!("volume {} {{", vol.vnr));
            self.indent += 1;
        }
        let empty = vol.minor.is_none()
            && vol.device.is_none()
            && vol.disk.is_none()
            && vol.meta_disk.is_none()
            && vol.meta_index.is_none();
        if !empty {
            self.options("disk", &vol.disk_options);
            self.prefix();
            let pad = 19isize - 4 * self.indent as isize;
            self.out.push_str("device");
            for _ in 0..pad.max(0) {
                self.out.push(' ');
            }
            if let Some(d) = &vol.device {
                self.out.push_str(&esc(d));
                self.out.push(' ');
            }
            // An unset minor prints as -1, as drbdadm does.
            let minor = vol.minor.map_or(-1i64, i64::from);
            let _ = writeln!(self.out, "minor {minor};");
            if !has_lower {
                self.option("disk", &esc(vol.disk.as_deref().unwrap_or("")));
                let md = vol.meta_disk.as_deref().unwrap_or("");
                match vol.meta_index.as_deref() {
                    Some("flexible") => self.line(&format!("{:<16} {};", "meta-disk", esc(md))),
                    Some("internal") | None => self.option("meta-disk", "internal"),
                    Some(idx) => self.line(&format!("{:<16} {} [{idx}];", "meta-disk", esc(md))),
                }
            }
        }
        if !vol.implicit {
            self.indent -= 1;
            self.line("}");
        }
    }

    fn host(&mut self, h: &Host) {
        match &h.kind {
            HostKind::Stacked { lower } => {
                self.line(&format!("stacked-on-top-of {} {{", esc(lower)));
                self.indent += 1;
                self.line(&format!("# on {} ", h.on_hosts.join(" ")));
            }
            HostKind::Floating => {
                let a = h
                    .address
                    .as_ref()
                    .expect("a floating section always has an address");
                if a.af == "ipv6" {
                    self.line(&format!("floating ipv6 [{}]:{} {{", a.addr, a.port));
                } else {
                    self.line(&format!("floating {} {}:{} {{", a.af, a.addr, a.port));
                }
                self.indent += 1;
            }
            _ => {
                self.line(&format!("on {} {{", h.on_hosts.join(" ")));
                self.indent += 1;
            }
        }
        self.options("options", &h.options);
        let has_lower = matches!(h.kind, HostKind::Stacked { .. });
        for v in &h.volumes {
            self.volume(has_lower, v);
        }
        if h.kind != HostKind::Floating {
            if let Some(a) = &h.address {
                self.address("address", a);
            }
        }
        if let Some(a) = &h.alt_address {
            self.address("alternate-link-address", a);
        }
        if let Some(p) = &h.proxy {
            self.line(&format!("proxy on {} {{", p.on_hosts.join(" ")));
            self.indent += 1;
            self.address("inside", &p.inside);
            self.address("outside", &p.outside);
            self.proxy_options("options", &p.options, &p.plugins);
            self.indent -= 1;
            self.line("}");
        }
        self.indent -= 1;
        self.line("}");
    }

    /// The option sections of a resource or of `common`, in drbdadm's order.
    fn sections(&mut self, r: &Resource) {
        let mut startup = r.startup.clone();
        if r.stacked_timeouts {
            startup.push(Opt {
                name: "stacked-timeouts".into(),
                value: None,
                raw: false,
            });
        }
        if !r.become_primary_on.is_empty() {
            startup.push(Opt {
                name: "become-primary-on".into(),
                value: Some(r.become_primary_on.join(" ")),
                raw: true,
            });
        }
        self.options("options", &r.options);
        self.options("net", &r.net);
        self.options("disk", &r.disk);
        self.options("startup", &startup);
        self.proxy_options("proxy", &r.proxy_options, &r.proxy_plugins);
        self.options("handlers", &r.handlers);
    }

    fn global(&mut self, g: &Global) {
        if g.minor_count == 0
            && !g.disable_ip_verification
            && g.dialog_refresh == 1
            && g.usage_count == UsageCount::Ask
        {
            return;
        }
        self.line("global {");
        self.indent += 1;
        if g.disable_ip_verification {
            self.line("disable-ip-verification;");
        }
        if g.minor_count != 0 {
            self.line(&format!("minor-count {};", g.minor_count));
        }
        if g.dialog_refresh != 1 {
            self.line(&format!("dialog-refresh {};", g.dialog_refresh));
        }
        match g.usage_count {
            UsageCount::Yes => self.line("usage-count yes;"),
            UsageCount::No => self.line("usage-count no;"),
            UsageCount::Ask => {}
        }
        if g.cmd_timeout_short != CMD_TIMEOUT_SHORT_DEF {
            self.line(&format!("cmd-timeout-short {};", g.cmd_timeout_short));
        }
        if g.cmd_timeout_medium != CMD_TIMEOUT_MEDIUM_DEF {
            self.line(&format!("cmd-timeout-medium {};", g.cmd_timeout_medium));
        }
        if g.cmd_timeout_long != CMD_TIMEOUT_LONG_DEF {
            self.line(&format!("cmd-timeout-long {};", g.cmd_timeout_long));
        }
        self.indent -= 1;
        self.line("}");
        self.out.push('\n');
    }

    fn resource(&mut self, cfg: &Config, r: &Resource) {
        self.line(&format!(
            "# resource {} on {}: {}, {}",
            esc(&r.name),
            cfg.node,
            if r.ignored() {
                "ignored"
            } else {
                "not ignored"
            },
            if r.stacked() {
                "stacked"
            } else {
                "not stacked"
            }
        ));
        self.line(&format!("# defined at {}:{}", r.file, r.line));
        self.line(&format!("resource {} {{", esc(&r.name)));
        self.indent += 1;
        for h in &r.hosts {
            self.host(h);
        }
        self.sections(r);
        self.indent -= 1;
        self.out.push_str("}\n\n");
    }
}

/// `drbdadm dump all`: the file name, `global`, `common` and every resource.
pub fn dump_all(cfg: &Config) -> String {
    let mut p = Printer {
        out: String::new(),
        indent: 0,
    };
    p.line(&format!("# {}", cfg.path));
    p.global(&cfg.global);
    if let Some(c) = &cfg.common {
        p.line("common {");
        p.indent += 1;
        p.sections(c);
        p.indent -= 1;
        p.out.push_str("}\n\n");
    }
    if cfg.resources.is_empty() {
        p.line("# no resources configured");
    }
    for r in &cfg.resources {
        p.resource(cfg, r);
    }
    p.out
}

/// `drbdadm dump RES`: one resource block.
pub fn dump_resource(cfg: &Config, r: &Resource) -> String {
    let mut p = Printer {
        out: String::new(),
        indent: 0,
    };
    p.resource(cfg, r);
    p.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(esc("/dev/sdb1"), "/dev/sdb1");
        assert_eq!(esc(""), "\"\"");
        assert_eq!(esc("a b"), "\"a b\"");
        assert_eq!(esc("q\"x\\"), "\"q\\\"x\\\\\"");
        assert_eq!(esc(&"a".repeat(81)), format!("\"{}\"", "a".repeat(81)));
        assert_eq!(esc("a:b"), "\"a:b\"");
    }

    #[test]
    fn option_columns() {
        let mut p = Printer {
            out: String::new(),
            indent: 2,
        };
        p.option("protocol", "C");
        p.option("allow-two-primaries", "yes");
        p.indent = 3;
        p.option("disk", "/dev/sdb2");
        assert_eq!(
            p.out,
            "        protocol           C;\n        allow-two-primaries yes;\n            disk         /dev/sdb2;\n"
        );
    }
}
