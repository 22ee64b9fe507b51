//! Shared parsers for constraint operands: the engine uses them when it
//! compiles a flag, and write-time validation uses the same functions, so what
//! a write accepts is exactly what evaluation understands.
//!
//! Each parser mirrors what Unleash's Rust engine (unleash-yggdrasil) accepts
//! for the same operator, so imported Unleash flags keep their behaviour:
//! - numbers follow Unleash's grammar for constraint values
//!   (`[+-]?digits[.digits*][e[+-]digits]`), and must be finite;
//! - dates are RFC 3339 timestamps with an offset (`Z` or `±hh:mm`), as
//!   chrono's `DateTime` parser reads them;
//! - semantic versions are strict semver 2.0.0 (no `v` prefix, no leading
//!   zeros), as the `semver` crate reads them;
//! - CIDR ranges are IPv4 or IPv6 networks; a bare address is a single host;
//! - regular expressions use the Rust `regex` syntax (no look-around, no
//!   back-references), unanchored, optionally case-insensitive.
//!
//! Context values are read at evaluation time with the `context_*` variants,
//! which are as lenient as Unleash is with context values.

use std::net::IpAddr;

use chrono::{DateTime, FixedOffset};
use ipnet::IpNet;

/// The most memory one compiled regular expression may take, in bytes
/// (256 KiB), as [`Regex::memory_usage`] measures it. Every replica holds
/// every flag's regexes, and each regex grows search caches of up to about
/// half its size per thread that evaluates it, so this bounds what one
/// constraint value costs each replica; a pattern over it is refused when
/// written. Everyday patterns are far below it (`^[a-z]+@example\.com$`
/// takes about 10 KiB, `\w+@\w+\.com` about 110 KiB); Unicode classes
/// repeated many times are not (`\w` alone is 56 KiB, so `\w{5}` is over,
/// while the ASCII `(?-u)\w{50}` takes 7 KiB). The `regex` crate's default
/// is 10 MiB per automaton; this crate's limit was 1 MiB per automaton (a
/// regex has two or more), with nothing bounding how many a flag held, and
/// 2,000 such patterns in one request grew every replica by 2.7 GB.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// The most memory the lazy DFA of one regex may use for its transition
/// table per searching thread (`regex` allows 2 MiB). A search that needs more
/// clears the table and goes on, or falls back to a slower engine, so this
/// bounds memory without changing results.
pub const REGEX_DFA_CACHE_LIMIT: usize = 256 * 1024;

/// Why a pattern did not compile; each message is one line, suitable for a
/// validation error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegexError {
    /// Not Rust `regex` syntax: the parser's explanation (`unclosed group`).
    Invalid(String),
    /// Valid, but over [`REGEX_SIZE_LIMIT`] once compiled: what it takes.
    TooLarge(String),
}

impl std::fmt::Display for RegexError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegexError::Invalid(reason) | RegexError::TooLarge(reason) => f.write_str(reason),
        }
    }
}

/// What [`Regex::memory_usage`] adds to the measured automata for the
/// regex's own structures (its strategy, cache pool and prefilter), so a
/// budget in bytes also bounds how many patterns it admits.
pub const REGEX_OVERHEAD_BYTES: usize = 1024;

/// A compiled regular expression (Rust `regex` syntax, unanchored) and the
/// memory it takes. Built by [`regex`]; the engine shares one per distinct
/// pattern between every flag that uses it.
#[derive(Debug)]
pub struct Regex {
    /// The compiled automata. Built without capture groups: evaluation only
    /// asks whether a value matches.
    inner: regex_automata::meta::Regex,
    /// What [`Regex::memory_usage`] reports.
    bytes: usize,
}

impl Regex {
    /// Whether the pattern matches anywhere in `text`.
    #[inline]
    pub fn is_match(&self, text: &str) -> bool {
        self.inner.is_match(text)
    }

    /// The memory the compiled regex takes, in bytes: its automata as
    /// regex-automata measures them, its pattern, and
    /// [`REGEX_OVERHEAD_BYTES`] for the structures around them (a pure
    /// literal has no automaton at all). Search caches, built per thread as
    /// it searches, are not counted.
    pub fn memory_usage(&self) -> usize {
        self.bytes
    }
}

