//! Tokenizer for drbd.conf.
//!
//! The token classes and their precedence follow the 8.4 front end of drbd-utils, because the
//! classification decides what the parser accepts: `8k` is a word (the number class only takes
//! the upper-case `K`, `M`, `G` and `s` suffixes), `10.0.0.1` is an IPv4 address and not a word,
//! `one` is a word and not the keyword `on`. Like a longest-match scanner, every candidate class
//! is measured at the current position and the longest wins; on a tie the earlier class wins
//! (keyword, IPv4, IPv6, number, word).

use super::ParseError;

/// Longest bare word (`[a-zA-Z0-9/._-]`); a longer run is a "token too long" error.
pub const MAX_WORD_LEN: usize = 128;
/// Longest quoted string body; a longer one is a "double quoted string too long" error.
pub const MAX_DQSTRING_LEN: usize = 255;
/// Longest run of digits in a number token; longer runs are words.
const MAX_NUMBER_DIGITS: usize = 8;

/// What a token is. Keywords are words whose text is in the keyword list; the parser decides
/// which keywords are legal where, so the lexer only marks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenKind {
    /// One of `{ } ; [ ] :`.
    Punct(char),
    /// A bare word that is a keyword of the grammar (including option names).
    Keyword,
    /// A dotted-quad IPv4 address.
    Ipv4,
    /// An IPv6 address (without brackets).
    Ipv6,
    /// Digits with an optional `K`, `M`, `G` or `s` suffix.
    Integer,
    /// A bare word or a double-quoted string (already unescaped).
    String,
    /// Any other single character.
    Else,
    /// End of input.
    Eof,
}

/// A token with its text (unescaped for quoted strings) and the line it ends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub kind: TokenKind,
    pub text: String,
    pub line: u32,
    /// True for a double-quoted string: `"on"` is a string, never the keyword `on`.
    pub quoted: bool,
}

/// Every reserved word of the 8.4 grammar. A bare word equal to one of these is a keyword.
const KEYWORDS: &[&str] = &[
    "on",
    "ignore-on",
    "stacked-on-top-of",
    "floating",
    "no",
    "net",
    "yes",
    "ask",
    "skip",
    "disk",
    "proxy",
    "minor",
    "inside",
    "volume",
    "cmd-timeout-short",
    "cmd-timeout-medium",
    "cmd-timeout-long",
    "syncer",
    "device",
    "global",
    "common",
    "options",
    "outside",
    "address",
    "alternate-link-address",
    "startup",
    "include",
    "handlers",
    "minor-count",
    "disable-ip-verification",
    "udev-always-use-vnr",
    "dialog-refresh",
    "resource",
    "meta-disk",
    "flexible-meta-disk",
    "usage-count",
    "_this_host",
    "_remote_host",
    "sci",
    "ssocks",
    "sdp",
    "ipv4",
    "ipv6",
];

/// True when `word` is reserved: a structural keyword or any option name.
pub fn is_keyword(word: &str) -> bool {
    KEYWORDS.contains(&word) || super::options::lookup(word).is_some()
}

fn is_word_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'/' | b'.' | b'_' | b'-')
}

/// Tokenizer over one file's text.
pub struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    line: u32,
    file: String,
}

impl<'a> Lexer<'a> {
    pub fn new(src: &'a str, file: &str) -> Self {
        Lexer {
            src: src.as_bytes(),
            pos: 0,
            line: 1,
            file: file.to_string(),
        }
    }

    /// The current line (1-based), as error messages report it.
    pub fn line(&self) -> u32 {
        self.line
    }

    fn err(&self, message: String) -> ParseError {
        ParseError::at(&self.file, self.line, message)
    }

