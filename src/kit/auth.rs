//! Bearer-token authentication shared by both services.
//!
//! # The tokens file
//! UTF-8 text, one token per line: `<name> <scopes> <secret>`, separated by
//! spaces or tabs. Blank lines and lines starting with `#` are ignored.
//! - `name`: 1 to 64 characters of ASCII letters, digits, `.`, `_`, `-`; it is
//!   the actor recorded in the audit history and must be unique.
//! - `scopes`: a comma-separated list of `admin` (every FlagAdmin call),
//!   `admin-read` (FlagAdmin reads: Get*, List*, ListHistory, ExportNamespace),
//!   `sync` (the replication stream) and `eval` (FlagEval, every namespace) or
//!   `eval:<namespace>` (FlagEval, that namespace only; repeat for several).
//! - `secret`: at least 16 printable ASCII characters without spaces; sent by
//!   clients as `authorization: Bearer <secret>`.
//!
//! ```text
//! # name     scopes                            secret
//! ops        admin                             3f9c1e7a5b2d4c6e8f0a
//! dashboard  admin-read                        8a7b6c5d4e3f2a1b0c9d
//! replica    sync                              0d1c2b3a4f5e6d7c8b9a
//! web        eval:production,eval:staging      a1b2c3d4e5f6a7b8c9d0
//! ```
//!
//! Secrets are compared in constant time (every byte of every known secret is
//! looked at), so response timing does not reveal how much of a guess matched.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// A permission a token can carry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Every FlagAdmin call.
    Admin,
    /// FlagAdmin reads only.
    AdminRead,
    /// The replication stream.
    Sync,
    /// FlagEval; `None` means every namespace, `Some(ns)` that namespace.
    Eval(Option<String>),
}

/// Who made a call: put into the request extensions by [`Authenticator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's name; the actor in the audit history.
    pub name: String,
    /// What the token may do.
    pub scopes: BTreeSet<Scope>,
}

/// The tokens loaded from a tokens file.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// Each token's secret bytes with the identity it grants.
    entries: Vec<(Vec<u8>, Arc<Identity>)>,
}

/// Why a tokens file could not be loaded; the message names the line.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// The file could not be read.
    #[error("cannot read tokens file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("tokens file line {line}: {reason}")]
    Syntax { line: usize, reason: String },
    /// The file holds no token, which would lock everyone out.
    #[error("tokens file holds no token")]
    Empty,
}

/// A tonic interceptor that authenticates every call: it checks
/// `authorization: Bearer <secret>` against the tokens and puts the matching
/// [`Identity`] into the request extensions. Missing or unknown tokens get
/// UNAUTHENTICATED, are counted in `flagstream_auth_failures_total{reason}`
/// and logged (a warning at most every [`FAILURE_LOG_INTERVAL`], never with the
/// token). Handlers then check scopes with [`require`].
#[derive(Debug, Clone)]
pub struct Authenticator {
    /// `None` in development mode: every call is allowed as [`dev_identity`].
    tokens: Option<Arc<Tokens>>,
    /// [`dev_identity`], made once.
    dev: Arc<Identity>,
    /// Refused calls by reason; clones share it, and [`Authenticator::register`] exports it.
    failures: Family<FailureLabels, Counter>,
    /// When a refusal was last logged, so a client retrying a bad token in a loop does not
    /// flood the log.
    log: Arc<FailureLog>,
}

/// The label of `flagstream_auth_failures_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `missing` (no `authorization`), `malformed` (not `Bearer <token>`) or `unknown_token`.
    pub reason: &'static str,
}

/// Shortest time between two warnings about refused calls; the refusals in between are
/// counted and reported with the next warning.
pub const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The rate limit of the refusal warnings.
#[derive(Debug)]
struct FailureLog {
    /// The clock's origin.
    start: Instant,
    /// Milliseconds after `start` before which no warning is logged.
    next_ms: AtomicU64,
    /// Refusals not logged since the last warning.
    suppressed: AtomicU64,
}

