//! [`DatabaseUrl`]: a connection string in either form libpq accepts, parsed the way
//! libpq parses it so that its password can be masked exactly, and never shown.

use std::fmt;
use std::ops::Range;

use crate::error::{Error, Result};

/// What replaces a hidden value.
const MASK: &str = "***";

/// The prefixes that make libpq read a connection string as a URL (case-sensitive).
const URL_PREFIXES: [&str; 2] = ["postgresql://", "postgres://"];

/// libpq parameters whose values are shown. Every other value is masked: the
/// secrets (`password`, `sslpassword`, ...) and any name libpq may not know, which is
/// most likely a misspelt `password`.
const SHOWN: &[&str] = &[
    "application_name",
    "channel_binding",
    "client_encoding",
    "connect_timeout",
    "dbname",
    "fallback_application_name",
    "gssdelegation",
    "gssencmode",
    "gsslib",
    "host",
    "hostaddr",
    "keepalives",
    "keepalives_count",
    "keepalives_idle",
    "keepalives_interval",
    "krbsrvname",
    "load_balance_hosts",
    "max_protocol_version",
    "min_protocol_version",
    "options",
    "passfile",
    "port",
    "replication",
    "require_auth",
    "requirepeer",
    "service",
    "ssl",
    "ssl_max_protocol_version",
    "ssl_min_protocol_version",
    "sslcert",
    "sslcertmode",
    "sslcompression",
    "sslcrl",
    "sslcrldir",
    "sslkey",
    "sslmode",
    "sslnegotiation",
    "sslrootcert",
    "sslsni",
    "target_session_attrs",
    "tcp_user_timeout",
    "user",
];

/// libpq parameters holding secrets, named in errors (other unknown names are not,
/// in case they are a password typed where a name was expected).
const SECRET: &[&str] = &[
    "password",
    "sslpassword",
    "oauth_client_secret",
    "scram_client_key",
    "scram_server_key",
];

/// A PostgreSQL connection string whose password never appears in `Debug` or
/// `Display`.
///
/// Both forms libpq accepts are: a URL (`postgres://user:password@host:5432/db?
/// sslmode=require`, components percent-encoded) and `key=value` pairs separated by
/// spaces (`host=db user=app password='a b'`, values single-quoted when they hold
/// spaces, `\` escaping the next character). The string is parsed as libpq parses
/// it, so the password that is masked is exactly the one libpq would send. Masked:
/// `password`, `sslpassword` and every parameter not known to be harmless (a
/// misspelt `password` included).
///
/// A URL whose user name or password holds an unencoded `@` (or a `/` before its
/// `@`) is rejected: libpq would end the password at the first `@` and take the
/// rest of it for a host name, which its errors then print. Percent-encode them
/// (`%40`, `%2F`); `@` may appear once, ending the user name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    text: String,
    /// Where `text` holds a hidden value, in order.
    hidden: Vec<Range<usize>>,
    /// The hidden values, as written and as libpq reads them (unquoted, decoded),
    /// longest first, for scrubbing them out of libpq's messages.
    secrets: Vec<String>,
}

/// A connection parameter: its name, the value libpq reads and where that value is
/// written in the connection string.
struct Param {
    keyword: String,
    value: String,
    span: Range<usize>,
}

impl Param {
    fn hidden(&self) -> bool {
        !SHOWN.contains(&self.keyword.as_str())
    }
}

/// Why a connection string was rejected: `at` is where the offending part starts;
/// only what comes before it is shown.
struct Rejection {
    at: usize,
    reason: String,
}

fn reject<T>(at: usize, reason: impl Into<String>) -> std::result::Result<T, Rejection> {
    Err(Rejection {
        at,
        reason: reason.into(),
    })
}

