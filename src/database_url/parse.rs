//! The one connection-string parser: both forms libpq accepts, read the way libpq
//! reads them (`conninfo_parse` and `conninfo_uri_parse_options`), each parameter with
//! the value libpq sends and where it is written. Masking ([`super::DatabaseUrl`]) and
//! the defaults added to a connection string ([`super::defaults`]) both read it, so
//! they cannot disagree on quoting.

use std::ops::Range;

/// The prefixes that make libpq read a connection string as a URL (case-sensitive).
pub(super) const URL_PREFIXES: [&str; 2] = ["postgresql://", "postgres://"];

/// libpq parameters whose values are shown. Every other value is masked: the
/// secrets (`password`, `sslpassword`, ...) and any name libpq may not know, which is
/// most likely a misspelt `password`.
pub(super) const SHOWN: &[&str] = &[
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

/// A connection parameter: its name, the value libpq reads and where that value is
/// written in the connection string.
pub(super) struct Param {
    pub(super) keyword: String,
    pub(super) value: String,
    pub(super) span: Range<usize>,
}

impl Param {
    pub(super) fn hidden(&self) -> bool {
        !SHOWN.contains(&self.keyword.as_str())
    }
}

/// Why a connection string was rejected: `at` is where the offending part starts;
/// only what comes before it is shown.
pub(super) struct Rejection {
    pub(super) at: usize,
    pub(super) reason: String,
}

pub(super) fn reject<T>(at: usize, reason: impl Into<String>) -> std::result::Result<T, Rejection> {
    Err(Rejection {
        at,
        reason: reason.into(),
    })
}

/// The parameters of `text`, in either form; why it is rejected otherwise.
pub(super) fn params(text: &str) -> std::result::Result<Vec<Param>, Rejection> {
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

/// The length of `scheme://` when `text` is a URL: one of libpq's, or of another
/// scheme (`mysql://...`), which is not key=value pairs either.
pub(super) fn url_prefix(text: &str) -> Option<usize> {
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
pub(super) fn key_value_params(text: &str) -> std::result::Result<Vec<Param>, Rejection> {
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
pub(super) fn stray_at(text: &str, prefix: usize) -> bool {
    let rest = &text[prefix..];
    let designator = rest
        .find(['@', '/'])
        .filter(|&i| rest.as_bytes()[i] == b'@');
    let after = designator.map_or(0, |i| i + 1);
    rest[after..].contains('@')
}

/// Parses a URL as libpq's `conninfo_uri_parse_options` does:
/// `postgres://[user[:password]@][host[:port][,...]][/dbname][?param=value&...]`.
pub(super) fn url_params(text: &str, prefix: usize) -> std::result::Result<Vec<Param>, Rejection> {
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
    // Hosts, each with an optional port, separated by commas: one `host` and one
    // `port` parameter each listing them (as the key=value form writes them), ahead
    // of the query's, which override them as in libpq.
    let authority_start = p;
    let (mut hosts, mut ports) = (Vec::new(), Vec::new());
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
            hosts.push(&text[host_start + 1..close]);
            p = close + 1;
            if !matches!(b.get(p), None | Some(b':' | b'/' | b'?' | b',')) {
                return reject(
                    host_start,
                    "an IPv6 host's `]` must be followed by `:` or `/`",
                );
            }
        } else {
            p = end_of(p, b":/?,");
            hosts.push(&text[host_start..p]);
        }
        let mut port = "";
        if b.get(p) == Some(&b':') {
            let port_start = p + 1;
            p = end_of(port_start, b"/?,");
            port = &text[port_start..p];
            // Not shown: a port that is not one may be part of a password.
            let valid = port.bytes().all(|c| c.is_ascii_digit())
                && port.parse::<u32>().is_ok_and(|n| (1..=65_535).contains(&n));
            if !port.is_empty() && !valid {
                return reject(host_start, "a port must be a number from 1 to 65535");
            }
        }
        ports.push(port);
        if b.get(p) != Some(&b',') {
            break b.get(p).copied();
        }
        p += 1;
    };
    let mut authority = Vec::new();
    let authority_span = authority_start..p;
    for (keyword, parts) in [("host", hosts), ("port", ports)] {
        if parts.iter().all(|part| part.is_empty()) {
            continue;
        }
        let value = parts
            .iter()
            .map(|part| percent_decode(part))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Rejection {
                at: authority_start,
                reason: format!("the {keyword} is not validly percent-encoded (write `%` as %25)"),
            })?;
        authority.push(Param {
            keyword: keyword.to_owned(),
            value: value.join(","),
            span: authority_span.clone(),
        });
    }
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
    params.splice(0..0, authority);
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