/// Parses a numeric constraint operand such as `42`, `-1.5` or `3e2`.
///
/// Returns `None` for anything else, including `NaN`, infinities, hex and
/// surrounding whitespace.
pub fn number(s: &str) -> Option<f64> {
    if !is_decimal(s) {
        return None;
    }
    s.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// Parses a number held by a context attribute. Like Unleash's engine this
/// takes anything Rust's `f64` parser takes (`.5`, `1.`, `inf`…).
pub fn context_number(s: &str) -> Option<f64> {
    s.parse::<f64>().ok()
}

/// Parses an RFC 3339 timestamp (`2024-05-01T12:00:00Z`,
/// `2024-05-01T12:00:00.250+02:00`) into milliseconds since the Unix epoch.
pub fn date_ms(s: &str) -> Option<i64> {
    s.parse::<DateTime<FixedOffset>>()
        .ok()
        .map(|d| d.timestamp_millis())
}

/// Parses a strict semantic version (`1.2.3`, `1.2.3-beta.1+build.5`).
pub fn semver(s: &str) -> Option<semver::Version> {
    semver::Version::parse(s).ok()
}

/// Parses an IPv4 or IPv6 CIDR range (`10.0.0.0/8`, `2001:db8::/32`); a bare
/// address (`10.1.2.3`) is the range of that single host. Surrounding
/// whitespace is ignored, as Unleash trims its `IPs` lists.
pub fn cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net);
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

/// Parses the IP address held by a context attribute (`remoteAddress`).
pub fn context_ip(s: &str) -> Option<IpAddr> {
    s.trim().parse::<IpAddr>().ok()
}

/// Compiles a regular expression (Rust `regex` syntax, unanchored), as the
/// `regex` crate would, but without capture groups and within
/// [`REGEX_SIZE_LIMIT`]: what a write may store.
pub fn regex(pattern: &str, case_insensitive: bool) -> Result<Regex, RegexError> {
    let regex = build(pattern, case_insensitive, REGEX_SIZE_LIMIT)?;
    if regex.bytes > REGEX_SIZE_LIMIT {
        return Err(RegexError::TooLarge(format!(
            "regex compiles to {}, over the {} limit",
            kib(regex.bytes),
            kib(REGEX_SIZE_LIMIT)
        )));
    }
    Ok(regex)
}

/// Compiles a regular expression that is already stored, within the limit
/// writes had before [`REGEX_SIZE_LIMIT`] ([`STORED_REGEX_NFA_LIMIT`] per
/// automaton): a flag written then keeps evaluating as it did, and counts
/// what it takes. Only the engine and the accounting of stored objects use
/// this; writes are held to [`regex`].
pub fn stored_regex(pattern: &str, case_insensitive: bool) -> Result<Regex, RegexError> {
    build(pattern, case_insensitive, STORED_REGEX_NFA_LIMIT)
}

/// The size limit of each automaton of a regex that is already stored
/// (1 MiB, what writes were held to before [`REGEX_SIZE_LIMIT`]).
pub const STORED_REGEX_NFA_LIMIT: usize = 1 << 20;

/// Builds a regex whose automata each stay within `nfa_limit` bytes.
fn build(pattern: &str, case_insensitive: bool, nfa_limit: usize) -> Result<Regex, RegexError> {
    use regex_automata::meta;
    use regex_automata::util::syntax;
    let config = meta::Config::new()
        .match_kind(regex_automata::MatchKind::LeftmostFirst)
        .utf8_empty(true)
        .which_captures(regex_automata::nfa::thompson::WhichCaptures::None)
        .nfa_size_limit(Some(nfa_limit))
        .onepass_size_limit(Some(REGEX_SIZE_LIMIT / 4))
        .dfa_size_limit(Some(REGEX_SIZE_LIMIT / 4))
        .hybrid_cache_capacity(REGEX_DFA_CACHE_LIMIT);
    let built = meta::Builder::new()
        .configure(config)
        .syntax(
            syntax::Config::new()
                .utf8(true)
                .case_insensitive(case_insensitive),
        )
        .build(pattern);
    match built {
        Ok(inner) => {
            let bytes = inner.memory_usage() + pattern.len() + REGEX_OVERHEAD_BYTES;
            Ok(Regex { inner, bytes })
        }
        Err(e) if e.size_limit().is_some() => Err(RegexError::TooLarge(format!(
            "regex compiles to more than the {} limit (Unicode classes such as \\w are large; (?-u) makes them ASCII)",
            kib(nfa_limit)
        ))),
        Err(e) => Err(RegexError::Invalid(match e.syntax_error() {
            Some(syntax) => one_line(&syntax.to_string()).to_string(),
            None => one_line(&e.to_string()).to_string(),
        })),
    }
}