impl DatabaseUrl {
    /// Parses a connection string: a `postgres://` or `postgresql://` URL, or
    /// libpq's `key=value` pairs.
    ///
    /// # Errors
    /// [`Error::Config`] naming `DATABASE_URL` and what is wrong, showing the string
    /// only up to the problem, with its passwords masked: for an empty string, a URL
    /// of another scheme, a `key=value` syntax error, a URL with an unencoded `@` or
    /// `/` in its user name or password, a bad percent-encoding, an unclosed `[` of
    /// an IPv6 host, a port that is not a number from 1 to 65535.
    pub fn parse(text: &str) -> Result<Self> {
        let params = Self::params(text).map_err(|Rejection { at, reason }| {
            Error::config("DATABASE_URL", shown_until(text, at), reason)
        })?;
        let hidden = hidden_spans(&params);
        let mut secrets: Vec<String> = params
            .into_iter()
            .filter(Param::hidden)
            .flat_map(|p| [p.value, text[p.span].to_owned()])
            .filter(|s| !s.is_empty())
            .collect();
        // Longest first, so that a secret containing another is masked whole.
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Ok(DatabaseUrl {
            text: text.to_owned(),
            hidden,
            secrets,
        })
    }

    fn params(text: &str) -> std::result::Result<Vec<Param>, Rejection> {
        if text.trim().is_empty() {
            return reject(0, "empty: expected a postgres:// URL or key=value pairs");
        }
        if text.contains('\0') {
            // Shown from the start: a NUL may sit inside a quoted password.
            return reject(0, "contains a NUL character");
        }
        match url_prefix(text) {
            Some(prefix) if URL_PREFIXES.contains(&&text[..prefix]) => url_params(text, prefix),
            // Shown whole, its password masked.
            Some(_) => reject(
                text.len(),
                "the scheme must be postgres:// or postgresql://",
            ),
            None => key_value_params(text),
        }
    }

    /// The full connection string, password included, for opening connections.
    /// Never log it.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The connection string with its password (and every value not known to be
    /// harmless) replaced by `***`, safe to print.
    pub fn redacted(&self) -> String {
        masked(&self.text, &self.hidden)
    }

    /// `message` with every hidden value of this connection string replaced by
    /// `***`: libpq echoes parts of the connection string in its errors (a host
    /// name, a whole URL it cannot parse). A very short password may mask innocent
    /// characters too; that is the price of never printing it.
    pub(crate) fn scrub(&self, message: &str) -> String {
        self.secrets.iter().fold(message.to_owned(), |m, secret| {
            m.replace(secret.as_str(), MASK)
        })
    }
}

/// Where the values that are not shown are written.
fn hidden_spans(params: &[Param]) -> Vec<Range<usize>> {
    params
        .iter()
        .filter(|p| p.hidden())
        .map(|p| p.span.clone())
        .collect()
}

/// `text` with the `hidden` ranges (in order) replaced by `***`.
fn masked(text: &str, hidden: &[Range<usize>]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    for span in hidden {
        out.push_str(&text[from..span.start]);
        out.push_str(MASK);
        from = span.end;
    }
    out.push_str(&text[from..]);
    out
}

/// What an error may show of a rejected `text`: the part before `at`, its hidden
/// values masked. When the string holds an `@` that libpq would not read as the end
/// of the user name and password, nothing after the scheme is shown: the password's
/// extent is then unknown.
fn shown_until(text: &str, at: usize) -> String {
    let head = &text[..at];
    let params = match url_prefix(text) {
        Some(prefix) if at < prefix => return "…".to_owned(),
        Some(prefix) => match url_params(head, prefix) {
            Ok(params) if !stray_at(text, prefix) => params,
            _ => return format!("{}…", &text[..prefix]),
        },
        None => key_value_params(head).unwrap_or_default(),
    };
    let shown = masked(head, &hidden_spans(&params));
    if at < text.len() {
        format!("{shown}…")
    } else {
        shown
    }
}

/// The length of `scheme://` when `text` is a URL: one of libpq's, or of another
/// scheme (`mysql://...`), which is not key=value pairs either.
fn url_prefix(text: &str) -> Option<usize> {
    let scheme = text.find("://")?;
    let plausible = !text[..scheme].is_empty()
        && text[..scheme]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    plausible.then_some(scheme + 3)
}

/// libpq's `isspace` in the C locale.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// A parameter name fit for an error message: only known names are shown, since an
/// unknown one may be half of a password.
fn name(keyword: &str) -> Option<String> {
    (SHOWN.contains(&keyword) || SECRET.contains(&keyword)).then(|| format!("`{keyword}`"))
}

