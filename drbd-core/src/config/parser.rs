//! Recursive-descent parser for drbd.conf, following the 8.4 grammar of drbd-utils.
//!
//! Errors come in two kinds, as in drbdadm: a syntax error stops the parse at once; a semantic
//! error (a duplicate minor, a missing address, a number out of range) is recorded and the parse
//! goes on, so that one run reports all of them. Either way the result is an error with exit
//! code 10 (`E_CONFIG_INVALID`), except for a number that cannot be read at all (exit 20, as
//! drbdadm's number reader exits).

use std::collections::{HashMap, HashSet};

use super::lexer::{Lexer, Token, TokenKind};
use super::options::{self, Class, NumberError, OptInfo};
use super::{
    Address, Config, ConfigErrors, Host, HostKind, Opt, ParseError, ProxyInfo, Resource, Source,
    UsageCount, Volume, EXIT_BAD_NUMBER,
};

/// Largest volume number DRBD accepts.
const VOLUME_MAX: u32 = 65535;
/// Largest minor number DRBD accepts (2^20 - 1).
const MINOR_MAX: u32 = (1 << 20) - 1;
/// How deep `include` may nest before we call it a loop.
const INCLUDE_DEPTH_MAX: u32 = 16;

/// What the caller tells the parser about the node and the terminal.
#[derive(Debug, Clone)]
pub struct ParseOptions {
    /// This node's name (`uname -n`, or overridden).
    pub node: String,
    /// Whether standard input and output are both terminals. Like drbdadm, an unknown
    /// `resync-after` target is then an error; otherwise the option is dropped with a warning.
    pub interactive: bool,
}

/// Parses the configuration `text` read from `file` (`file` as given on the command line).
pub fn parse(
    source: &dyn Source,
    file: &str,
    text: &str,
    opts: &ParseOptions,
) -> Result<Config, ConfigErrors> {
    let mut p = Parser {
        source,
        opts,
        file: file.to_string(),
        canonical: String::new(),
        dir: String::new(),
        errors: Vec::new(),
        warnings: Vec::new(),
        uniq: HashMap::new(),
        upr: HashMap::new(),
        seen_files: HashSet::new(),
        config: Config::default(),
        depth: 0,
        section_start: 0,
    };
    let (dir, _) = split_dir(file);
    let canonical = source.canonical(&dir, &base_name(file));
    p.config.path = canonical.clone();
    p.config.node = opts.node.clone();
    match p.parse_file(file, &canonical, text) {
        Ok(()) => {}
        Err(fatal) => {
            p.errors.push(fatal);
            return Err(ConfigErrors { errors: p.errors });
        }
    }
    if !p.errors.is_empty() {
        return Err(ConfigErrors { errors: p.errors });
    }
    p.post_parse();
    if !p.errors.is_empty() {
        return Err(ConfigErrors { errors: p.errors });
    }
    p.validate();
    if !p.errors.is_empty() {
        return Err(ConfigErrors { errors: p.errors });
    }
    p.config.warnings = p.warnings;
    Ok(p.config)
}

fn split_dir(path: &str) -> (String, String) {
    match path.rfind('/') {
        Some(0) => ("/".to_string(), path[1..].to_string()),
        Some(i) => (path[..i].to_string(), path[i + 1..].to_string()),
        None => (".".to_string(), path.to_string()),
    }
}

fn base_name(path: &str) -> String {
    split_dir(path).1
}

type PResult<T> = Result<T, ParseError>;

struct Parser<'a> {
    source: &'a dyn Source,
    opts: &'a ParseOptions,
    /// The file being read, as named (for error messages).
    file: String,
    /// Its canonical path (for `# defined at`).
    canonical: String,
    /// Its directory (includes are relative to it).
    dir: String,
    errors: Vec<ParseError>,
    warnings: Vec<ParseError>,
    /// Values that must be unique in the whole configuration, with where they were first used.
    uniq: HashMap<String, (String, u32)>,
    /// Values that must be unique within one resource.
    upr: HashMap<String, (String, u32)>,
    seen_files: HashSet<String>,
    config: Config,
    depth: u32,
    /// Line where the current section started (for "keyword missing" messages).
    section_start: u32,
}

/// The token stream of one file with one token of look-ahead.
struct Tokens<'t> {
    lexer: Lexer<'t>,
    /// The most recent token (drbdadm's `yytext`), for error messages.
    last: Token,
    peeked: Option<Token>,
}

impl<'t> Tokens<'t> {
    fn next(&mut self) -> PResult<Token> {
        let t = match self.peeked.take() {
            Some(t) => t,
            None => self.lexer.next_token()?,
        };
        self.last = t.clone();
        Ok(t)
    }

    fn line(&self) -> u32 {
        self.lexer.line()
    }
}

fn is_punct(t: &Token, c: char) -> bool {
    t.kind == TokenKind::Punct(c)
}

fn is_kw(t: &Token, kw: &str) -> bool {
    t.kind == TokenKind::Keyword && !t.quoted && t.text == kw
}

/// A bare or quoted string (drbdadm's TK_STRING). Keywords are not strings.
fn is_string(t: &Token) -> bool {
    t.kind == TokenKind::String
}

fn option_of(t: &Token) -> Option<&'static OptInfo> {
    if t.kind == TokenKind::Keyword {
        options::lookup(&t.text)
    } else {
        None
    }
}

/// Names of token kinds in "expected" messages.
fn describe(t: &Token) -> String {
    let text: String = t.text.chars().take(20).collect();
    let ellipsis = if t.text.chars().count() > 20 {
        "..."
    } else {
        ""
    };
    format!("{text}{ellipsis}")
}

/// Local-scope addresses must be unique per host only, other addresses globally.
fn addr_scope_local(addr: &str) -> bool {
    addr.starts_with("127.") || addr == "::1" || addr.to_ascii_lowercase().starts_with("fe80:")
}

impl<'a> Parser<'a> {
    fn err_at(&self, line: u32, message: String) -> ParseError {
        ParseError::at(&self.file, line, message)
    }

    /// Records a semantic error; parsing goes on.
    fn invalid(&mut self, line: u32, message: String) {
        let e = self.err_at(line, message);
        self.errors.push(e);
    }

    fn expected(&self, tk: &Tokens, what: &str) -> ParseError {
        self.err_at(
            tk.line(),
            format!(
                "Parse error: '{what}' expected,\n\tbut got '{}'",
                describe(&tk.last)
            ),
        )
    }

    fn expect_punct(&self, tk: &mut Tokens, c: char) -> PResult<()> {
        let t = tk.next()?;
        if is_punct(&t, c) {
            Ok(())
        } else {
            Err(self.expected(tk, &c.to_string()))
        }
    }

    fn expect_string(&self, tk: &mut Tokens) -> PResult<String> {
        let t = tk.next()?;
        if is_string(&t) {
            Ok(t.text)
        } else {
            Err(self.expected(tk, "TK_STRING"))
        }
    }

    fn expect_integer(&self, tk: &mut Tokens) -> PResult<String> {
        let t = tk.next()?;
        if t.kind == TokenKind::Integer {
            Ok(t.text)
        } else {
            Err(self.expected(tk, "TK_INTEGER"))
        }
    }

    /// A value: a string, a number, or the word `on` (as drbdadm allows).
    fn expect_value(&self, tk: &mut Tokens) -> PResult<String> {
        let t = tk.next()?;
        if is_string(&t) || t.kind == TokenKind::Integer || is_kw(&t, "on") {
            Ok(t.text)
        } else {
            Err(self.expected(tk, "TK_STRING | TK_INTEGER"))
        }
    }