/// A size in bytes for messages: `300 KiB` or `2.1 MiB` (rounded up, so a
/// size over a limit never reads as the limit).
pub fn kib(bytes: usize) -> String {
    if bytes >= 1024 * 1024 {
        let tenths = (bytes * 10).div_ceil(1024 * 1024);
        if tenths.is_multiple_of(10) {
            format!("{} MiB", tenths / 10)
        } else {
            format!("{}.{} MiB", tenths / 10, tenths % 10)
        }
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

/// regex-syntax explains errors over several lines (pattern, caret,
/// `error: …`); the last line is the part that fits in a one-line message.
fn one_line(message: &str) -> &str {
    let last = message
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or(message);
    last.strip_prefix("error: ").unwrap_or(last)
}

/// Whether `s` is written as Unleash's grammar writes numbers:
/// `[+-]?digits[.digits*][(e|E)[+-]?digits]`.
fn is_decimal(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > start
    };
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        i += 1;
    }
    if !digits(&mut i) {
        return false;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        digits(&mut i);
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parser input and whether it should parse; `parsed` renders the
    /// result so every parser shares one table-driven check.
    fn check(cases: &[(&str, Option<&str>)], parse: impl Fn(&str) -> Option<String>) {
        for (input, expected) in cases {
            assert_eq!(parse(input).as_deref(), *expected, "parsing {input:?}");
        }
    }

    #[test]
    fn numbers() {
        check(
            &[
                ("42", Some("42")),
                ("-1.5", Some("-1.5")),
                ("+7", Some("7")),
                ("3e2", Some("300")),
                ("1.", Some("1")),
                ("2.5E-1", Some("0.25")),
                ("0", Some("0")),
                (".5", None),
                ("", None),
                (" 1", None),
                ("1 ", None),
                ("NaN", None),
                ("inf", None),
                ("1e", None),
                ("0x10", None),
                ("1,5", None),
                ("1e999", None),
            ],
            |s| number(s).map(|n| n.to_string()),
        );
        check(
            &[(".5", Some("0.5")), ("abc", None), ("1e3", Some("1000"))],
            |s| context_number(s).map(|n| n.to_string()),
        );
    }

    #[test]
    fn dates() {
        check(
            &[
                ("1970-01-01T00:00:00Z", Some("0")),
                ("2022-01-29T13:00:00.000Z", Some("1643461200000")),
                ("2022-01-29T15:00:00+02:00", Some("1643461200000")),
                ("2022-01-29T13:00:00.5Z", Some("1643461200500")),
                ("2022-01-29", None),
                ("2022-01-29T13:00:00", None),
                ("not a date", None),
                ("", None),
            ],
            |s| date_ms(s).map(|n| n.to_string()),
        );
    }

    #[test]
    fn semvers() {
        check(
            &[
                ("1.2.3", Some("1.2.3")),
                ("1.2.3-beta.1+build.5", Some("1.2.3-beta.1+build.5")),
                ("v1.2.3", None),
                ("1.2", None),
                ("01.2.3", None),
                ("1.2.3.4", None),
                ("", None),
            ],
            |s| semver(s).map(|v| v.to_string()),
        );
    }

    #[test]
    fn cidrs() {
        check(
            &[
                ("10.0.0.0/8", Some("10.0.0.0/8")),
                ("10.1.2.3", Some("10.1.2.3/32")),
                (" 192.168.0.0/16 ", Some("192.168.0.0/16")),
                ("2001:db8::/32", Some("2001:db8::/32")),
                ("::1", Some("::1/128")),
                ("10.0.0.0/33", None),
                ("10.0.0", None),
                ("example.com", None),
                ("", None),
            ],
            |s| cidr(s).map(|n| n.to_string()),
        );
    }

    #[test]
    fn regexes() {
        let is_match = |pattern: &str, ci: bool, text: &str| {
            regex(pattern, ci)
                .map(|r| r.is_match(text))
                .map_err(|_| "error")
        };
        assert_eq!(is_match("^cat$", false, "Cat"), Ok(false));
        assert_eq!(is_match("^cat$", true, "Cat"), Ok(true));
        assert_eq!(is_match("cat", false, "concatenate"), Ok(true));
        assert_eq!(is_match("(regex", false, "x"), Err("error"));
        assert_eq!(is_match("^(?=a)b$", false, "ab"), Err("error"));
        assert_eq!(is_match(r"^(a)\1$", false, "aa"), Err("error"));
    }

    /// Writes are held to the lower limit; a pattern stored under the former
    /// one still compiles for evaluation, and both are measured.
    #[test]
    fn regex_limits() {
        assert!(matches!(
            regex(r"\w{10}", false),
            Err(RegexError::TooLarge(_))
        ));
        let stored = stored_regex(r"\w{10}", false).unwrap();
        assert!(stored.is_match("déjà_vu_1234"));
        assert!(!stored.is_match("déjà vu"));
        assert!(stored.memory_usage() > REGEX_SIZE_LIMIT);
        assert!(matches!(
            stored_regex(r"\w{50}", false),
            Err(RegexError::TooLarge(_))
        ));
        let everyday = regex(r"^[a-z]+@example\.com$", false).unwrap();
        assert!(everyday.memory_usage() < 16 * 1024);
        assert_eq!(kib(REGEX_SIZE_LIMIT), "256 KiB");
        assert_eq!(kib(REGEX_SIZE_LIMIT + 1), "257 KiB");
        assert_eq!(kib((1 << 20) + 1), "1.1 MiB");
        assert_eq!(kib(32 << 20), "32 MiB");
    }
}