/// Parses `key=value` pairs as libpq's `conninfo_parse` does: blanks around `=` are
/// allowed, a value is either unquoted (up to the next blank) or single-quoted,
/// and `\` takes the next character literally in both.
fn key_value_params(text: &str) -> std::result::Result<Vec<Param>, Rejection> {
    let b = text.as_bytes();
    let skip_blanks = |mut i: usize| {
        while i < b.len() && is_space(b[i]) {
            i += 1;
        }
        i
    };
    let mut params = Vec::new();
    let mut i = skip_blanks(0);
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i] != b'=' && !is_space(b[i]) {
            i += 1;
        }
        let keyword = &text[start..i];
        i = skip_blanks(i);
        if b.get(i) != Some(&b'=') {
            let word = name(keyword).unwrap_or_else(|| "a word".to_owned());
            return reject(
                start,
                format!(
                    "expected a postgres:// URL or key=value pairs: {word} has no `=` after it"
                ),
            );
        }
        if keyword.is_empty() {
            return reject(
                start,
                "expected key=value pairs: a `=` has no name before it",
            );
        }
        i = skip_blanks(i + 1);
        let value_start = i;
        let mut value = Vec::new();
        let quoted = b.get(i) == Some(&b'\'');
        if quoted {
            i += 1;
        }
        loop {
            match b.get(i) {
                None if quoted => {
                    return reject(
                        start,
                        format!(
                            "the quoted value of {} has no closing `'`",
                            name(keyword).unwrap_or_else(|| "a parameter".to_owned())
                        ),
                    )
                }
                None => break,
                Some(&c) if !quoted && is_space(c) => break,
                Some(b'\'') if quoted => {
                    i += 1;
                    break;
                }
                Some(b'\\') => {
                    if let Some(&next) = b.get(i + 1) {
                        value.push(next);
                    }
                    i = (i + 2).min(b.len());
                }
                Some(&c) => {
                    value.push(c);
                    i += 1;
                }
            }
        }
        params.push(Param {
            keyword: keyword.to_owned(),
            // Only backslashes were dropped, so the bytes are still UTF-8.
            value: String::from_utf8_lossy(&value).into_owned(),
            span: value_start..i,
        });
        i = skip_blanks(i);
    }
    Ok(params)
}

/// True when an `@` follows the one that ends the user name and password (or, with
/// none, any `@` after the scheme): libpq ends the password at the first `@` met
/// before a `/`, so a second one means the password (or user name) held an
/// unencoded `@` or `/`, and libpq would read the rest as a host name.
fn stray_at(text: &str, prefix: usize) -> bool {
    let rest = &text[prefix..];
    let designator = rest
        .find(['@', '/'])
        .filter(|&i| rest.as_bytes()[i] == b'@');
    let after = designator.map_or(0, |i| i + 1);
    rest[after..].contains('@')
}