    /// Registers `key` as used; a second use is an error naming both places.
    fn check_uniq(&mut self, what: &str, key: String, line: u32) -> bool {
        Self::check_in(
            &mut self.uniq,
            &mut self.errors,
            &self.file,
            what,
            key,
            line,
        )
    }

    fn check_upr(&mut self, what: &str, key: String, line: u32) -> bool {
        Self::check_in(&mut self.upr, &mut self.errors, &self.file, what, key, line)
    }

    fn check_in(
        table: &mut HashMap<String, (String, u32)>,
        errors: &mut Vec<ParseError>,
        file: &str,
        what: &str,
        key: String,
        line: u32,
    ) -> bool {
        if let Some((first_file, first_line)) = table.get(&key) {
            errors.push(ParseError::at(
                file,
                line,
                format!(
                    "conflicting use of {what} '{key}' ...\n{first_file}:{first_line}: {what} '{key}' first used here."
                ),
            ));
            false
        } else {
            table.insert(key, (file.to_string(), line));
            true
        }
    }

    /// Checks a number against an option's range, as the 8.4 parser does while reading.
    fn range_check(&mut self, info: &OptInfo, name: &str, value: &str, line: u32) -> PResult<()> {
        let Some(range) = info.range.filter(|r| r.range_checked) else {
            return Ok(());
        };
        self.check_range(name, value, range, line)
    }

    fn check_range(
        &mut self,
        name: &str,
        value: &str,
        range: options::Range,
        line: u32,
    ) -> PResult<()> {
        let unit = match range.scale {
            options::Scale::One => "",
            options::Scale::Kilo => "k",
            options::Scale::Sector => "s",
        };
        match options::parse_scaled(value, range.scale) {
            Ok(v) if v >= range.min && v <= range.max => Ok(()),
            Ok(v) => {
                self.invalid(
                    line,
                    format!(
                        "{name} {value} => {v}{unit} out of range [{}..{}]{unit}.",
                        range.min, range.max
                    ),
                );
                Ok(())
            }
            Err(NumberError::Invalid) => Err(ParseError {
                exit_code: EXIT_BAD_NUMBER,
                ..self.err_at(line, format!("{value} is not a valid number"))
            }),
            Err(NumberError::Overflow) => Err(ParseError {
                exit_code: EXIT_BAD_NUMBER,
                ..self.err_at(line, format!("{value}: out of range"))
            }),
        }
    }

    // ----------------------------------------------------------------------------------------
    // Files and the top level

    fn parse_file(&mut self, name: &str, canonical: &str, text: &str) -> PResult<()> {
        let saved = (
            std::mem::replace(&mut self.file, name.to_string()),
            std::mem::replace(&mut self.canonical, canonical.to_string()),
            std::mem::replace(&mut self.dir, split_dir(canonical).0),
        );
        self.seen_files.insert(canonical.to_string());
        let mut tk = Tokens {
            lexer: Lexer::new(text, name),
            last: Token {
                kind: TokenKind::Eof,
                text: String::new(),
                line: 1,
                quoted: false,
            },
            peeked: None,
        };
        let result = self.parse_top(&mut tk);
        (self.file, self.canonical, self.dir) = saved;
        result
    }

    fn parse_top(&mut self, tk: &mut Tokens) -> PResult<()> {
        loop {
            let t = tk.next()?;
            match t.kind {
                TokenKind::Eof => return Ok(()),
                _ if is_kw(&t, "global") => self.parse_global(tk)?,
                _ if is_kw(&t, "common") => {
                    self.expect_punct(tk, '{')?;
                    let common = self.parse_resource(tk, "common".into(), true)?;
                    self.config.common = Some(common);
                }
                _ if is_kw(&t, "resource") => {
                    let name = self.expect_string(tk)?;
                    self.check_res_name(&name, tk.line())?;
                    self.expect_punct(tk, '{')?;
                    let res = self.parse_resource(tk, name, false)?;
                    self.config.resources.push(res);
                }
                _ if is_kw(&t, "skip") => self.parse_skip(tk)?,
                _ if is_kw(&t, "include") => {
                    let pattern = self.expect_string(tk)?;
                    self.expect_punct(tk, ';')?;
                    self.include(&pattern, tk.line())?;
                }
                _ => return Err(self.expected(tk, "global | common | resource | skip | include")),
            }
        }
    }

    fn check_res_name(&self, name: &str, line: u32) -> PResult<()> {
        // drbdadm accepts any string here, spaces included (quoted); only the empty name
        // cannot be referred to.
        if name.is_empty() {
            return Err(self.err_at(line, format!("invalid resource name '{name}'")));
        }
        Ok(())
    }

    fn include(&mut self, pattern: &str, line: u32) -> PResult<()> {
        if self.depth >= INCLUDE_DEPTH_MAX {
            return Err(self.err_at(line, format!("includes nested too deeply at '{pattern}'")));
        }
        let dir = self.dir.clone();
        let names = self.source.glob(&dir, pattern);
        if names.is_empty() {
            if !pattern.contains(['?', '*', '[']) {
                self.invalid(line, format!("Failed to open include file '{pattern}'."));
            }
            return Ok(());
        }
        for name in names {
            let canonical = self.source.canonical(&dir, &name);
            if self.seen_files.contains(&canonical) {
                continue;
            }
            match self.source.read(&dir, &name) {
                Ok(text) => {
                    self.depth += 1;
                    let r = self.parse_file(&name, &canonical, &text);
                    self.depth -= 1;
                    r?;
                }
                Err(_) => self.invalid(line, format!("Failed to open include file '{name}'.")),
            }
        }
        Ok(())
    }

    fn parse_global(&mut self, tk: &mut Tokens) -> PResult<()> {
        let line = tk.line();
        self.check_uniq("global section", "global".into(), line);
        if !self.config.resources.is_empty() {
            self.warnings.push(
                self.err_at(
                    line,
                    "You should put the global {} section\n\tin front of any resource {} section"
                        .into(),
                ),
            );
        }
        self.expect_punct(tk, '{')?;
        loop {
            let t = tk.next()?;
            let line = tk.line();
            if is_punct(&t, '}') {
                return Ok(());
            }
            let g = &mut self.config.global;
            if is_kw(&t, "udev-always-use-vnr") {
                g.udev_always_use_vnr = true;
            } else if is_kw(&t, "disable-ip-verification") {
                g.disable_ip_verification = true;
            } else if is_kw(&t, "minor-count") {
                let v = self.expect_integer(tk)?;
                self.check_range("minor-count", &v, range(1, 255), line)?;
                self.config.global.minor_count = atoi(&v);
            } else if is_kw(&t, "dialog-refresh") {
                let v = self.expect_integer(tk)?;
                self.check_range("dialog-refresh", &v, range(0, 600), line)?;
                self.config.global.dialog_refresh = atoi(&v);
            } else if let Some(which) = [
                "cmd-timeout-short",
                "cmd-timeout-medium",
                "cmd-timeout-long",
            ]
            .iter()
            .position(|k| is_kw(&t, k))
            {
                let v = self.expect_integer(tk)?;
                self.check_range(&t.text, &v, range(0, 900), line)?;
                let g = &mut self.config.global;
                let slot = [
                    &mut g.cmd_timeout_short,
                    &mut g.cmd_timeout_medium,
                    &mut g.cmd_timeout_long,
                ];
                *slot.into_iter().nth(which).expect("three slots") = atoi(&v);
            } else if is_kw(&t, "usage-count") {
                let v = tk.next()?;
                self.config.global.usage_count = if is_kw(&v, "yes") {
                    UsageCount::Yes
                } else if is_kw(&v, "no") {
                    UsageCount::No
                } else if is_kw(&v, "ask") {
                    UsageCount::Ask
                } else {
                    return Err(self.expected(tk, "yes | no | ask"));
                };
            } else {
                return Err(
                    self.expected(tk, "dialog-refresh | minor-count | disable-ip-verification")
                );
            }
            self.expect_punct(tk, ';')?;
        }
    }