impl Identity {
    /// Whether the identity may call FlagAdmin reads.
    pub fn can_admin_read(&self) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&Scope::AdminRead)
    }

    /// Whether the identity may evaluate flags of `namespace`.
    pub fn can_eval(&self, namespace: &str) -> bool {
        self.scopes.iter().any(|s| match s {
            Scope::Eval(None) => true,
            Scope::Eval(Some(ns)) => ns == namespace,
            _ => false,
        })
    }
}

impl Scope {
    /// Parses one scope as written in the tokens file.
    pub fn parse(s: &str) -> Result<Scope, String> {
        match s {
            "admin" => Ok(Scope::Admin),
            "admin-read" => Ok(Scope::AdminRead),
            "sync" => Ok(Scope::Sync),
            "eval" => Ok(Scope::Eval(None)),
            other => match other.strip_prefix("eval:") {
                Some(ns) if !ns.is_empty() => Ok(Scope::Eval(Some(ns.to_string()))),
                _ => Err(format!(
                    "unknown scope {other:?} (expected admin, admin-read, sync, eval or eval:<namespace>)"
                )),
            },
        }
    }
}

impl Tokens {
    /// Reads and parses a tokens file.
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Tokens::parse(&text)
    }

    /// Parses the tokens file format described in the module documentation.
    pub fn parse(text: &str) -> Result<Tokens, TokensError> {
        let mut entries: Vec<(Vec<u8>, Arc<Identity>)> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let syntax = |reason: String| TokensError::Syntax { line, reason };
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = trimmed.split_whitespace().collect();
            let [name, scopes, secret] = fields[..] else {
                return Err(syntax(format!(
                    "expected `<name> <scopes> <secret>`, found {} fields",
                    fields.len()
                )));
            };
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(syntax(format!(
                    "token name {name:?} must be 1 to 64 of ASCII letters, digits, '.', '_', '-'"
                )));
            }
            if entries.iter().any(|(_, id)| id.name == name) {
                return Err(syntax(format!("token name {name:?} is used twice")));
            }
            if secret.len() < 16 || !secret.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(syntax(format!(
                    "the secret of {name:?} must be at least 16 printable ASCII characters"
                )));
            }
            if entries
                .iter()
                .any(|(s, _)| s.as_slice() == secret.as_bytes())
            {
                return Err(syntax(format!(
                    "the secret of {name:?} is used by another token"
                )));
            }
            let scopes = scopes
                .split(',')
                .map(Scope::parse)
                .collect::<Result<BTreeSet<_>, _>>()
                .map_err(syntax)?;
            entries.push((
                secret.as_bytes().to_vec(),
                Arc::new(Identity {
                    name: name.to_string(),
                    scopes,
                }),
            ));
        }
        if entries.is_empty() {
            return Err(TokensError::Empty);
        }
        Ok(Tokens { entries })
    }

    /// Finds the identity of a secret. Every byte of every known secret is
    /// compared whatever matches, so the time taken does not depend on how
    /// close a guess is.
    pub fn identify(&self, secret: &[u8]) -> Option<Arc<Identity>> {
        let mut found = None;
        for (known, identity) in &self.entries {
            if constant_time_eq(known, secret) {
                found = Some(identity.clone());
            }
        }
        found
    }
}

/// The identity every call gets with `--dev-no-auth`: all scopes.
pub fn dev_identity() -> Identity {
    Identity {
        name: "dev".to_string(),
        scopes: [
            Scope::Admin,
            Scope::AdminRead,
            Scope::Sync,
            Scope::Eval(None),
        ]
        .into_iter()
        .collect(),
    }
}

impl Authenticator {
    /// Checks calls against `tokens`.
    pub fn new(tokens: Tokens) -> Authenticator {
        Authenticator::with_tokens(Some(Arc::new(tokens)))
    }

    /// Lets every call through as [`dev_identity`]; only for `--dev-no-auth`.
    pub fn allow_all() -> Authenticator {
        Authenticator::with_tokens(None)
    }

    fn with_tokens(tokens: Option<Arc<Tokens>>) -> Authenticator {
        Authenticator {
            tokens,
            dev: Arc::new(dev_identity()),
            failures: Family::default(),
            log: Arc::new(FailureLog {
                start: Instant::now(),
                next_ms: AtomicU64::new(0),
                suppressed: AtomicU64::new(0),
            }),
        }
    }