/// Parses a URL as libpq's `conninfo_uri_parse_options` does:
/// `postgres://[user[:password]@][host[:port][,...]][/dbname][?param=value&...]`.
fn url_params(text: &str, prefix: usize) -> std::result::Result<Vec<Param>, Rejection> {
    if stray_at(text, prefix) {
        return reject(
            prefix,
            "an unencoded `@` after the one ending the password: a password or user name \
             containing `@` or `/` must percent-encode it (%40, %2F), or libpq takes part \
             of it for the host name",
        );
    }
    let b = text.as_bytes();
    let end_of = |from: usize, stops: &[u8]| {
        (from..b.len())
            .find(|&i| stops.contains(&b[i]))
            .unwrap_or(b.len())
    };
    let mut params = Vec::new();
    let mut push = |keyword: &str, span: Range<usize>| {
        if span.is_empty() {
            return Ok(());
        }
        let value = percent_decode(&text[span.clone()]).ok_or_else(|| Rejection {
            at: span.start,
            reason: format!(
                "the {} is not validly percent-encoded (write `%` as %25)",
                keyword
            ),
        })?;
        params.push(Param {
            keyword: keyword.to_owned(),
            value,
            span,
        });
        Ok(())
    };
    let mut p = prefix;
    let designator = end_of(prefix, b"@/");
    if b.get(designator) == Some(&b'@') {
        match text[prefix..designator].find(':') {
            Some(colon) => {
                push("user", prefix..prefix + colon)?;
                push("password", prefix + colon + 1..designator)?;
            }
            None => push("user", prefix..designator)?,
        }
        p = designator + 1;
    }
    // Hosts, each with an optional port, separated by commas.
    let terminator = loop {
        let host_start = p;
        if b.get(p) == Some(&b'[') {
            let close = end_of(p, b"]");
            if close == b.len() {
                return reject(host_start, "an IPv6 host has no closing `]`");
            }
            if close == p + 1 {
                return reject(host_start, "an IPv6 host is empty");
            }
            p = close + 1;
            if !matches!(b.get(p), None | Some(b':' | b'/' | b'?' | b',')) {
                return reject(
                    host_start,
                    "an IPv6 host's `]` must be followed by `:` or `/`",
                );
            }
        } else {
            p = end_of(p, b":/?,");
        }
        if b.get(p) == Some(&b':') {
            let port_start = p + 1;
            p = end_of(port_start, b"/?,");
            let port = &text[port_start..p];
            // Not shown: a port that is not one may be part of a password.
            let valid = port.bytes().all(|c| c.is_ascii_digit())
                && port.parse::<u32>().is_ok_and(|n| (1..=65_535).contains(&n));
            if !port.is_empty() && !valid {
                return reject(host_start, "a port must be a number from 1 to 65535");
            }
        }
        if b.get(p) != Some(&b',') {
            break b.get(p).copied();
        }
        p += 1;
    };
    if terminator == Some(b'/') {
        let dbname = p + 1;
        p = end_of(dbname, b"?");
        push("dbname", dbname..p)?;
    }
    if p < b.len() {
        // `?param=value&...`
        p += 1;
        while p < b.len() {
            let end = end_of(p, b"&");
            let pair = &text[p..end];
            let Some(eq) = pair.find('=') else {
                return reject(p, "a query parameter has no `=`");
            };
            let keyword = percent_decode(&pair[..eq]).ok_or_else(|| Rejection {
                at: p,
                reason: "a query parameter name is not validly percent-encoded".to_owned(),
            })?;
            if pair[eq + 1..].contains('=') {
                return reject(
                    p,
                    format!(
                        "the value of {} holds a `=`: percent-encode it (%3D)",
                        name(&keyword).unwrap_or_else(|| "a query parameter".to_owned())
                    ),
                );
            }
            push(&keyword, p + eq + 1..end)?;
            p = if end < b.len() { end + 1 } else { end };
        }
    }
    Ok(params)
}