    /// Returns the next token, or an error for a malformed string or an over-long word.
    pub fn next_token(&mut self) -> Result<Token, ParseError> {
        // Skip white space, newlines and comments.
        loop {
            match self.src.get(self.pos) {
                Some(b' ' | b'\t' | b'\r') => self.pos += 1,
                Some(b'\n') => {
                    self.pos += 1;
                    self.line += 1;
                }
                Some(b'#') => {
                    while let Some(&c) = self.src.get(self.pos) {
                        if c == b'\n' {
                            break;
                        }
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
        let start = self.pos;
        let Some(&c) = self.src.get(start) else {
            return Ok(self.token(TokenKind::Eof, String::new()));
        };
        // `::1` starts with a colon: an address is the longer match.
        if matches!(c, b'{' | b'}' | b';' | b'[' | b']')
            || (c == b':' && ipv6_len(&self.src[start..]) == 0)
        {
            self.pos += 1;
            return Ok(self.token(TokenKind::Punct(c as char), (c as char).to_string()));
        }
        if c == b'"' {
            return self.dq_string();
        }

        let rest = &self.src[start..];
        let word_len = rest.iter().take_while(|&&c| is_word_char(c)).count();
        let ipv4_len = ipv4_len(rest);
        let ipv6_len = ipv6_len(rest);
        let num_len = number_len(rest);
        // Longest match wins; ties go to the earlier class.
        let best = word_len.max(ipv4_len).max(ipv6_len).max(num_len);
        if best == 0 {
            // Anything else is one character of its own. `pos` always sits on a character
            // boundary: it only ever advances over ASCII classes or whole characters.
            // A character is at most four bytes: decode only those, not the rest of the file.
            let ch = String::from_utf8_lossy(&rest[..rest.len().min(4)])
                .chars()
                .next()
                .unwrap_or(char::REPLACEMENT_CHARACTER);
            self.pos += ch.len_utf8();
            return Ok(self.token(TokenKind::Else, ch.to_string()));
        }
        let text = String::from_utf8_lossy(&rest[..best]).into_owned();
        let kind = if word_len == best && is_keyword(&text) {
            TokenKind::Keyword
        } else if ipv4_len == best {
            TokenKind::Ipv4
        } else if ipv6_len == best {
            TokenKind::Ipv6
        } else if num_len == best {
            TokenKind::Integer
        } else {
            if word_len > MAX_WORD_LEN {
                return Err(self.err(format!(
                    "Token too long >>>{}...<<<",
                    &text[..20.min(text.len())]
                )));
            }
            TokenKind::String
        };
        self.pos += best;
        Ok(self.token(kind, text))
    }

    fn token(&self, kind: TokenKind, text: String) -> Token {
        Token {
            kind,
            text,
            line: self.line,
            quoted: false,
        }
    }

    /// A double-quoted string: at most 255 characters, backslash escapes the next character,
    /// no embedded newline.
    fn dq_string(&mut self) -> Result<Token, ParseError> {
        let start = self.pos;
        let mut i = start + 1;
        let mut body_len = 0usize;
        let mut value = Vec::new();
        loop {
            match self.src.get(i) {
                None | Some(b'\n') => {
                    return Err(self.err(format!(
                        "Unterminated double quoted string\n  we don't allow embedded newlines\n  >>>{}...<<<",
                        preview(&self.src[start..i])
                    )));
                }
                Some(b'"') => {
                    i += 1;
                    break;
                }
                Some(b'\\') => match self.src.get(i + 1) {
                    None | Some(b'\n') => {
                        return Err(self.err(format!(
                            "Unterminated double quoted string\n  we don't allow embedded newlines\n  >>>{}...<<<",
                            preview(&self.src[start..i])
                        )));
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 2;
                    }
                },
                Some(&c) => {
                    value.push(c);
                    i += 1;
                }
            }
            body_len += 1;
            if body_len > MAX_DQSTRING_LEN {
                return Err(self.err(format!(
                    "Double quoted string too long >>>{}...<<<",
                    preview(&self.src[start..i])
                )));
            }
        }
        self.pos = i;
        let text = String::from_utf8_lossy(&value).into_owned();
        Ok(Token {
            kind: TokenKind::String,
            text,
            line: self.line,
            quoted: true,
        })
    }
}

fn preview(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(20)]).into_owned()
}

/// `[0-9]{1,8}[MKGs]?`
fn number_len(s: &[u8]) -> usize {
    let digits = s
        .iter()
        .take(MAX_NUMBER_DIGITS)
        .take_while(|c| c.is_ascii_digit())
        .count();
    if digits == 0 {
        return 0;
    }
    match s.get(digits) {
        Some(b'M' | b'K' | b'G' | b's') => digits + 1,
        _ => digits,
    }
}

/// `([0-9]{1,3}\.){3}[0-9]{1,3}`
fn ipv4_len(s: &[u8]) -> usize {
    let mut i = 0;
    for part in 0..4 {
        let digits = s[i..]
            .iter()
            .take(3)
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 {
            return 0;
        }
        i += digits;
        if part < 3 {
            if s.get(i) != Some(&b'.') {
                return 0;
            }
            i += 1;
        }
    }
    i
}

/// IPv6 addresses: groups of up to four hex digits separated by colons with at least two
/// colons, an optional `%scope` suffix, or the `::ffff:a.b.c.d` mapped form.
fn ipv6_len(s: &[u8]) -> usize {
    // Mapped IPv4 form first; it is the longer match when it applies.
    if s.len() > 7 && s[..7].eq_ignore_ascii_case(b"::ffff:") {
        let v4 = ipv4_len(&s[7..]);
        if v4 > 0 {
            return 7 + v4;
        }
    }
    let mut i = 0;
    let mut colons = 0;
    let mut group = 0;
    while let Some(&c) = s.get(i) {
        if c == b':' {
            colons += 1;
            group = 0;
        } else if c.is_ascii_hexdigit() && group < 4 {
            group += 1;
        } else {
            break;
        }
        i += 1;
    }
    if !(2..=7).contains(&colons) {
        return 0;
    }
    // A zone suffix such as %eth0.
    if s.get(i) == Some(&b'%') {
        let zone = s[i + 1..].iter().take_while(|&&c| is_word_char(c)).count();
        if zone > 0 {
            i += 1 + zone;
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(src: &str) -> Vec<(TokenKind, String)> {
        let mut lx = Lexer::new(src, "t");
        let mut out = Vec::new();
        loop {
            let t = lx.next_token().unwrap();
            if t.kind == TokenKind::Eof {
                return out;
            }
            out.push((t.kind, t.text));
        }
    }

    #[test]
    fn classes_follow_longest_match() {
        let toks = kinds("on one 8k 8K 10.0.0.1:7788 [fd00::1] 123456789 \"a b\" # c\n");
        assert_eq!(
            toks,
            vec![
                (TokenKind::Keyword, "on".into()),
                (TokenKind::String, "one".into()),
                (TokenKind::String, "8k".into()),
                (TokenKind::Integer, "8K".into()),
                (TokenKind::Ipv4, "10.0.0.1".into()),
                (TokenKind::Punct(':'), ":".into()),
                (TokenKind::Integer, "7788".into()),
                (TokenKind::Punct('['), "[".into()),
                (TokenKind::Ipv6, "fd00::1".into()),
                (TokenKind::Punct(']'), "]".into()),
                (TokenKind::String, "123456789".into()),
                (TokenKind::String, "a b".into()),
            ]
        );
    }

    #[test]
    fn unterminated_string_is_an_error() {
        let mut lx = Lexer::new("\"abc\n", "f.conf");
        let e = lx.next_token().unwrap_err();
        assert!(e.to_string().starts_with("f.conf:1: Unterminated"), "{e}");
    }

    #[test]
    fn never_panics_on_arbitrary_text() {
        for src in [
            "\u{e9}\u{1F600}",
            "\"\\",
            "::::::::::",
            "1.2.3.",
            "%",
            "\"\\\n",
        ] {
            let mut lx = Lexer::new(src, "t");
            for _ in 0..20 {
                match lx.next_token() {
                    Ok(t) if t.kind == TokenKind::Eof => break,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
    }
}
