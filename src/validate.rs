//! Write-time rules, run on the model before anything is stored: key syntax,
//! operands that must parse, references to variants, segments and other
//! flags, and the documented size limits. Every failure is a `FieldError`
//! naming the field path, so admins see exactly what to fix.

pub use crate::convert::FieldError;

// ---------------------------------------------------------------------------
// Limits. Each matches the comment on its field in `proto/flagstream/v1/`.

/// Largest encoded gRPC request either server accepts, in bytes (4 MiB).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Longest namespace key, in characters (all ASCII).
pub const MAX_NAMESPACE_KEY_LEN: usize = 63;
/// Longest flag or segment key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 256;
/// Longest namespace or variant description, in bytes.
pub const MAX_SHORT_DESCRIPTION_BYTES: usize = 1024;
/// Longest flag or segment description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 4096;
/// Most variants per flag.
pub const MAX_VARIANTS: usize = 100;
/// Longest variant name, in bytes.
pub const MAX_VARIANT_NAME_BYTES: usize = 256;
/// Longest STRING flag value, in bytes (64 KiB).
pub const MAX_STRING_VALUE_BYTES: usize = 64 * 1024;
/// Deepest JSON value: objects and arrays nested at most this many levels.
pub const MAX_JSON_DEPTH: usize = 32;
/// Most rules per flag.
pub const MAX_RULES: usize = 200;
/// Longest rule name, in bytes.
pub const MAX_RULE_NAME_BYTES: usize = 128;
/// Most constraints per rule or segment.
pub const MAX_CONSTRAINTS: usize = 100;
/// Most values per constraint or override.
pub const MAX_VALUES: usize = 1000;
/// Longest constraint or override value, in bytes.
pub const MAX_VALUE_BYTES: usize = 4096;
/// Most segment references per rule.
pub const MAX_RULE_SEGMENTS: usize = 20;
/// Most prerequisites per flag.
pub const MAX_PREREQUISITES: usize = 20;
/// Most tags per flag.
pub const MAX_TAGS: usize = 32;
/// Longest tag, in bytes (tags are 1 to this many bytes).
pub const MAX_TAG_BYTES: usize = 64;
/// Most metadata entries per flag.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY_BYTES: usize = 128;
/// Longest metadata value, in bytes.
pub const MAX_METADATA_VALUE_BYTES: usize = 1024;
/// Largest rollout percentage.
pub const MAX_PERCENTAGE: u32 = 100;
/// Largest sum of the weights of one split (Unleash's are out of 1,000).
pub const MAX_TOTAL_WEIGHT: u64 = 1_000_000;
/// Longest write comment (`WriteOptions.comment`), in bytes.
pub const MAX_COMMENT_BYTES: usize = 1024;

/// Most free properties in an evaluation context.
pub const MAX_CONTEXT_PROPERTIES: usize = 64;
/// Longest context property key, in bytes.
pub const MAX_CONTEXT_KEY_BYTES: usize = 256;
/// Longest context field or property value, in bytes.
pub const MAX_CONTEXT_VALUE_BYTES: usize = 4096;
/// Most flag keys in one `EvaluateBatch` call.
pub const MAX_BATCH_KEYS: usize = 1000;