/// Decodes `%XX` sequences as libpq does: a `%` must start two hex digits, and
/// `%00` is forbidden. `None` when the encoding is invalid.
fn percent_decode(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))?;
            out.push(u8::from_str_radix(hex, 16).ok().filter(|&c| c != 0)?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DatabaseUrl")
            .field(&self.redacted())
            .finish()
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// As [`DatabaseUrl::parse`].
impl std::str::FromStr for DatabaseUrl {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        DatabaseUrl::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::DatabaseUrl;

    fn shown(text: &str) -> String {
        DatabaseUrl::parse(text).unwrap().to_string()
    }

    fn rejected(text: &str) -> String {
        DatabaseUrl::parse(text).unwrap_err().to_string()
    }

    fn secrets(text: &str) -> Vec<String> {
        DatabaseUrl::parse(text).unwrap().secrets
    }

    #[test]
    fn url_passwords_are_masked_in_the_user_info_and_the_query() {
        assert_eq!(
            shown("postgres://app:s3cr3t@db:5432/app?sslmode=require&password=Qu3ry"),
            "postgres://app:***@db:5432/app?sslmode=require&password=***"
        );
        assert_eq!(shown("postgresql://app@db/app"), "postgresql://app@db/app");
        assert_eq!(
            shown("postgres://app:%41b%25@db/app"),
            "postgres://app:***@db/app"
        );
        assert_eq!(
            secrets("postgres://app:%41b%25@db/app"),
            vec!["%41b%25".to_owned(), "Ab%".to_owned()]
        );
        // libpq ends the password at the `@`, not at `?` or `#`.
        assert_eq!(
            shown("postgres://u:p?x#y@db/app"),
            "postgres://u:***@db/app"
        );
    }

    #[test]
    fn key_value_passwords_are_masked_quoted_or_not() {
        assert_eq!(
            shown("host=db user=app password=s3cr3t dbname=app"),
            "host=db user=app password=*** dbname=app"
        );
        assert_eq!(
            shown("host = db password = 'a b\\'c' sslpassword=x"),
            "host = db password = *** sslpassword=***"
        );
        assert_eq!(secrets("password='a b\\'c'"), vec!["'a b\\'c'", "a b'c"]);
        // Backslashes escape in unquoted values too; a quoted value needs no blank
        // after it.
        assert_eq!(secrets("password=a\\ b"), vec!["a\\ b", "a b"]);
        assert_eq!(shown("password='x'host=db"), "password=***host=db");
    }

    #[test]
    fn unknown_parameters_are_masked_as_they_may_be_misspelt_passwords() {
        assert_eq!(shown("host=db passwrod=s3cr3t"), "host=db passwrod=***");
        assert_eq!(
            shown("postgres://db/app?passwd=s3cr3t"),
            "postgres://db/app?passwd=***"
        );
    }

    #[test]
    fn an_unencoded_at_or_slash_in_the_password_is_rejected_without_showing_it() {
        for text in [
            "postgres://u:p@ss#SECRET@host/db",
            "postgres://u:p@ssSECRET@host/db",
            "postgres://u:a/SECRET@host/db",
            "postgres://u:SECRET@host/db?user=x@y",
        ] {
            let message = rejected(text);
            assert!(message.contains("percent-encode"), "{message}");
            assert!(
                !message.contains("SECRET") && !message.contains("@ss"),
                "{message}"
            );
        }
        assert_eq!(
            shown("postgres://u%40corp:p%40ss@host/db"),
            "postgres://u%40corp:***@host/db"
        );
    }

    #[test]
    fn malformed_strings_are_rejected_showing_only_what_precedes_the_problem() {
        // The secret is Zq9 and Xw7, or both halves of one password.
        for (text, reason) in [
            ("", "empty"),
            ("   ", "empty"),
            ("mysql://u:Zq9@db/app", "scheme"),
            ("POSTGRES://u:Zq9@db/app", "scheme"),
            ("host=db Zq9", "has no `=`"),
            ("host=db password='Zq9", "no closing"),
            ("=Zq9", "no name"),
            ("postgres://u:Zq9@[::1/app", "IPv6"),
            ("postgres://u:Zq9@db:99999/app", "port"),
            ("postgres://u:Zq9@db:x/app", "port"),
            ("postgres://u:Zq9%zzXw7@db/app", "percent-encoded"),
            ("postgres://u:Zq9%00Xw7@db/app", "percent-encoded"),
            ("postgres://db/app?password=Zq9&Xw7", "no `=`"),
            ("postgres://db/app?password=Zq9=Xw7", "%3D"),
            ("host=db password='Zq9\0Xw7'", "NUL"),
            ("postgres://u:Zq9\0Xw7@db/app", "NUL"),
        ] {
            let message = rejected(text);
            assert!(message.contains(reason), "{text}: {message}");
            assert!(message.contains("DATABASE_URL"), "{message}");
            assert!(
                !message.contains("Zq9") && !message.contains("Xw7"),
                "{text}: {message}"
            );
        }
        assert!(rejected("host=db oops").contains("`host=db …`"));
        assert!(rejected("postgres://u:pw@db:0/app").contains("`postgres://u:***@…`"));
    }

    #[test]
    fn the_scrub_removes_every_form_of_a_hidden_value() {
        let url = DatabaseUrl::parse("host=h password='p w%' sslpassword=k3y").unwrap();
        assert_eq!(
            url.scrub("could not use \"p w%\", 'p w%' or k3y"),
            "could not use \"***\", *** or ***"
        );
    }
}