    /// Exports the refusal counts in `registry` as `flagstream_auth_failures_total{reason}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "flagstream_auth_failures",
            "Calls refused UNAUTHENTICATED by the bearer-token check, by reason",
            self.failures.clone(),
        );
    }

    /// Counts and (rate-limited) logs a refusal, then returns its status.
    fn refuse(&self, reason: &'static str, message: &'static str) -> Status {
        self.failures.get_or_create(&FailureLabels { reason }).inc();
        let log = &self.log;
        let now = log.start.elapsed().as_millis() as u64;
        let next = log.next_ms.load(Ordering::Relaxed);
        let interval = FAILURE_LOG_INTERVAL.as_millis() as u64;
        if now >= next
            && log
                .next_ms
                .compare_exchange(next, now + interval, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = log.suppressed.swap(0, Ordering::Relaxed);
            tracing::warn!(
                reason,
                suppressed,
                "refused a call: {message} (later refusals within {}s are only counted)",
                FAILURE_LOG_INTERVAL.as_secs()
            );
        } else {
            log.suppressed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(reason, "refused a call: {message}");
        }
        Status::unauthenticated(message)
    }
}

impl Authenticator {
    /// The identity an `authorization` header value names, for front ends where a token is
    /// optional (flagread's OpenFeature protocols, which serve some namespaces to anyone):
    /// `Ok(None)` without a header, the refusal's message when the header is malformed or names
    /// no token (counted and logged as [`Interceptor::call`] does). With `--dev-no-auth`, every
    /// call is [`dev_identity`].
    pub fn authenticate_optional(
        &self,
        authorization: Option<&[u8]>,
    ) -> Result<Option<Arc<Identity>>, &'static str> {
        let Some(tokens) = &self.tokens else {
            return Ok(Some(self.dev.clone()));
        };
        let Some(header) = authorization else {
            return Ok(None);
        };
        let secret = bearer_secret(header).ok_or_else(|| {
            self.refuse("malformed", MALFORMED);
            MALFORMED
        })?;
        let identity = tokens.identify(secret).ok_or_else(|| {
            self.refuse("unknown_token", UNKNOWN);
            UNKNOWN
        })?;
        Ok(Some(identity))
    }
}

/// The refusal of an `authorization` value that is not `Bearer <token>`.
const MALFORMED: &str = "authorization must be `Bearer <token>`";
/// The refusal of a token no entry of the tokens file has.
const UNKNOWN: &str = "unknown token";

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let identity = match &self.tokens {
            None => self.dev.clone(),
            Some(tokens) => {
                let header = request
                    .metadata()
                    .get("authorization")
                    .ok_or_else(|| self.refuse("missing", "missing authorization metadata"))?;
                let secret = bearer_secret(header.as_bytes())
                    .ok_or_else(|| self.refuse("malformed", MALFORMED))?;
                tokens
                    .identify(secret)
                    .ok_or_else(|| self.refuse("unknown_token", UNKNOWN))?
            }
        };
        request.extensions_mut().insert(identity);
        Ok(request)
    }
}

/// The secret of an `authorization` value `Bearer <secret>`. The scheme is matched without
/// regard to case, as RFC 7235 (section 2.1) has it, so `bearer` and `BEARER` work too.
fn bearer_secret(value: &[u8]) -> Option<&[u8]> {
    let (scheme, secret) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"Bearer ").then_some(secret)
}

/// The caller's identity, as [`Authenticator`] stored it. UNAUTHENTICATED when
/// the service was built without the interceptor.
pub fn identity<T>(request: &Request<T>) -> Result<Arc<Identity>, Status> {
    identity_ref(request).cloned()
}

fn identity_ref<T>(request: &Request<T>) -> Result<&Arc<Identity>, Status> {
    request
        .extensions()
        .get::<Arc<Identity>>()
        .ok_or_else(|| Status::unauthenticated("no identity"))
}

