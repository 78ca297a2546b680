//! Which transport carries a provider's email. A provider's kind decides it, never what happens to be
//! configured: kind `smtp` goes over `HERALD_SMTP_URL_<NAME>` only, kind `file` into `HERALD_MAILDIR`
//! only. One of them missing is an error (at start for the providers that exist then, a permanent
//! failure of the job for one created later), never a quiet delivery by the other transport.
//!
//! A provider without a row (the implicit `default` every workspace has, or a name an automation uses
//! without creating it) keeps the behaviour herald always had: its SMTP URL when one is set, else the
//! file mailbox, else its jobs wait and retry until one is configured. The start-up log says which.

use std::collections::BTreeSet;
use std::fmt;

use super::config::{provider_key, Config, SMTP_PREFIX};

/// Where one message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// The SMTP pool of this provider key (`MY_ESP`).
    Smtp(String),
    /// The file mailbox (`HERALD_MAILDIR`).
    File,
}

/// Why a provider's message cannot leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// The provider's kind needs a setting this daemon lacks: the job fails for good (a restart with
    /// the setting, then `herald.retry_failed`, sends it).
    Missing(Missing),
    /// A kind this daemon does not know (a newer extension?): fails for good as well.
    UnknownKind(String),
    /// A provider without a row and no transport at all: retried, the configuration may come.
    Nothing(String),
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::Missing(m) => write!(f, "{m}"),
            Unavailable::UnknownKind(kind) => write!(
                f,
                "provider kind {kind:?} is not one this daemon knows (smtp, file): upgrade herald run"
            ),
            Unavailable::Nothing(provider) => write!(
                f,
                "provider {provider:?} has no transport: set {SMTP_PREFIX}{} or HERALD_MAILDIR",
                provider_key(provider)
            ),
        }
    }
}

/// A provider whose kind's transport is not configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub workspace: String,
    pub provider: String,
    pub kind: &'static str,
    /// The setting to give herald run.
    pub variable: String,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "provider {}/{} is of kind {} but {} is not set in herald run's environment: set it and restart",
            self.workspace, self.provider, self.kind, self.variable
        )
    }
}

/// The transports this daemon has: the providers with an SMTP URL, and whether a mailbox is set.
#[derive(Debug, Clone, Default)]
pub struct Transports {
    smtp: BTreeSet<String>,
    maildir: bool,
}

impl Transports {
    pub fn new(config: &Config) -> Self {
        Self {
            smtp: config.smtp.keys().cloned().collect(),
            maildir: config.maildir.is_some(),
        }
    }

    /// The transport of `provider` in `workspace`, whose row has `kind` (None: no row).
    pub fn route(
        &self,
        workspace: &str,
        provider: &str,
        kind: Option<&str>,
    ) -> Result<Transport, Unavailable> {
        let key = provider_key(provider);
        let missing = |kind: &'static str, variable: String| {
            Unavailable::Missing(Missing {
                workspace: workspace.to_string(),
                provider: provider.to_string(),
                kind,
                variable,
            })
        };
        match kind {
            Some("smtp") if self.smtp.contains(&key) => Ok(Transport::Smtp(key)),
            Some("smtp") => Err(missing("smtp", format!("{SMTP_PREFIX}{key}"))),
            Some("file") if self.maildir => Ok(Transport::File),
            Some("file") => Err(missing("file", "HERALD_MAILDIR".into())),
            Some(other) => Err(Unavailable::UnknownKind(other.to_string())),
            None if self.smtp.contains(&key) => Ok(Transport::Smtp(key)),
            None if self.maildir => Ok(Transport::File),
            None => Err(Unavailable::Nothing(provider.to_string())),
        }
    }

    /// Every provider (workspace, name, kind) whose transport is missing; an empty list when all
    /// can send.
    pub fn missing<'a>(
        &self,
        providers: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) -> Vec<Unavailable> {
        providers
            .into_iter()
            .filter_map(|(ws, name, kind)| self.route(ws, name, Some(kind)).err())
            .collect()
    }

    /// What the implicit `default` provider (no row) uses, for the start-up log.
    pub fn implicit_default(&self) -> String {
        match self.route("*", "default", None) {
            Ok(Transport::Smtp(key)) => format!("SMTP ({SMTP_PREFIX}{key})"),
            Ok(Transport::File) => {
                "the file mailbox (HERALD_MAILDIR; no HERALD_SMTP_URL_DEFAULT)".into()
            }
            Err(_) => "nothing: set HERALD_SMTP_URL_DEFAULT or HERALD_MAILDIR (its jobs are retried until one is set)".into(),
        }
    }
}

