//! [`DatabaseUrl`]: a connection string in either form libpq accepts, parsed the way
//! libpq parses it so that its password can be masked exactly, and never shown.

use std::fmt;
use std::ops::Range;

use crate::error::{Error, Result};

mod defaults;
mod parse;

pub(crate) use defaults::{client_timeouts, with_defaults};
use parse::{key_value_params, params, stray_at, url_params, url_prefix, Param, Rejection};

/// What replaces a hidden value.
const MASK: &str = "***";

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
        let params = params(text).map_err(|Rejection { at, reason }| {
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

    /// The servers libpq may connect to, in order: each host (or `hostaddr`, which
    /// libpq connects to instead) with its port, as libpq pairs them (one port for
    /// every host, or one each), `PGHOST`/`PGPORT` and port 5432 filling in what the
    /// string leaves out. A host starting with `/` is a Unix-domain socket's
    /// directory; an empty one, libpq's default socket directory.
    pub(crate) fn servers(&self) -> Vec<(String, u16)> {
        let last = |keyword: &str| {
            params(&self.text)
                .ok()
                .and_then(|ps| ps.into_iter().rev().find(|p| p.keyword == keyword))
                .map(|p| p.value)
        };
        let hosts = last("hostaddr")
            .or_else(|| last("host"))
            .or_else(|| std::env::var("PGHOST").ok())
            .unwrap_or_default();
        let ports = last("port")
            .or_else(|| std::env::var("PGPORT").ok())
            .unwrap_or_default();
        let port_of = |text: &str| text.trim().parse().unwrap_or(5432);
        let ports: Vec<u16> = ports.split(',').map(port_of).collect();
        hosts
            .split(',')
            .enumerate()
            .map(|(i, host)| {
                let port = if ports.len() == 1 {
                    ports[0]
                } else {
                    ports.get(i).copied().unwrap_or(5432)
                };
                (host.trim().to_owned(), port)
            })
            .collect()
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
