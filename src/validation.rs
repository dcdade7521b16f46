//! Validation: the checks applied to every key and value before a connection is
//! taken, so bad input fails with an error that names it and nothing is stored.
//! (TTLs are checked in [`crate::expiry`].)

use crate::error::{Error, Result};

/// Longest key/value key accepted, in bytes (UTF-8). Keys are indexed as they are, so
/// they must stay well under PostgreSQL's btree row limit.
pub const MAX_KEY_BYTES: usize = 1024;

/// Most components an embedding may have.
pub const MAX_EMBEDDING_DIMENSIONS: usize = 65_536;

/// Checks a key/value key: not empty, at most [`MAX_KEY_BYTES`], no NUL character.
pub(crate) fn check_key(key: &str) -> Result<()> {
    check_bounded("key", key, MAX_KEY_BYTES)
}

/// Checks a text that names something (`what`: a key, a tag): not empty, at most
/// `max` bytes, no NUL character.
pub(crate) fn check_bounded(what: &'static str, text: &str, max: usize) -> Result<()> {
    if text.is_empty() {
        return Err(Error::invalid(what, format!("a {what} must not be empty")));
    }
    if text.len() > max {
        return Err(Error::invalid(
            what,
            format!(
                "a {what} is at most {max} bytes, this one has {} (starts with {:?})",
                text.len(),
                preview(text)
            ),
        ));
    }
    check_text(what, text)
}

/// PostgreSQL cannot store NUL in `text`: reject it rather than failing half way.
pub(crate) fn check_text(what: &'static str, text: &str) -> Result<()> {
    match text.find('\0') {
        Some(at) => Err(Error::invalid(
            what,
            format!("contains a NUL character at byte {at}, which PostgreSQL cannot store"),
        )),
        None => Ok(()),
    }
}

/// PostgreSQL rejects `\u0000` anywhere in JSONB, in keys as in strings.
pub(crate) fn check_json(what: &'static str, value: &serde_json::Value) -> Result<()> {
    use serde_json::Value;
    match value {
        Value::String(s) => check_text(what, s),
        Value::Array(items) => items.iter().try_for_each(|v| check_json(what, v)),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            check_text(what, k)?;
            check_json(what, v)
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

/// An embedding must have 1 to [`MAX_EMBEDDING_DIMENSIONS`] finite components.
pub(crate) fn check_embedding(embedding: &[f32]) -> Result<()> {
    if embedding.is_empty() {
        return Err(Error::invalid(
            "embedding",
            "an embedding must not be empty",
        ));
    }
    if embedding.len() > MAX_EMBEDDING_DIMENSIONS {
        return Err(Error::invalid(
            "embedding",
            format!(
                "an embedding has at most {MAX_EMBEDDING_DIMENSIONS} dimensions, this one has {}",
                embedding.len()
            ),
        ));
    }
    match embedding.iter().position(|c| !c.is_finite()) {
        Some(i) => Err(Error::invalid(
            "embedding",
            format!(
                "component {i} is {}, only finite numbers can be cached",
                embedding[i]
            ),
        )),
        None => Ok(()),
    }
}

fn preview(text: &str) -> &str {
    let mut end = text.len().min(32);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