/// At start: every provider of every workspace must have its kind's transport, else herald run
/// refuses to start naming each one; and the log says what the implicit `default` provider uses.
pub async fn check_at_start(
    client: &tokio_postgres::Client,
    config: &Config,
) -> anyhow::Result<()> {
    let rows = client
        .query(
            "SELECT workspace_id, name, kind FROM herald.provider_kinds()",
            &[],
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "reading the providers (herald.provider_kinds()): {}",
                crate::db::describe(&e)
            )
        })?;
    let providers: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let transports = Transports::new(config);
    let missing = transports.missing(
        providers
            .iter()
            .map(|(w, n, k)| (w.as_str(), n.as_str(), k.as_str())),
    );
    if !missing.is_empty() {
        anyhow::bail!(refusal(&missing));
    }
    let default = transports.implicit_default();
    if transports.route("*", "default", None).is_err() {
        tracing::warn!(
            providers = providers.len(),
            "email: a workspace's implicit default provider (no row) sends by {default}"
        );
    } else {
        tracing::info!(providers = providers.len(), "email: every provider has its transport; a workspace's implicit default provider (no row) sends by {default}");
    }
    Ok(())
}

/// The start-up refusal: every provider whose transport is missing, one per line, and what to set.
pub fn refusal(missing: &[Unavailable]) -> String {
    let lines: Vec<String> = missing.iter().map(|m| format!("  {m}")).collect();
    format!(
        "{} provider(s) cannot send: their kind's transport is not configured (a provider's kind decides its transport; none falls back to another):\n{}",
        missing.len(),
        lines.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transports(smtp: &[&str], maildir: bool) -> Transports {
        Transports {
            smtp: smtp.iter().map(|s| s.to_string()).collect(),
            maildir,
        }
    }

    #[test]
    fn the_kind_decides_and_nothing_falls_back() {
        let t = transports(&["DEFAULT", "MY_ESP"], true);
        assert_eq!(
            t.route("acme", "my-esp", Some("smtp")),
            Ok(Transport::Smtp("MY_ESP".into()))
        );
        assert_eq!(t.route("acme", "my-esp", Some("file")), Ok(Transport::File));
        let e = t.route("acme", "other", Some("smtp")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "provider acme/other is of kind smtp but HERALD_SMTP_URL_OTHER is not set in herald run's environment: set it and restart"
        );
        let t = transports(&["DEFAULT"], false);
        let e = t.route("acme", "archive", Some("file")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("provider acme/archive is of kind file but HERALD_MAILDIR is not set"),
            "{e}"
        );
        assert!(matches!(
            t.route("acme", "x", Some("carrier-pigeon")),
            Err(Unavailable::UnknownKind(_))
        ));
    }

    #[test]
    fn a_provider_without_a_row_keeps_the_old_choice() {
        assert_eq!(
            transports(&["DEFAULT"], true).route("acme", "default", None),
            Ok(Transport::Smtp("DEFAULT".into()))
        );
        assert_eq!(
            transports(&[], true).route("acme", "default", None),
            Ok(Transport::File)
        );
        assert!(matches!(
            transports(&[], false).route("acme", "default", None),
            Err(Unavailable::Nothing(_))
        ));
        assert!(transports(&[], true)
            .implicit_default()
            .starts_with("the file mailbox"));
        assert_eq!(
            transports(&["DEFAULT"], false).implicit_default(),
            "SMTP (HERALD_SMTP_URL_DEFAULT)"
        );
    }

    #[test]
    fn the_refusal_names_every_provider() {
        let t = transports(&["MAIL"], false);
        let missing = t.missing([
            ("acme", "mail", "smtp"),
            ("acme", "archive", "file"),
            ("globex", "mail", "smtp"),
            ("globex", "esp-2", "smtp"),
        ]);
        assert_eq!(missing.len(), 2);
        let text = refusal(&missing);
        assert!(text.contains("acme/archive is of kind file but HERALD_MAILDIR"));
        assert!(text.contains("globex/esp-2 is of kind smtp but HERALD_SMTP_URL_ESP_2"));
        assert!(!text.contains("acme/mail"));
    }
}
