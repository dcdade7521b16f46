//! JSONB straight between the wire and the caller's type.
//!
//! PostgreSQL's binary `jsonb` is a version byte (1) followed by JSON text. Going
//! through `serde_json::Value` costs a tree of allocations on every read and a second
//! serialisation on every write; these two wrappers skip it: [`JsonbOut`] serialises
//! the caller's value once into the bytes sent, [`JsonbIn`] deserialises the bytes
//! received directly into the target type.

use std::io::Write;

use diesel::deserialize::{self, FromSql, Queryable};
use diesel::expression::AsExpression;
use diesel::pg::{Pg, PgValue};
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::Jsonb;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// The only binary `jsonb` format PostgreSQL has defined so far.
const JSONB_VERSION: u8 = 1;

/// A value serialised once, ready to bind as `jsonb`: the JSON text, checked to be
/// storable.
#[derive(Debug, Clone, AsExpression)]
#[diesel(sql_type = Jsonb)]
pub(crate) struct JsonbOut(Vec<u8>);

impl JsonbOut {
    /// Serialises `value`, rejecting what PostgreSQL's `jsonb` cannot hold (NUL).
    pub(crate) fn new<V: Serialize + ?Sized>(what: &'static str, value: &V) -> Result<Self> {
        let mut text = Vec::with_capacity(128);
        serde_json::to_writer(&mut text, value)?;
        check_no_nul_escape(what, &text)?;
        Ok(JsonbOut(text))
    }

    /// Length of the JSON text in bytes.
    pub(crate) fn byte_len(&self) -> usize {
        self.0.len()
    }

    /// The JSON text.
    pub(crate) fn text(&self) -> &[u8] {
        &self.0
    }
}

impl ToSql<Jsonb, Pg> for JsonbOut {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        out.write_all(&[JSONB_VERSION])?;
        out.write_all(&self.0)?;
        Ok(IsNull::No)
    }
}

/// PostgreSQL rejects `\u0000` anywhere in `jsonb`. serde_json writes a NUL (in a
/// string or an object key) as exactly that escape and never raw, and writes a
/// literal backslash as `\\`, so walking escape by escape finds every NUL and nothing
/// else (`\\u0000` is a backslash followed by the text `u0000`).
fn check_no_nul_escape(what: &'static str, text: &[u8]) -> Result<()> {
    let mut i = 0;
    while let Some(offset) = text[i..].iter().position(|&b| b == b'\\') {
        let at = i + offset;
        if text[at + 1..].starts_with(b"u0000") {
            return Err(Error::invalid(
                what,
                "contains a NUL character (\\u0000), which PostgreSQL cannot store in JSONB",
            ));
        }
        // Skip the backslash and the character it escapes.
        i = at + 2;
        if i >= text.len() {
            break;
        }
    }
    Ok(())
}

/// A `jsonb` column decoded directly into `V`.
#[derive(Debug)]
pub(crate) struct JsonbIn<V>(pub(crate) V);

impl<V: DeserializeOwned> FromSql<Jsonb, Pg> for JsonbIn<V> {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        match value.as_bytes().split_first() {
            Some((&JSONB_VERSION, text)) => Ok(JsonbIn(serde_json::from_slice(text)?)),
            Some((version, _)) => Err(format!("unsupported jsonb version {version}").into()),
            None => Err("empty jsonb value".into()),
        }
    }
}

impl<V: DeserializeOwned> Queryable<Jsonb, Pg> for JsonbIn<V> {
    type Row = Self;

    fn build(row: Self) -> deserialize::Result<Self> {
        Ok(row)
    }
}

/// The raw JSON text of a `jsonb` column, for results decoded later (e.g. once per
/// requested key of a batch).
#[derive(Debug)]
pub(crate) struct JsonbText(pub(crate) Vec<u8>);

impl FromSql<Jsonb, Pg> for JsonbText {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        match value.as_bytes().split_first() {
            Some((&JSONB_VERSION, text)) => Ok(JsonbText(text.to_vec())),
            Some((version, _)) => Err(format!("unsupported jsonb version {version}").into()),
            None => Err("empty jsonb value".into()),
        }
    }
}

impl Queryable<Jsonb, Pg> for JsonbText {
    type Row = Self;

    fn build(row: Self) -> deserialize::Result<Self> {
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::JsonbOut;
    use serde_json::json;

    fn storable(value: &serde_json::Value) -> bool {
        JsonbOut::new("value", value).is_ok()
    }

    #[test]
    fn nul_in_a_string_or_key_is_rejected() {
        assert!(!storable(&json!("a\u{0}b")));
        assert!(!storable(&json!({"k\u{0}": 1})));
        assert!(!storable(&json!([1, {"x": ["\u{0}"]}])));
    }

    #[test]
    fn escaped_backslashes_are_not_mistaken_for_nul() {
        // The text `\u0000` (backslash, u, 0000) is storable; so is `\\`, a quote and
        // a trailing backslash.
        assert!(storable(&json!("\\u0000")));
        assert!(storable(&json!("\\\\u0000\\")));
        assert!(storable(&json!({"\\u0000": "\"\\"})));
        // ... but a NUL right after an escaped backslash is still found.
        assert!(!storable(&json!("\\\u{0}")));
    }
}