/// The caller's identity if `allowed` accepts it, PERMISSION_DENIED naming
/// `what` otherwise.
pub fn require<T>(
    request: &Request<T>,
    what: impl std::fmt::Display,
    allowed: impl FnOnce(&Identity) -> bool,
) -> Result<Arc<Identity>, Status> {
    check(request, what, allowed).cloned()
}

/// [`require`] for callers that need only the verdict: neither the identity
/// (shared by every call with the same token) nor `what` is copied unless the
/// call is refused.
pub fn check<T>(
    request: &Request<T>,
    what: impl std::fmt::Display,
    allowed: impl FnOnce(&Identity) -> bool,
) -> Result<&Arc<Identity>, Status> {
    let identity = identity_ref(request)?;
    if allowed(identity) {
        Ok(identity)
    } else {
        // Counted by `flagstream_grpc_requests_total{code="PERMISSION_DENIED"}`.
        tracing::debug!(token = %identity.name, "refused a call: the token may not {what}");
        Err(Status::permission_denied(format!(
            "token {:?} may not {what}",
            identity.name
        )))
    }
}

/// Compares two byte strings without an early exit on the first difference.
/// The length is not secret (all secrets are at least 16 bytes), so unequal
/// lengths still walk the known secret before answering.
fn constant_time_eq(known: &[u8], given: &[u8]) -> bool {
    let mut diff = (known.len() ^ given.len()) as u8 | u8::from(known.len() != given.len());
    for (i, k) in known.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(0);
        diff |= k ^ g;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(file: &str, secret: &str, expected: Result<Option<&str>, &str>) {
        match (Tokens::parse(file), expected) {
            (Ok(tokens), Ok(name)) => {
                let got = tokens.identify(secret.as_bytes()).map(|id| id.name.clone());
                assert_eq!(got.as_deref(), name, "file {file:?}, secret {secret:?}");
            }
            (Err(err), Err(msg)) => {
                assert!(err.to_string().contains(msg), "{err} should contain {msg}")
            }
            (got, want) => panic!("file {file:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn tokens_file() {
        let good = "# comment\n\nops admin 0123456789abcdef\nweb eval:prod,eval:staging fedcba9876543210\n";
        check(good, "0123456789abcdef", Ok(Some("ops")));
        check(good, "fedcba9876543210", Ok(Some("web")));
        check(good, "0123456789abcdeX", Ok(None));
        check(good, "0123456789abcdef0", Ok(None));
        check(good, "", Ok(None));
        check("", "x", Err("no token"));
        check("ops admin", "x", Err("line 1: expected"));
        check(
            "ops root 0123456789abcdef",
            "x",
            Err("unknown scope \"root\""),
        );
        check("ops admin short", "x", Err("at least 16"));
        check("o/ps admin 0123456789abcdef", "x", Err("token name"));
        check(
            "a admin 0123456789abcdef\na sync 0123456789abcdeX",
            "x",
            Err("line 2: token name \"a\" is used twice"),
        );
        check(
            "a admin 0123456789abcdef\nb sync 0123456789abcdef",
            "x",
            Err("used by another"),
        );
    }

    #[test]
    fn bearer_scheme_in_any_case() {
        let cases: [(&[u8], Option<&[u8]>); 7] = [
            (b"Bearer 0123456789abcdef", Some(b"0123456789abcdef")),
            (b"bearer 0123456789abcdef", Some(b"0123456789abcdef")),
            (b"BEARER 0123456789abcdef", Some(b"0123456789abcdef")),
            (b"Bearer ", Some(b"")),
            (b"Bearer", None),
            (b"Bearer0123456789abcdef", None),
            (b"Basic 0123456789abcdef", None),
        ];
        for (value, want) in cases {
            assert_eq!(
                bearer_secret(value),
                want,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn eval_scopes() {
        let tokens =
            Tokens::parse("web eval:prod 0123456789abcdef\nall eval 0123456789abcdeg").unwrap();
        let web = tokens.identify(b"0123456789abcdef").unwrap();
        assert!(web.can_eval("prod") && !web.can_eval("dev") && !web.can_admin_read());
        let all = tokens.identify(b"0123456789abcdeg").unwrap();
        assert!(all.can_eval("prod") && all.can_eval("dev"));
    }
}