    fn parse_skip(&mut self, tk: &mut Tokens) -> PResult<()> {
        let start = tk.line();
        let t = tk.next()?;
        if is_string(&t) || t.kind == TokenKind::Keyword || t.kind == TokenKind::Integer {
            self.expect_punct(tk, '{')?;
        } else if !is_punct(&t, '{') {
            return Err(self.expected(tk, "[ some_text ] {"));
        }
        let mut level = 1u32;
        while level > 0 {
            let t = tk.next()?;
            match t.kind {
                TokenKind::Punct('{') => level += 1,
                TokenKind::Punct('}') => level -= 1,
                TokenKind::Eof => {
                    return Err(
                        self.err_at(start, "reached eof while parsing this skip block.".into())
                    )
                }
                _ => {}
            }
        }
        Ok(())
    }

    // ----------------------------------------------------------------------------------------
    // Resources

    fn parse_resource(
        &mut self,
        tk: &mut Tokens,
        name: String,
        is_common: bool,
    ) -> PResult<Resource> {
        self.upr.clear();
        let start_line = tk.line();
        self.check_uniq("resource section", name.clone(), start_line);
        let mut res = Resource {
            name: name.clone(),
            file: self.config.path.clone(),
            line: start_line,
            ..Resource::default()
        };
        loop {
            let t = tk.next()?;
            let line = tk.line();
            if is_punct(&t, '}') || t.kind == TokenKind::Eof {
                break;
            }
            if is_kw(&t, "protocol") {
                self.check_upr("protocol statement", format!("{name}: protocol"), line);
                let v = self.expect_string(tk)?;
                let v = self.protocol_value(&v, line);
                res.net.push(Opt::new("protocol", &v));
                self.expect_punct(tk, ';')?;
            } else if is_kw(&t, "on") {
                let hosts = self.parse_hosts(tk, '{')?;
                let host = self.parse_host_section(tk, &mut res, HostKind::On, hosts, true)?;
                res.hosts.push(host);
            } else if is_kw(&t, "stacked-on-top-of") {
                let host = self.parse_stacked_section(tk, &mut res)?;
                res.hosts.push(host);
            } else if is_kw(&t, "ignore-on") {
                self.expect_string(tk)?;
                self.warnings.push(self.err_at(
                    line,
                    format!("in resource {name}, WARN: The 'ignore-on' keyword is deprecated."),
                ));
                self.expect_punct(tk, ';')?;
            } else if is_kw(&t, "_this_host") || is_kw(&t, "_remote_host") {
                self.expect_punct(tk, '{')?;
                let (kind, label) = if t.text == "_this_host" {
                    (HostKind::ThisHost, "_this_host")
                } else {
                    (HostKind::RemoteHost, "_remote_host")
                };
                let host =
                    self.parse_host_section(tk, &mut res, kind, vec![label.into()], false)?;
                res.hosts.push(host);
            } else if is_kw(&t, "floating") {
                let host = self.parse_floating(tk, &mut res)?;
                res.hosts.push(host);
            } else if is_kw(&t, "disk") {
                let v = tk.next()?;
                if is_string(&v) {
                    volume0(&mut res.volumes, &mut self.errors, &self.file, line).disk =
                        Some(v.text);
                    self.expect_punct(tk, ';')?;
                } else if is_punct(&v, '{') {
                    self.check_upr("disk section", format!("{name}:disk"), line);
                    let opts = self.parse_options(tk, Section::Disk)?;
                    res.disk.extend(opts);
                } else {
                    return Err(self.expected(tk, "TK_STRING | {"));
                }
            } else if is_kw(&t, "net") {
                self.check_upr("net section", format!("{name}:net"), line);
                self.expect_punct(tk, '{')?;
                let opts = self.parse_options(tk, Section::Net)?;
                res.net.extend(opts);
            } else if is_kw(&t, "syncer") {
                self.check_upr("syncer section", format!("{name}:syncer"), line);
                self.expect_punct(tk, '{')?;
                self.parse_syncer(tk, &mut res)?;
            } else if is_kw(&t, "startup") {
                self.check_upr("startup section", format!("{name}:startup"), line);
                self.expect_punct(tk, '{')?;
                res.startup = self.parse_options_with(tk, Section::Startup, Some(&mut res))?;
            } else if is_kw(&t, "handlers") {
                self.check_upr("handlers section", format!("{name}:handlers"), line);
                self.expect_punct(tk, '{')?;
                res.handlers = self.parse_options(tk, Section::Handlers)?;
            } else if is_kw(&t, "proxy") {
                self.check_upr("proxy section", format!("{name}:proxy"), line);
                self.expect_punct(tk, '{')?;
                let (opts, plugins) = self.parse_proxy_options(tk)?;
                res.proxy_options = opts;
                res.proxy_plugins = plugins;
            } else if is_kw(&t, "device")
                || is_kw(&t, "meta-disk")
                || is_kw(&t, "flexible-meta-disk")
            {
                if t.text == "device" {
                    self.check_upr("device statement", format!("{name}:device"), line);
                }
                let file = self.file.clone();
                let mut vols = std::mem::take(&mut res.volumes);
                let vol = volume0(&mut vols, &mut self.errors, &file, line);
                let r = self.parse_volume_stmt(tk, vol, &[], &t);
                res.volumes = vols;
                r?;
            } else if is_kw(&t, "volume") {
                let vnr = self.expect_integer(tk)?;
                let vnr = self.volume_number(&vnr, line);
                let vol = self.parse_volume(tk, vnr, &[])?;
                insert_sorted(&mut res.volumes, vol);
            } else if is_kw(&t, "options") {
                self.check_upr(
                    "resource options section",
                    format!("{name}:res_options"),
                    line,
                );
                self.expect_punct(tk, '{')?;
                let opts = self.parse_options(tk, Section::Options)?;
                res.options.extend(opts);
            } else {
                return Err(self.expected(
                    tk,
                    "protocol | on | disk | net | syncer | startup | handlers | ignore-on | stacked-on-top-of",
                ));
            }
        }
        if let (true, Some(last)) = (is_common, res.hosts.last()) {
            self.invalid(
                last.line,
                format!("in the {name} section, there are no host sections allowed."),
            );
        }
        if !is_common {
            self.check_volumes_hosts(&res, tk.line());
        }
        Ok(res)
    }

