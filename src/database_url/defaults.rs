//! Client-side timeouts added to the libpq connection string the pool connects with.
//!
//! libpq waits without limit by default: for a server that accepts the TCP connection
//! but never answers the start-up, and for a peer that vanished from the network.
//! pgcache adds limits for both, except where the user's connection string already
//! chooses its own. The string may hold a password: nothing here logs or prints it.

use std::time::Duration;

/// libpq's smallest `connect_timeout` in seconds: it reads 1 as 2.
const MIN_CONNECT_TIMEOUT_SECS: u128 = 2;

/// Idle seconds before the first keepalive probe, seconds between probes and probes
/// lost before the connection counts as dead: a dead network path under an idle
/// pooled connection is noticed within 25 s, before the next checkout usually.
const KEEPALIVES: [(&str, &str); 4] = [
    ("keepalives", "1"),
    ("keepalives_idle", "10"),
    ("keepalives_interval", "5"),
    ("keepalives_count", "3"),
];

/// The parameters pgcache sets on every connection:
/// - `connect_timeout`: the pool's connection timeout rounded up to whole seconds
///   (at least libpq's 2): a connection attempt nobody waits for any more must not
///   hold one of the pool's connector threads for ever;
/// - `keepalives*` (see [`KEEPALIVES`]);
/// - `tcp_user_timeout` = `no_answer_limit`: data the peer's kernel has not
///   acknowledged by then means the network path is dead, and the kernel drops the
///   connection (Linux; ignored elsewhere and on Unix-domain sockets).
pub(crate) fn client_timeouts(
    connection_timeout: Duration,
    no_answer_limit: Duration,
) -> Vec<(&'static str, String)> {
    let connect_secs = connection_timeout
        .as_millis()
        .div_ceil(1000)
        .max(MIN_CONNECT_TIMEOUT_SECS);
    let mut params = vec![("connect_timeout", connect_secs.to_string())];
    params.extend(KEEPALIVES.map(|(key, value)| (key, value.to_owned())));
    params.push(("tcp_user_timeout", no_answer_limit.as_millis().to_string()));
    params
}

/// `conninfo` with each of `params` appended unless it already sets that key. Both
/// libpq forms are understood, through the same parser as [`super::DatabaseUrl`]: a
/// URL (`postgres://…?key=value&…`) and `key=value` pairs separated by spaces. A
/// string the parser rejects is returned unchanged, for libpq to reject with its own
/// message.
pub(crate) fn with_defaults(conninfo: &str, params: &[(&str, String)]) -> String {
    let present = if conninfo.trim().is_empty() {
        Vec::new()
    } else {
        match super::params(conninfo) {
            Ok(present) => present,
            Err(_) => return conninfo.to_owned(),
        }
    };
    let is_uri = super::url_prefix(conninfo).is_some();
    let mut out = conninfo.to_owned();
    for (key, value) in params
        .iter()
        .filter(|(k, _)| !present.iter().any(|p| p.keyword == *k))
    {
        if is_uri {
            if !out.contains('?') {
                out.push('?');
            } else if !out.ends_with(['?', '&']) {
                out.push('&');
            }
        } else if !out.is_empty() && !out.ends_with(char::is_whitespace) {
            out.push(' ');
        }
        out.push_str(key);
        out.push('=');
        out.push_str(&quoted(is_uri, value));
    }
    out
}

/// `value` as the URI form (percent-encoded) or the `key=value` form (single-quoted
/// with `\` escapes, unless it is one plain word) carries it: what the parser reads
/// back as `value`.
fn quoted(is_uri: bool, value: &str) -> String {
    if is_uri {
        // Every byte but the unreserved ones as `%XX` (libpq reads no `+`).
        return value
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
    }
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if plain {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Vec<(&'static str, String)> {
        vec![("connect_timeout", "2".into()), ("keepalives", "1".into())]
    }

    #[test]
    fn values_with_spaces_and_quotes_are_carried_whole_in_both_forms() {
        let name = vec![("application_name", "my app's \\ cache".to_owned())];
        assert_eq!(
            with_defaults("postgres://h/db", &name),
            "postgres://h/db?application_name=my%20app%27s%20%5C%20cache"
        );
        assert_eq!(
            with_defaults("host=h", &name),
            "host=h application_name='my app\\'s \\\\ cache'"
        );
    }

    #[test]
    fn a_uri_without_a_query_gets_one() {
        assert_eq!(
            with_defaults("postgres://u:p@h:5432/db", &params()),
            "postgres://u:p@h:5432/db?connect_timeout=2&keepalives=1"
        );
    }

    #[test]
    fn a_uri_keeps_its_own_settings_and_gets_the_missing_ones() {
        assert_eq!(
            with_defaults(
                "postgresql://h/db?sslmode=require&connect_timeout=9",
                &params()
            ),
            "postgresql://h/db?sslmode=require&connect_timeout=9&keepalives=1"
        );
        assert_eq!(
            with_defaults("postgres://h/db?", &params()),
            "postgres://h/db?connect_timeout=2&keepalives=1"
        );
        assert_eq!(
            with_defaults("postgres://h/db?%6Beepalives=0", &params()),
            "postgres://h/db?%6Beepalives=0&connect_timeout=2",
            "keys are percent-decoded"
        );
    }

    #[test]
    fn a_keyword_string_keeps_its_own_settings_and_gets_the_missing_ones() {
        assert_eq!(
            with_defaults("host=h user=u", &params()),
            "host=h user=u connect_timeout=2 keepalives=1"
        );
        assert_eq!(
            with_defaults(
                "host = h password='a b\\' keepalives=1' connect_timeout =5 ",
                &params()
            ),
            "host = h password='a b\\' keepalives=1' connect_timeout =5 keepalives=1",
            "a quoted value is not a key"
        );
        assert_eq!(
            with_defaults("", &params()),
            "connect_timeout=2 keepalives=1"
        );
    }

    #[test]
    fn a_malformed_keyword_string_is_left_for_libpq_to_reject() {
        for bad in ["host", "password='open", "host=h user"] {
            assert_eq!(with_defaults(bad, &params()), bad);
        }
    }

    #[test]
    fn the_connect_timeout_is_the_pool_timeout_in_whole_seconds_at_least_two() {
        let connect = |ms| {
            client_timeouts(Duration::from_millis(ms), Duration::from_secs(6))[0]
                .1
                .clone()
        };
        assert_eq!(connect(500), "2");
        assert_eq!(connect(2000), "2");
        assert_eq!(connect(2001), "3");
        assert_eq!(
            client_timeouts(Duration::from_secs(2), Duration::from_millis(6000))
                .last()
                .unwrap(),
            &("tcp_user_timeout", "6000".to_owned())
        );
    }

    #[test]
    fn what_is_appended_reads_back_through_the_parser_as_written() {
        for value in ["plain", "a b", "it's", "back\\slash", "ü=&?%+", "'quoted'"] {
            for base in [
                "postgres://h/db",
                "postgres://h/db?sslmode=disable",
                "host=h",
            ] {
                let text = with_defaults(base, &[("application_name", value.to_owned())]);
                let read = super::super::params(&text)
                    .ok()
                    .and_then(|params| params.into_iter().find(|p| p.keyword == "application_name"))
                    .map(|p| p.value);
                assert_eq!(read.as_deref(), Some(value), "{text}");
            }
        }
    }
}