    fn protocol_value(&mut self, v: &str, line: u32) -> String {
        let mut chars = v.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) if matches!(c.to_ascii_uppercase(), 'A' | 'B' | 'C') => {
                c.to_ascii_uppercase().to_string()
            }
            _ => {
                self.invalid(
                    line,
                    format!("unknown protocol '{v}', should be one of A,B,C"),
                );
                v.to_string()
            }
        }
    }

    fn volume_number(&mut self, v: &str, line: u32) -> u32 {
        let n = atoi(v);
        if n > VOLUME_MAX {
            self.invalid(
                line,
                format!("volume number {v} out of range [0..{VOLUME_MAX}]"),
            );
        }
        n
    }

    // ----------------------------------------------------------------------------------------
    // Option sections

    fn parse_options(&mut self, tk: &mut Tokens, section: Section) -> PResult<Vec<Opt>> {
        self.parse_options_with(tk, section, None)
    }

    /// An option section. `startup` also takes `become-primary-on` and `stacked-timeouts`,
    /// which are kept on the resource rather than as options.
    fn parse_options_with(
        &mut self,
        tk: &mut Tokens,
        section: Section,
        mut res: Option<&mut Resource>,
    ) -> PResult<Vec<Opt>> {
        self.section_start = tk.line();
        let mut out = Vec::new();
        loop {
            let t = tk.next()?;
            let line = tk.line();
            if is_punct(&t, '}') {
                return Ok(out);
            }
            if t.kind == TokenKind::Eof {
                return Err(self.expected(tk, "an option"));
            }
            if let Some(res) = res.as_deref_mut() {
                if is_kw(&t, "become-primary-on") {
                    res.become_primary_on = self.parse_hosts(tk, ';')?;
                    continue;
                }
                if is_kw(&t, "stacked-timeouts") {
                    res.stacked_timeouts = true;
                    self.expect_punct(tk, ';')?;
                    continue;
                }
            }
            let info = option_of(&t);
            match info.map(|i| (i, section.accepts(i))) {
                Some((info, Accept::Flag)) => {
                    let v = tk.next()?;
                    if is_kw(&v, "yes") || is_kw(&v, "no") {
                        out.push(Opt::new(info.name, &v.text));
                    } else if is_punct(&v, ';') {
                        out.push(Opt::new(info.name, "yes"));
                        continue;
                    } else {
                        return Err(self.expected(tk, "yes | no | ;"));
                    }
                }
                Some((info, Accept::NoFlag)) => {
                    let name = info.name.strip_prefix("no-").unwrap_or(info.name);
                    out.push(Opt::new(name, "no"));
                }
                Some((info, Accept::Value)) => {
                    let name = info.canonical.unwrap_or(info.name);
                    let mut v = self.expect_value(tk)?;
                    if name == "protocol" {
                        v = self.protocol_value(&v, line);
                    }
                    self.range_check(info, name, &v, line)?;
                    out.push(Opt::new(name, &v));
                }
                Some((_, Accept::Ignored)) => {
                    self.expect_value(tk)?;
                }
                Some((_, Accept::No)) | None => {
                    return Err(self.expected(
                        tk,
                        match section {
                            Section::Startup => {
                                "<an option keyword> | become-primary-on | stacked-timeouts"
                            }
                            _ => "an option keyword",
                        },
                    ));
                }
            }
            self.expect_punct(tk, ';')?;
        }
    }

    /// The 8.3 `syncer` section: each option goes to the 8.4 section it belongs to.
    fn parse_syncer(&mut self, tk: &mut Tokens, res: &mut Resource) -> PResult<()> {
        loop {
            let t = tk.next()?;
            let line = tk.line();
            if is_punct(&t, '}') {
                return Ok(());
            }
            let Some(info) = option_of(&t).filter(|i| i.syncer) else {
                return Err(self.expected(tk, "a syncer option keyword"));
            };
            let target = match info.class {
                Class::NetOption | Class::NetFlag => &mut res.net,
                Class::DiskOption | Class::DiskFlag => &mut res.disk,
                _ => &mut res.options,
            };
            let mut next = tk.next()?;
            if matches!(info.class, Class::NetFlag | Class::DiskFlag) {
                if is_kw(&next, "no") {
                    target.push(Opt::new(info.name, "no"));
                    next = tk.next()?;
                } else {
                    target.push(Opt::new(info.name, "yes"));
                    if is_kw(&next, "yes") {
                        next = tk.next()?;
                    }
                }
            } else {
                let name = info.canonical.unwrap_or(info.name);
                if !(is_string(&next) || next.kind == TokenKind::Integer || is_kw(&next, "on")) {
                    return Err(self.expected(tk, "TK_STRING | TK_INTEGER"));
                }
                let value = next.text.clone();
                self.range_check(info, name, &value, line)?;
                let target = match info.class {
                    Class::NetOption | Class::NetFlag => &mut res.net,
                    Class::DiskOption | Class::DiskFlag => &mut res.disk,
                    _ => &mut res.options,
                };
                target.push(Opt::new(name, &value));
                next = tk.next()?;
            }
            if !is_punct(&next, ';') {
                return Err(self.expected(tk, ";"));
            }
        }
    }

    /// `proxy { options...; plugin { ... } }`
    fn parse_proxy_options(&mut self, tk: &mut Tokens) -> PResult<(Vec<Opt>, Vec<Opt>)> {
        let mut out = Vec::new();
        let mut plugins = Vec::new();
        loop {
            let t = tk.next()?;
            let line = tk.line();
            if is_punct(&t, '}') {
                return Ok((out, plugins));
            }
            match option_of(&t) {
                Some(info) if info.class == Class::ProxyDelegate => {
                    self.expect_punct(tk, '{')?;
                    plugins = self.parse_plugin_lines(tk)?;
                    continue;
                }
                Some(info) if info.proxy => {
                    let v = self.expect_value(tk)?;
                    self.range_check(info, info.name, &v, line)?;
                    out.push(Opt::new(info.name, &v));
                }
                _ => return Err(self.expected(tk, "an option keyword")),
            }
            self.expect_punct(tk, ';')?;
        }
    }

    /// Plugin lines are free-form words up to `;`, kept as one option each.
    fn parse_plugin_lines(&mut self, tk: &mut Tokens) -> PResult<Vec<Opt>> {
        let mut out = Vec::new();
        loop {
            let mut words: Vec<String> = Vec::new();
            loop {
                let t = tk.next()?;
                match t.kind {
                    TokenKind::Eof => {
                        return Err(self.err_at(tk.line(), "Unexpected end-of-file".into()))
                    }
                    TokenKind::Punct(';') => break,
                    TokenKind::Punct('}') => {
                        if words.is_empty() {
                            return Ok(out);
                        }
                        return Err(self.err_at(tk.line(), "Missing \";\" before  \"}\"".into()));
                    }
                    _ => words.push(t.text),
                }
            }
            out.push(Opt {
                name: words.join(" "),
                value: None,
                raw: true,
            });
        }
    }

    fn parse_hosts(&mut self, tk: &mut Tokens, delimiter: char) -> PResult<Vec<String>> {
        let mut hosts = Vec::new();
        loop {
            let t = tk.next()?;
            if is_string(&t) {
                hosts.push(t.text);
            } else if is_punct(&t, delimiter) {
                if hosts.is_empty() {
                    return Err(self.expected(tk, "TK_STRING"));
                }
                return Ok(hosts);
            } else {
                return Err(self.expected(tk, &format!("TK_STRING | '{delimiter}'")));
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // Host sections, addresses, volumes

    /// `[ipv4|ipv6|ssocks|sdp|sci] ADDR:PORT` (IPv6 in brackets).
    fn parse_address(&mut self, tk: &mut Tokens) -> PResult<(Address, u32)> {
        let t = tk.next()?;
        let af;
        let addr;
        if is_kw(&t, "ipv4") || is_kw(&t, "ssocks") || is_kw(&t, "sdp") || is_kw(&t, "sci") {
            af = if t.text == "sci" {
                "ssocks".to_string()
            } else {
                t.text.clone()
            };
            let a = tk.next()?;
            if a.kind != TokenKind::Ipv4 {
                return Err(self.expected(tk, "TK_IPADDR"));
            }
            addr = a.text;
        } else if is_kw(&t, "ipv6") {
            af = "ipv6".to_string();
            self.expect_punct(tk, '[')?;
            let a = tk.next()?;
            if a.kind != TokenKind::Ipv6 {
                return Err(self.expected(tk, "TK_IPADDR6"));
            }
            addr = a.text;
            self.expect_punct(tk, ']')?;
        } else if t.kind == TokenKind::Ipv4 {
            af = "ipv4".to_string();
            addr = t.text;
        } else {
            return Err(self.expected(tk, "ssocks | sdp | ipv4 | ipv6 | <ipv4 address> "));
        }
        self.expect_punct(tk, ':')?;
        let port = self.expect_integer(tk)?;
        let line = tk.line();
        self.check_range("port", &port, range(1, 0xffff), line)?;
        Ok((Address { af, addr, port }, line))
    }

    fn parse_host_section(
        &mut self,
        tk: &mut Tokens,
        res: &mut Resource,
        kind: HostKind,
        on_hosts: Vec<String>,
        require_all: bool,
    ) -> PResult<Host> {
        let start = tk.line();
        self.section_start = start;
        let mut host = Host {
            kind,
            on_hosts,
            address: None,
            alt_address: None,
            volumes: Vec::new(),
            options: Vec::new(),
            proxy: None,
            line: start,
        };
        for h in host.on_hosts.clone() {
            self.check_upr("host section", format!("{}: on {h}", res.name), start);
        }
        self.parse_host_body(tk, res, &mut host)?;
        let end = tk.line();
        self.finish_host(res, &mut host, require_all, start, end);
        Ok(host)
    }

    fn parse_floating(&mut self, tk: &mut Tokens, res: &mut Resource) -> PResult<Host> {
        let start = tk.line();
        let (addr, line) = self.parse_address(tk)?;
        self.check_uniq("IP", format!("{}:{}", addr.addr, addr.port), line);
        let label = if addr.af == "ipv6" {
            format!("ipv6 [{}]:{}", addr.addr, addr.port)
        } else {
            format!("{}:{}", addr.addr, addr.port)
        };
        let mut host = Host {
            kind: HostKind::Floating,
            on_hosts: vec![label.clone()],
            address: Some(addr),
            alt_address: None,
            volumes: Vec::new(),
            options: Vec::new(),
            proxy: None,
            line: start,
        };
        self.check_upr("host section", format!("{}: on {label}", res.name), start);
        let t = tk.next()?;
        if is_punct(&t, '{') {
            self.parse_host_body(tk, res, &mut host)?;
        } else if !is_punct(&t, ';') {
            return Err(self.expected(tk, "{ | ;"));
        }
        let end = tk.line();
        self.finish_host(res, &mut host, true, start, end);
        Ok(host)
    }

    fn parse_host_body(
        &mut self,
        tk: &mut Tokens,
        res: &mut Resource,
        host: &mut Host,
    ) -> PResult<()> {
        let floating = host.kind == HostKind::Floating;
        loop {
            let t = tk.next()?;
            let line = tk.line();
            if is_punct(&t, '}') {
                return Ok(());
            }
            if is_kw(&t, "disk")
                || is_kw(&t, "device")
                || is_kw(&t, "meta-disk")
                || is_kw(&t, "flexible-meta-disk")
            {
                let what = match t.text.as_str() {
                    "flexible-meta-disk" => "meta-disk",
                    other => other,
                };
                for h in host.on_hosts.clone() {
                    self.check_upr(
                        &format!("{what} statement"),
                        format!("{}:{h}:{what}", res.name),
                        line,
                    );
                }
                let file = self.file.clone();
                let hosts = host.on_hosts.clone();
                let vol = volume0(&mut host.volumes, &mut self.errors, &file, line);
                self.parse_volume_stmt(tk, vol, &hosts, &t)?;
            } else if is_kw(&t, "address") || is_kw(&t, "alternate-link-address") {
                if floating {
                    return Err(self.err_at(
                        line,
                        "address statement not allowed for floating {} host sections".into(),
                    ));
                }
                let what = if t.text == "address" {
                    "address"
                } else {
                    "alt-address"
                };
                for h in host.on_hosts.clone() {
                    self.check_upr(
                        &format!("{what} statement"),
                        format!("{}:{h}:{what}", res.name),
                        line,
                    );
                }
                let (addr, aline) = self.parse_address(tk)?;
                self.expect_punct(tk, ';')?;
                if addr_scope_local(&addr.addr) {
                    for h in host.on_hosts.clone() {
                        self.check_uniq("IP", format!("{h}:{}:{}", addr.addr, addr.port), aline);
                    }
                } else {
                    self.check_uniq("IP", format!("{}:{}", addr.addr, addr.port), aline);
                }
                if t.text == "address" {
                    host.address = Some(addr);
                } else {
                    host.alt_address = Some(addr);
                }
            } else if is_kw(&t, "proxy") {
                host.proxy = Some(self.parse_proxy_section(tk)?);
            } else if is_kw(&t, "volume") {
                let vnr = self.expect_integer(tk)?;
                let vnr = self.volume_number(&vnr, line);
                let hosts = host.on_hosts.clone();
                let vol = self.parse_volume(tk, vnr, &hosts)?;
                insert_sorted(&mut host.volumes, vol);
            } else if is_kw(&t, "options") {
                self.expect_punct(tk, '{')?;
                host.options = self.parse_options(tk, Section::Options)?;
            } else {
                return Err(self.expected(
                    tk,
                    "disk | device | address | meta-disk | flexible-meta-disk",
                ));
            }
        }
    }

    fn parse_proxy_section(&mut self, tk: &mut Tokens) -> PResult<ProxyInfo> {
        let t = tk.next()?;
        if !is_kw(&t, "on") {
            return Err(self.expected(tk, "TK_ON"));
        }
        let on_hosts = self.parse_hosts(tk, '{')?;
        let mut inside = None;
        let mut outside = None;
        let mut options = Vec::new();
        let mut plugins = Vec::new();
        loop {
            let t = tk.next()?;
            if is_punct(&t, '}') {
                break;
            }
            if is_kw(&t, "inside") || is_kw(&t, "outside") {
                let (addr, _) = self.parse_address(tk)?;
                self.expect_punct(tk, ';')?;
                if t.text == "inside" {
                    inside = Some(addr);
                } else {
                    outside = Some(addr);
                }
            } else if is_kw(&t, "options") {
                self.expect_punct(tk, '{')?;
                (options, plugins) = self.parse_proxy_options(tk)?;
            } else {
                return Err(self.expected(tk, "inside | outside"));
            }
        }
        let line = tk.line();
        let names = on_hosts.join(" ");
        let (Some(inside), Some(outside)) = (inside, outside) else {
            let missing = "inside | outside";
            return Err(self.err_at(
                line,
                format!("in section: proxy on {names} {{ ... }}: '{missing}' keyword missing."),
            ));
        };
        Ok(ProxyInfo {
            on_hosts,
            inside,
            outside,
            options,
            plugins,
        })
    }

    fn parse_stacked_section(&mut self, tk: &mut Tokens, res: &mut Resource) -> PResult<Host> {
        let start = tk.line();
        let lower = self.expect_string(tk)?;
        self.check_uniq("stacked-on-top-of", format!("stacked:{lower}"), start);
        let mut host = Host {
            kind: HostKind::Stacked { lower },
            on_hosts: Vec::new(),
            address: None,
            alt_address: None,
            volumes: Vec::new(),
            options: Vec::new(),
            proxy: None,
            line: start,
        };
        self.expect_punct(tk, '{')?;
        loop {
            let t = tk.next()?;
            let line = tk.line();
            if is_punct(&t, '}') {
                break;
            }
            if is_kw(&t, "device") {
                let file = self.file.clone();
                let vol = volume0(&mut host.volumes, &mut self.errors, &file, line);
                self.parse_device(tk, vol, &[])?;
                vol.meta_disk = Some("internal".into());
                vol.meta_index = Some("internal".into());
            } else if is_kw(&t, "address") || is_kw(&t, "alternate-link-address") {
                let (addr, _) = self.parse_address(tk)?;
                self.expect_punct(tk, ';')?;
                if t.text == "address" {
                    host.address = Some(addr);
                } else {
                    host.alt_address = Some(addr);
                }
            } else if is_kw(&t, "proxy") {
                host.proxy = Some(self.parse_proxy_section(tk)?);
            } else if is_kw(&t, "volume") {
                let vnr = self.expect_integer(tk)?;
                let vnr = self.volume_number(&vnr, line);
                self.expect_punct(tk, '{')?;
                let d = tk.next()?;
                if !is_kw(&d, "device") {
                    return Err(self.expected(tk, "TK_DEVICE"));
                }
                let mut vol = Volume {
                    vnr,
                    ..Volume::default()
                };
                self.parse_device(tk, &mut vol, &[])?;
                self.expect_punct(tk, '}')?;
                vol.meta_disk = Some("internal".into());
                vol.meta_index = Some("internal".into());
                insert_sorted(&mut host.volumes, vol);
            } else {
                return Err(self.expected(tk, "device | address | proxy"));
            }
        }
        // Stacked sections have no host names yet (they come from the lower resource), so
        // inheriting registers nothing.
        let _ = inherit_volumes(&res.volumes, &mut host);
        if host.address.is_none() {
            let lower = match &host.kind {
                HostKind::Stacked { lower } => lower.clone(),
                _ => String::new(),
            };
            self.invalid(
                start,
                format!(
                    "in resource {}, on {lower} {{ ... }}: 'address' keyword missing.",
                    res.name
                ),
            );
        }
        Ok(host)
    }

    /// End of a host section: inherit resource-level volumes, check completeness.
    fn finish_host(
        &mut self,
        res: &Resource,
        host: &mut Host,
        require_all: bool,
        start: u32,
        end: u32,
    ) {
        // Inherit what the resource level said so far, and register inherited values.
        for (what, key) in inherit_volumes(&res.volumes, host) {
            self.check_uniq(what, key, start);
        }
        // External meta-data slots must not be shared.
        for v in host.volumes.clone() {
            if let (Some(md), Some(idx)) = (&v.meta_disk, &v.meta_index) {
                if md != "internal" {
                    for h in host.on_hosts.clone() {
                        self.check_uniq("meta-disk", format!("{h}:{md}[{idx}]"), start);
                    }
                }
            }
        }
        if !require_all {
            return;
        }
        let names = host.on_hosts.join(" ");
        let missing = |what: &str| {
            format!(
                "in resource {}, on {names} {{ ... }}: '{what}' keyword missing.",
                res.name
            )
        };
        if host.address.is_none() {
            self.invalid(start, missing("address"));
        }
        let mut msgs = Vec::new();
        for v in &host.volumes {
            if v.device.is_none() && v.minor.is_none() {
                msgs.push(missing("device"));
            }
            if v.disk.is_none() {
                msgs.push(missing("disk"));
            }
            if v.meta_disk.is_none() {
                msgs.push(missing("meta-disk"));
            }
            if v.meta_index.is_none() {
                msgs.push(missing("meta-index"));
            }
        }
        if host.volumes.is_empty() {
            msgs.push(missing("device"));
            msgs.push(missing("disk"));
            msgs.push(missing("meta-disk"));
        }
        let any_implicit = host.volumes.iter().any(|v| v.implicit);
        let any_nonzero = host.volumes.iter().any(|v| v.vnr != 0);
        for m in msgs {
            self.invalid(start, m);
        }
        if any_implicit && any_nonzero {
            self.invalid(
                end,
                format!(
                    "in resource {}: you must not mix implicit and explicit volumes",
                    res.name
                ),
            );
        }
    }

    /// All host sections must define the same volumes.
    fn check_volumes_hosts(&mut self, res: &Resource, line: u32) {
        let Some(first) = res.hosts.first() else {
            return;
        };
        for other in &res.hosts[1..] {
            if matches!(other.kind, HostKind::Stacked { .. })
                || matches!(first.kind, HostKind::Stacked { .. })
            {
                continue;
            }
            let a: Vec<(u32, bool)> = first.volumes.iter().map(|v| (v.vnr, v.implicit)).collect();
            let b: Vec<(u32, bool)> = other.volumes.iter().map(|v| (v.vnr, v.implicit)).collect();
            let (n1, n2) = (first.on_hosts.join(" "), other.on_hosts.join(" "));
            for (vnr, imp) in &a {
                match b.iter().find(|(v, _)| v == vnr) {
                    None => self.invalid(
                        line,
                        format!("in resource {}, on {n1} {{ ... }}: volume {vnr} not defined on {n2}", res.name),
                    ),
                    Some((_, imp2)) if imp2 != imp => self.invalid(
                        line,
                        format!(
                            "in resource {}, on {n1} resp. {n2}: volume {vnr} must not be implicit on one but not the other",
                            res.name
                        ),
                    ),
                    _ => {}
                }
            }
            for (vnr, _) in &b {
                if !a.iter().any(|(v, _)| v == vnr) {
                    self.invalid(
                        line,
                        format!("in resource {}, on {n1} {{ ... }}: volume {vnr} missing (present on {n2})", res.name),
                    );
                }
            }
        }
    }

    fn parse_volume(&mut self, tk: &mut Tokens, vnr: u32, hosts: &[String]) -> PResult<Volume> {
        let mut vol = Volume {
            vnr,
            ..Volume::default()
        };
        self.expect_punct(tk, '{')?;
        loop {
            let t = tk.next()?;
            if is_punct(&t, '}') {
                return Ok(vol);
            }
            if !(is_kw(&t, "disk")
                || is_kw(&t, "device")
                || is_kw(&t, "meta-disk")
                || is_kw(&t, "flexible-meta-disk"))
            {
                return Err(self.expected(tk, "device | disk | meta-disk | flex-meta-disk | }"));
            }
            self.parse_volume_stmt(tk, &mut vol, hosts, &t)?;
        }
    }

    /// `disk X;`, `disk { }`, `device ...;`, `meta-disk ...;`, `flexible-meta-disk X;`.
    fn parse_volume_stmt(
        &mut self,
        tk: &mut Tokens,
        vol: &mut Volume,
        hosts: &[String],
        t: &Token,
    ) -> PResult<()> {
        match t.text.as_str() {
            "disk" => {
                let v = tk.next()?;
                if is_string(&v) {
                    vol.disk = Some(v.text);
                    self.expect_punct(tk, ';')?;
                } else if is_punct(&v, '{') {
                    let opts = self.parse_options(tk, Section::Disk)?;
                    vol.disk_options = opts;
                } else {
                    return Err(self.expected(tk, "TK_STRING | {"));
                }
            }
            "device" => self.parse_device(tk, vol, hosts)?,
            "meta-disk" => {
                let md = self.expect_string(tk)?;
                if md == "internal" {
                    vol.meta_disk = Some(md);
                    vol.meta_index = Some("internal".into());
                    self.expect_punct(tk, ';')?;
                } else {
                    vol.meta_disk = Some(md);
                    let n = tk.next()?;
                    if is_punct(&n, '[') {
                        let idx = self.expect_integer(tk)?;
                        vol.meta_index = Some(idx);
                        self.expect_punct(tk, ']')?;
                        self.expect_punct(tk, ';')?;
                    } else if is_punct(&n, ';') {
                        vol.meta_index = Some("flexible".into());
                    } else {
                        return Err(self.expected(tk, "[ | ;"));
                    }
                }
            }
            "flexible-meta-disk" => {
                let md = self.expect_string(tk)?;
                vol.meta_index = Some(if md == "internal" {
                    "internal".to_string()
                } else {
                    "flexible".to_string()
                });
                vol.meta_disk = Some(md);
                self.expect_punct(tk, ';')?;
            }
            _ => return Err(self.expected(tk, "device | disk | meta-disk")),
        }
        Ok(())
    }

    fn parse_device(&mut self, tk: &mut Tokens, vol: &mut Volume, hosts: &[String]) -> PResult<()> {
        let line = tk.line();
        let t = tk.next()?;
        if is_string(&t) {
            let dev = if t.text.starts_with("drbd") {
                format!("/dev/{}", t.text)
            } else {
                t.text.clone()
            };
            if !dev.starts_with("/dev/drbd") {
                self.invalid(
                    line,
                    "device name must start with /dev/drbd\n\t(/dev/ is optional, but drbd is required)".into(),
                );
            }
            vol.device = Some(dev.clone());
            let n = tk.next()?;
            if is_punct(&n, ';') {
                match minor_of_device(&dev) {
                    Some(m) => vol.minor = Some(m),
                    None => self.invalid(
                        line,
                        "no minor given nor device name contains a minor number".into(),
                    ),
                }
            } else if is_kw(&n, "minor") {
                self.parse_minor(tk, vol, line)?;
                self.check_minor_nonsense(&dev, vol.minor.unwrap_or(0), line);
            } else {
                return Err(self.expected(tk, "minor | ;"));
            }
        } else if is_kw(&t, "minor") {
            self.parse_minor(tk, vol, line)?;
        } else {
            return Err(self.expected(tk, "TK_STRING | minor"));
        }
        for h in hosts {
            if let Some(m) = vol.minor {
                self.check_uniq("device-minor", format!("device-minor:{h}:{m}"), line);
            }
            if let Some(d) = vol.device.clone() {
                self.check_uniq("device", format!("device:{h}:{d}"), line);
            }
        }
        Ok(())
    }

    fn parse_minor(&mut self, tk: &mut Tokens, vol: &mut Volume, line: u32) -> PResult<()> {
        let v = self.expect_integer(tk)?;
        let m = atoi(&v);
        if m > MINOR_MAX {
            self.invalid(line, format!("minor {v} out of range [0..{MINOR_MAX}]"));
        }
        vol.minor = Some(m);
        self.expect_punct(tk, ';')
    }

    fn check_minor_nonsense(&mut self, dev: &str, minor: u32, line: u32) {
        let suffix = dev.get(9..).unwrap_or("");
        if !suffix.is_empty() && suffix.bytes().all(|c| c.is_ascii_digit()) {
            if atoi(suffix) != minor {
                self.invalid(
                    line,
                    format!(
                        "explicit minor number must match with device name\n\tTry \"device /dev/drbd{minor} minor {minor};\",\n\tor leave off either device name or explicit minor.\n\tArbitrary device names must start with /dev/drbd_\n\tmind the '_'! (/dev/ is optional, but drbd_ is required)"
                    ),
                );
            }
        } else if suffix.starts_with('_') {
            self.warnings.push(self.err_at(
                line,
                format!(
                    "arbitrary device names (/dev/drbd_...) are no longer generated from current udev rules.\n\tYou may need to manually mknod {dev} b 147 {minor}\n\tYou should no longer use them."
                ),
            ));
        } else {
            self.invalid(
                line,
                "explicit device names should be of the form /dev/drbd<minor>".into(),
            );
        }
    }

    // ----------------------------------------------------------------------------------------
    // After the whole file: who am I, who is the peer, cross-resource checks.

    fn post_parse(&mut self) {
        let node = self.opts.node.clone();
        // Stacked sections take their host names from the lower resource.
        let names: Vec<(String, Vec<String>)> = self
            .config
            .resources
            .iter()
            .map(|r| {
                let hosts = r
                    .hosts
                    .iter()
                    .filter(|h| !matches!(h.kind, HostKind::Stacked { .. }))
                    .flat_map(|h| h.on_hosts.clone())
                    .collect();
                (r.name.clone(), hosts)
            })
            .collect();
        for ri in 0..self.config.resources.len() {
            for hi in 0..self.config.resources[ri].hosts.len() {
                let HostKind::Stacked { lower } = self.config.resources[ri].hosts[hi].kind.clone()
                else {
                    continue;
                };
                match names.iter().find(|(n, _)| *n == lower) {
                    Some((_, hosts)) => {
                        self.config.resources[ri].hosts[hi].on_hosts = hosts.clone()
                    }
                    None => {
                        let r = &self.config.resources[ri];
                        let e = ParseError::at(
                            &r.file,
                            r.line,
                            format!(
                                "in resource {}, referenced resource '{lower}' not defined.",
                                r.name
                            ),
                        );
                        self.errors.push(e);
                    }
                }
            }
        }
        // Find this node's section: non-stacked resources first, then stacked ones (whose
        // match depends on the lower resource's).
        for pass in 0..2 {
            for ri in 0..self.config.resources.len() {
                let stacked = self.config.resources[ri]
                    .hosts
                    .iter()
                    .any(|h| matches!(h.kind, HostKind::Stacked { .. }));
                if stacked != (pass == 1) {
                    continue;
                }
                self.set_me(ri, &node);
            }
        }
    }

    fn set_me(&mut self, ri: usize, node: &str) {
        let mut me: Option<usize> = None;
        let res = &self.config.resources[ri];
        let mut errors = Vec::new();
        for (hi, host) in res.hosts.iter().enumerate() {
            let matched = match &host.kind {
                HostKind::Floating => host.address.as_ref().is_some_and(|a| {
                    self.source.is_local_address(&a.af, &a.addr) || a.addr == node
                }),
                HostKind::Stacked { lower } => self
                    .config
                    .resources
                    .iter()
                    .find(|r| &r.name == lower)
                    .is_some_and(|r| r.me.is_some()),
                HostKind::ThisHost => true,
                HostKind::RemoteHost => false,
                HostKind::On => host.on_hosts.iter().any(|h| h == node),
            };
            if !matched {
                continue;
            }
            if let Some(prev) = me {
                let p = &res.hosts[prev];
                errors.push(ParseError::at(
                    &res.file,
                    host.line,
                    format!(
                        "in resource {}, on {} {{ ... }} ... on {} {{ ... }}:\n\tThere are multiple host sections for this node.",
                        res.name,
                        p.on_hosts.join(" "),
                        host.on_hosts.join(" ")
                    ),
                ));
            }
            me = Some(hi);
        }
        self.errors.extend(errors);
        let res = &mut self.config.resources[ri];
        res.me = me;
        if let Some(me) = me {
            // With exactly two host sections the other one is the peer.
            if res.hosts.len() == 2 {
                res.peer = Some(1 - me);
            }
        }
    }

    fn validate(&mut self) {
        let interactive = self.opts.interactive;
        let known: Vec<(String, bool)> = self
            .config
            .resources
            .iter()
            .map(|r| (r.name.clone(), r.ignored()))
            .collect();
        for ri in 0..self.config.resources.len() {
            // resync-after must name a resource that exists on this node.
            let mut keep = Vec::new();
            let res = &self.config.resources[ri];
            for o in &res.disk {
                if o.name == "resync-after" {
                    let target = o.value.clone().unwrap_or_default();
                    let target_res = target.split('/').next().unwrap_or("").to_string();
                    let found = known.iter().find(|(n, _)| *n == target_res);
                    if found.is_none_or(|(_, ignored)| *ignored) {
                        let e = ParseError::at(
                            &res.file,
                            res.line,
                            format!(
                                "in resource {}:\n\tresource '{target}' mentioned in 'resync-after' option is not known{}.",
                                res.name,
                                if found.is_some() { " on this host" } else { "" }
                            ),
                        );
                        if interactive {
                            self.errors.push(e);
                        } else {
                            self.warnings.push(e);
                            keep.push(false);
                            continue;
                        }
                    }
                }
                keep.push(true);
            }
            let mut it = keep.into_iter();
            self.config.resources[ri]
                .disk
                .retain(|_| it.next().unwrap_or(true));

            let res = &self.config.resources[ri];
            let Some(me) = res.me else { continue };
            let me_names = &res.hosts[me].on_hosts;
            let peer_names: Vec<String> = res
                .peer
                .map(|p| res.hosts[p].on_hosts.clone())
                .unwrap_or_default();
            if let Some(o) = res.net.iter().find(|o| o.name == "after-sb-0pri") {
                let v = o.value.clone().unwrap_or_default();
                if let Some(n) = v.strip_prefix("discard-node-") {
                    if res.peer.is_some()
                        && !peer_names.iter().any(|p| p == n)
                        && !me_names.iter().any(|m| m == n)
                    {
                        let e = ParseError::at(
                            &res.file,
                            res.line,
                            format!(
                                "in resource {}:\n\tthe nodename in the '{v}' option is not known.\n\tvalid nodenames are: '{} {}'.",
                                res.name,
                                me_names.join(" "),
                                peer_names.join(" ")
                            ),
                        );
                        self.errors.push(e);
                    }
                }
            }
            let two_primaries = res.net.iter().any(|o| o.name == "allow-two-primaries");
            if res.become_primary_on.iter().any(|h| h == "both") && !two_primaries {
                let e = ParseError::at(
                    &res.file,
                    res.line,
                    format!(
                        "in resource {}:\nbecome-primary-on is set to both, but allow-two-primaries is not set.",
                        res.name
                    ),
                );
                self.errors.push(e);
            }
            if let Some(p) = res.peer {
                if res.hosts[me].proxy.is_some() != res.hosts[p].proxy.is_some() {
                    let e = ParseError::at(
                        &res.file,
                        res.line,
                        format!(
                            "in resource {}:\n\tEither both 'on' sections must contain a proxy subsection, or none.",
                            res.name
                        ),
                    );
                    self.errors.push(e);
                }
                for b in &res.become_primary_on {
                    if b != "both" && !me_names.contains(b) && !peer_names.contains(b) {
                        let e = ParseError::at(
                            &res.file,
                            res.line,
                            format!(
                                "in resource {}:\n\tbecome-primary-on contains '{b}', which is not named with the 'on' sections.",
                                res.name
                            ),
                        );
                        self.errors.push(e);
                    }
                }
            }
        }
    }
}

/// How a section treats an option keyword.
enum Accept {
    Flag,
    NoFlag,
    Value,
    Ignored,
    No,
}

#[derive(Clone, Copy)]
enum Section {
    Disk,
    Net,
    Options,
    Handlers,
    Startup,
}

impl Section {
    fn accepts(self, info: &OptInfo) -> Accept {
        use Class::*;
        match (self, info.class) {
            (_, Deprecated) => Accept::Ignored,
            (Section::Disk, DiskFlag)
            | (Section::Net, NetFlag)
            | (Section::Startup, StartupFlag) => Accept::Flag,
            (Section::Disk, DiskNoFlag) | (Section::Net, NetNoFlag) => Accept::NoFlag,
            (Section::Disk, DiskOption)
            | (Section::Net, NetOption)
            | (Section::Options, ResOption)
            | (Section::Handlers, Handler)
            | (Section::Startup, StartupOption) => Accept::Value,
            _ => Accept::No,
        }
    }
}

fn range(min: u64, max: u64) -> options::Range {
    options::Range {
        min,
        max,
        scale: options::Scale::One,
        range_checked: true,
    }
}

/// C `atoi`: leading digits, 0 when there are none, saturating.
fn atoi(s: &str) -> u32 {
    let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits
        .parse::<u64>()
        .map_or(if digits.is_empty() { 0 } else { u32::MAX }, |v| {
            u32::try_from(v).unwrap_or(u32::MAX)
        })
}

/// The minor number in a device name such as `/dev/drbd3`.
fn minor_of_device(dev: &str) -> Option<u32> {
    let digits = dev.strip_prefix("/dev/drbd")?;
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The implicit volume 0 of a host or resource; mixing it with explicit volumes is an error.
fn volume0<'v>(
    vols: &'v mut Vec<Volume>,
    errors: &mut Vec<ParseError>,
    file: &str,
    line: u32,
) -> &'v mut Volume {
    if vols.is_empty() {
        vols.push(Volume {
            vnr: 0,
            implicit: true,
            ..Volume::default()
        });
    } else if !(vols.len() == 1 && vols[0].vnr == 0 && vols[0].implicit) {
        errors.push(ParseError::at(
            file,
            line,
            "mixing explicit and implicit volumes is not allowed".into(),
        ));
    }
    &mut vols[0]
}

fn insert_sorted(vols: &mut Vec<Volume>, vol: Volume) {
    let pos = vols
        .iter()
        .position(|v| v.vnr > vol.vnr)
        .unwrap_or(vols.len());
    vols.insert(pos, vol);
}

/// Fills what a host's volumes leave unset from the resource-level volumes. Returns the
/// inherited backing disks and minors as uniqueness keys, which the caller registers.
fn inherit_volumes(from: &[Volume], host: &mut Host) -> Vec<(&'static str, String)> {
    let mut keys = Vec::new();
    for s in from {
        if !host.volumes.iter().any(|v| v.vnr == s.vnr) {
            insert_sorted(
                &mut host.volumes,
                Volume {
                    vnr: s.vnr,
                    implicit: s.implicit,
                    ..Volume::default()
                },
            );
        }
        let t = host
            .volumes
            .iter_mut()
            .find(|v| v.vnr == s.vnr)
            .expect("inserted above");
        if let (None, Some(d)) = (&t.disk, &s.disk) {
            t.disk = Some(d.clone());
            keys.extend(
                host.on_hosts
                    .iter()
                    .map(|h| ("disk", format!("disk:{h}:{d}"))),
            );
        }
        if t.device.is_none() {
            t.device = s.device.clone();
        }
        if let (None, Some(m)) = (t.minor, s.minor) {
            t.minor = Some(m);
            keys.extend(
                host.on_hosts
                    .iter()
                    .map(|h| ("device-minor", format!("device-minor:{h}:{m}"))),
            );
        }
        if t.meta_disk.is_none() && s.meta_disk.is_some() {
            t.meta_disk = s.meta_disk.clone();
            t.meta_index = s.meta_index.clone();
        }
    }
    keys
}
