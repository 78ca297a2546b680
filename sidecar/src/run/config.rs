//! Settings of `herald run`: command-line flags and environment variables (clap), then an optional TOML
//! file with the same keys (`HERALD_CONCURRENCY = 64`), then defaults. Every value is validated here, once,
//! with an error that names the setting; secrets (SMTP passwords, the webhook key, the database password)
//! never reach a log line or an error message.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use lettre::message::Mailbox;
use p256::ecdsa::VerifyingKey;

use super::address_policy::AllowList;
use super::sendgrid::parse_sendgrid_key;

/// Prefix of the per-provider SMTP settings: `HERALD_SMTP_URL_<NAME>` (provider name upper-cased, `-` as `_`).
pub const SMTP_PREFIX: &str = "HERALD_SMTP_URL_";

#[derive(clap::Args, Debug, serde::Serialize)]
#[command(after_long_help = "\
Email providers: a provider's kind (herald.upsert_provider) decides its transport. Kind smtp: the SMTP server
HERALD_SMTP_URL_<NAME> (environment or config file; <NAME> upper-cased, '-' written '_'); kind file: the folder
HERALD_MAILDIR. herald run refuses to start while a provider lacks its kind's setting, naming each one.
  smtp://user:pass@host:587?tls=required      STARTTLS, refused if the server does not offer it
  smtp://host:25?tls=opportunistic            STARTTLS when offered (default without credentials)
  smtp://127.0.0.1:2525?tls=none              plain text (a local relay)
  smtps://user:pass@host:465                  TLS from the first byte
  &pool=N                                     at most N connections to that server (default 16)
The file transport writes <message-id>.eml files into HERALD_MAILDIR. A workspace's implicit 'default'
provider (no row) uses HERALD_SMTP_URL_DEFAULT when set, else HERALD_MAILDIR (logged at start).

Database: --database-url or DATABASE_URL (environment or config file); by default
the local socket /var/run/postgresql, database herald, as the current OS user. TLS: sslmode=require
(encrypted, server not checked), verify-ca / verify-full (checked against the system's CA store, or
sslrootcert=<file>); e.g. postgres://herald_daemon@db.example.com/herald?sslmode=verify-full.
Run it as a role in herald_worker, not a superuser (it warns otherwise).

Secrets and rotation. Each of HERALD_WEBHOOK_SECRET, HERALD_LINK_SECRET, HERALD_EVENTS_TOKEN and
HERALD_STREAM_TOKEN is the default for every workspace, and may also be given as:
  HERALD_<PURPOSE>_PREVIOUS          the key being rotated out: still accepted, never used to sign
  HERALD_<PURPOSE>_FILE              read from a file (trailing newline dropped); not with the value itself
  HERALD_<PURPOSE>_PREVIOUS_FILE
Per workspace, in the --config file (each purpose falls back to the default when not set):
  [workspaces.acme]
  webhook_secret = '...'            # signs acme's webhooks (X-Herald-Signature)
  webhook_secret_previous = '...'   # during a rotation: also sent as X-Herald-Signature-Previous
  link_secret_file = '/run/secrets/acme-links'   # signs acme's links; the previous one still verifies
  events_token = '...'              # /events/...: may only affect acme (others' reports are skipped)
  events_token_previous = '...'
  stream_token = '...'              # GET /stream?workspace=acme: reads acme's results only
  sendgrid_verification_key = '...' # acme's own SendGrid account: /events/sendgrid?workspace=acme
                                    # is verified with it and may only affect acme
Rotation without downtime: set the new key as current and the old one as _previous, restart the
daemons one by one, and drop _previous once nothing signed with it matters any more (links in mail
already sent verify while it is there; a provider has switched to the new events token).
The default events and stream tokens act for every workspace; a workspace's own only for that workspace.
Unsubscribe tokens of HERALD_UNSUBSCRIBE_URL are keyed with the link key (HERALD_LINK_SECRET may be
set without the HTTP side for them); without any link key the webhook secret is used, with a warning.

Signals: SIGTERM or SIGINT stops claiming, waits up to the grace period for jobs in flight, reports
their results and exits 0.")]
pub struct RunArgs {
    /// TOML file with the same keys as the environment (e.g. `HERALD_CONCURRENCY = 64`); flags and
    /// environment variables win over it.
    #[arg(long, value_name = "FILE", env = "HERALD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Name written on the jobs this process leases. Default: <hostname>-<pid>.
    #[arg(long, value_name = "NAME", env = "HERALD_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Jobs in flight at once (1-10000). Default: 64.
    #[arg(long, value_name = "N", env = "HERALD_CONCURRENCY")]
    pub concurrency: Option<String>,
    /// Fallback poll when no notification arrives, in milliseconds (10-3600000). Default: 1000.
    #[arg(long, value_name = "MS", env = "HERALD_POLL_INTERVAL_MS")]
    pub poll_interval_ms: Option<String>,
    /// How long a claimed job stays leased to this worker, in seconds (1-86400). Default: 60.
    #[arg(long, value_name = "SECONDS", env = "HERALD_LEASE_SECONDS")]
    pub lease_seconds: Option<String>,
    /// Folder for the file transport (one <message-id>.eml per message): providers of kind file, and
    /// the implicit default provider when HERALD_SMTP_URL_DEFAULT is not set.
    #[arg(long, value_name = "DIR", env = "HERALD_MAILDIR")]
    pub maildir: Option<String>,
    /// From of emails whose broadcast, template and provider name none. Default: "herald <noreply@localhost>".
    #[arg(long, value_name = "MAILBOX", env = "HERALD_FROM")]
    pub from: Option<String>,
    /// Key of the webhook signature (X-Herald-Signature: sha256=HMAC(key, timestamp + "." + body)).
    /// Without it, webhooks are sent unsigned.
    #[arg(
        long,
        value_name = "KEY",
        env = "HERALD_WEBHOOK_SECRET",
        hide_env_values = true
    )]
    pub webhook_secret: Option<String>,
    /// Comma-separated hosts and CIDRs webhooks may reach although they are loopback, private or
    /// link-local (e.g. "127.0.0.1,10.0.0.0/8,crm.internal"). Default: none.
    #[arg(long, value_name = "LIST", env = "HERALD_WEBHOOK_ALLOW")]
    pub webhook_allow: Option<String>,
    /// Address of the Prometheus text endpoint (e.g. 127.0.0.1:9187, served at /metrics). Default: off.
    #[arg(long, value_name = "ADDR", env = "HERALD_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Base URL of the unsubscribe endpoint; adds List-Unsubscribe and
    /// List-Unsubscribe-Post: List-Unsubscribe=One-Click to every email. Default: off.
    #[arg(long, value_name = "URL", env = "HERALD_UNSUBSCRIBE_URL")]
    pub unsubscribe_url: Option<String>,
    /// Listen address of the HTTP side (one-click unsubscribe, open pixel, click redirects, provider
    /// events), e.g. 0.0.0.0:8080. Needs HERALD_PUBLIC_URL and HERALD_LINK_SECRET. Default: off, and
    /// emails carry no tracking or unsubscribe links.
    #[arg(long, value_name = "ADDR", env = "HERALD_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Public base URL of the HTTP side as recipients reach it (e.g. https://mail.example.com).
    #[arg(long, value_name = "URL", env = "HERALD_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Key that signs the links in emails (HMAC-SHA256); at least 16 characters. Required with
    /// HERALD_HTTP_ADDR. Changing it invalidates the links of mail already sent.
    #[arg(
        long,
        value_name = "KEY",
        env = "HERALD_LINK_SECRET",
        hide_env_values = true
    )]
    pub link_secret: Option<String>,
    /// Token providers must send to POST /events/… (Authorization: Bearer <token>, or Basic with the
    /// token as password); without it those endpoints answer 404.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "HERALD_EVENTS_TOKEN",
        hide_env_values = true
    )]
    pub events_token: Option<String>,
    /// SendGrid's Signed Event Webhook verification key (the base64 public key SendGrid shows). With
    /// it, POST /events/sendgrid needs a valid signature over a timestamp at most 5 minutes off, and
    /// no longer needs HERALD_EVENTS_TOKEN. Needs HERALD_HTTP_ADDR.
    #[arg(long, value_name = "KEY", env = "HERALD_SENDGRID_VERIFICATION_KEY")]
    pub sendgrid_verification_key: Option<String>,
    /// Token apps present to read a workspace's results as server-sent events (GET /stream,
    /// Authorization: Bearer <token>): the default one reads every workspace; `[workspaces.<name>]
    /// stream_token` in the config file reads that workspace only. Needs the HTTP side. Default: off.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "HERALD_STREAM_TOKEN",
        hide_env_values = true
    )]
    pub stream_token: Option<String>,
    /// Requests a second one API key may make to the HTTP API (/v1/…) through this daemon, with a
    /// second's worth at once; more get 429 with Retry-After. 0: no limit. Default: 1000.
    #[arg(long, value_name = "N", env = "HERALD_API_RATE_PER_KEY")]
    pub api_rate_per_key: Option<String>,
    /// Connections one client address may hold open on the HTTP side at once (more are closed
    /// unread). Behind a reverse proxy every connection comes from the proxy: raise it, or 0 for no
    /// limit per address (the server's 512 still holds). Default: 32.
    #[arg(long, value_name = "N", env = "HERALD_HTTP_CONNECTIONS_PER_ADDRESS")]
    pub http_connections_per_address: Option<String>,
    /// Password of the operator's page, <public URL>/admin (at least 12 characters; the operator
    /// gives a name with it, recorded with their approvals). Needs the HTTP side. Default: off.
    #[arg(
        long,
        value_name = "PASSWORD",
        env = "HERALD_ADMIN_PASSWORD",
        hide_env_values = true
    )]
    pub admin_password: Option<String>,
    /// The admin page's password read from a file (trailing newline dropped), instead of
    /// HERALD_ADMIN_PASSWORD.
    #[arg(long, value_name = "FILE", env = "HERALD_ADMIN_PASSWORD_FILE")]
    pub admin_password_file: Option<String>,
    /// Where the admin page reads and acts: a role in herald_admin (pausing broadcasts, approvals
    /// and redrives need more than herald_worker grants). Default: DATABASE_URL.
    #[arg(
        long,
        value_name = "URL",
        env = "HERALD_ADMIN_DATABASE_URL",
        hide_env_values = true
    )]
    pub admin_database_url: Option<String>,
    /// Log format: text or json. Default: text.
    #[arg(long, value_name = "FORMAT", env = "HERALD_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// On SIGTERM/SIGINT, how long to wait for jobs in flight, in seconds (0-3600). Default: 30.
    #[arg(long, value_name = "SECONDS", env = "HERALD_SHUTDOWN_GRACE_SECONDS")]
    pub shutdown_grace_seconds: Option<String>,
    /// Warn in the log when a transaction in the database has held a snapshot open this long, in
    /// seconds (1-86400): claim slows down while it lasts. Default: 60.
    #[arg(
        long,
        value_name = "SECONDS",
        env = "HERALD_LONG_TRANSACTION_WARN_SECONDS"
    )]
    pub long_transaction_warn_seconds: Option<String>,
}

/// The secrets that exist per workspace (config file `[workspaces.<name>]`, lower-case) and as the
/// default of every workspace (environment `HERALD_<PURPOSE>`), each also as `…_PREVIOUS` (still
/// accepted during a rotation) and `…_FILE` / `…_PREVIOUS_FILE` (read from a file).
pub const SECRET_PURPOSES: &[&str] = &[
    "WEBHOOK_SECRET",
    "LINK_SECRET",
    "EVENTS_TOKEN",
    "STREAM_TOKEN",
];

/// The four settings of one purpose: (value, previous value, file, previous file).
fn secret_settings(purpose: &str) -> [String; 4] {
    [
        format!("HERALD_{purpose}"),
        format!("HERALD_{purpose}_PREVIOUS"),
        format!("HERALD_{purpose}_FILE"),
        format!("HERALD_{purpose}_PREVIOUS_FILE"),
    ]
}

/// Every setting RunArgs declares, as (argument id, environment variable): the one list of names,
/// read from clap's own description of the flags (DATABASE_URL, a flag of the whole binary, and
/// HERALD_CONFIG, the file itself, are not in it).
fn declared_settings() -> Vec<(String, String)> {
    let command = <RunArgs as clap::Args>::augment_args(clap::Command::new("run"));
    command
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_str()?;
            (env != "HERALD_CONFIG").then(|| (arg.get_id().to_string(), env.to_string()))
        })
        .collect()
}

/// Keys a config file may hold (plus `HERALD_SMTP_URL_<NAME>`, the `_PREVIOUS`/`_FILE` forms of the
/// secrets, and `[workspaces.<name>]` tables).
fn known_keys() -> Vec<String> {
    std::iter::once("DATABASE_URL".to_string())
        .chain(declared_settings().into_iter().map(|(_, env)| env))
        .collect()
}

impl RunArgs {
    /// The settings given as flags or environment variables, by name: what they say wins over the
    /// config file.
    fn given(&self) -> Vec<(String, String)> {
        let values = serde_json::to_value(self).expect("RunArgs holds strings only");
        declared_settings()
            .into_iter()
            .filter_map(|(id, env)| Some((env, values.get(&id)?.as_str()?.to_string())))
            .collect()
    }
}

pub use crate::logging::LogFormat;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpTls {
    None,
    Opportunistic,
    Required,
    Wrapper,
}

/// One provider's SMTP server. Debug and Display never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub user: Option<String>,
    pub password: Option<String>,
    pub pool: u32,
}

impl fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for SmtpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = self
            .user
            .as_deref()
            .map(|u| format!("{u}:***@"))
            .unwrap_or_default();
        write!(
            f,
            "{user}{}:{} (tls {:?}, pool {})",
            self.host, self.port, self.tls, self.pool
        )
    }
}

impl SmtpSettings {
    /// `smtp[s]://[user[:pass]@]host[:port][?tls=required|opportunistic|none][&pool=N]`. Errors never
    /// repeat the URL (it may hold a password).
    pub fn parse(raw: &str) -> Result<Self> {
        let url = url::Url::parse(raw.trim()).map_err(|e| anyhow!("not a valid URL ({e})"))?;
        let wrapper = match url.scheme() {
            "smtp" => false,
            "smtps" => true,
            other => bail!("scheme must be smtp or smtps, got {other:?}"),
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| anyhow!("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let decode = |s: &str| -> Result<String> {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| anyhow!("user name or password is not UTF-8 once decoded"))
        };
        let user = match url.username() {
            "" => None,
            u => Some(decode(u)?),
        };
        let password = url.password().map(decode).transpose()?;
        let mut tls = None;
        let mut pool = 16;
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "tls" => {
                    tls = Some(match v.as_ref() {
                        "required" => SmtpTls::Required,
                        "opportunistic" => SmtpTls::Opportunistic,
                        "none" => SmtpTls::None,
                        other => {
                            bail!("tls must be required, opportunistic or none, got {other:?}")
                        }
                    })
                }
                "pool" => {
                    pool = v
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (1..=1000).contains(n))
                        .ok_or_else(|| {
                            anyhow!("pool must be a whole number from 1 to 1000, got {v:?}")
                        })?
                }
                other => bail!("unknown parameter {other:?} (allowed: tls, pool)"),
            }
        }
        let tls = match (wrapper, tls) {
            (true, None) => SmtpTls::Wrapper,
            (true, Some(_)) => bail!("smtps:// is always TLS; tls= applies to smtp:// only"),
            (false, Some(t)) => t,
            (false, None) if user.is_some() => SmtpTls::Required,
            (false, None) => SmtpTls::Opportunistic,
        };
        if user.is_some() && tls == SmtpTls::Opportunistic {
            // a downgrade would send the password in clear; say so rather than silently allowing it
            tracing::warn!(host = %host, "SMTP credentials with tls=opportunistic: they travel in clear if the server offers no STARTTLS");
        }
        let port = url.port().unwrap_or(if wrapper { 465 } else { 25 });
        Ok(Self {
            host,
            port,
            tls,
            user,
            password,
            pool,
        })
    }
}

/// A secret string: printed as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The current key of one purpose and, during a rotation, the previous one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPair {
    pub current: Option<Secret>,
    pub previous: Option<Secret>,
}

impl KeyPair {
    /// The keys that verify: current first, then previous.
    pub fn verifying(&self) -> impl Iterator<Item = &[u8]> {
        self.current
            .iter()
            .chain(self.previous.iter())
            .map(|s| s.0.as_bytes())
    }

    fn is_set(&self) -> bool {
        self.current.is_some()
    }
}

/// Equal in a time that does not depend on where two secrets differ (their length is not secret):
/// how every presented token and password is checked.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One workspace's (or the default) keys, one pair per purpose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Secrets {
    pub webhook: KeyPair,
    pub link: KeyPair,
    pub events: KeyPair,
    pub stream: KeyPair,
}

/// Who an events token speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenScope {
    /// The default token: every workspace.
    All,
    /// A workspace's own token: that workspace only.
    Workspace(String),
}

/// Every key the daemon signs or verifies with: the defaults and the per-workspace ones. A workspace
/// without its own key of a purpose uses the default of that purpose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keys {
    pub default: Secrets,
    pub workspaces: BTreeMap<String, Secrets>,
}

impl Keys {
    fn pick(&self, workspace: &str, purpose: impl Fn(&Secrets) -> &KeyPair) -> &KeyPair {
        self.workspaces
            .get(workspace)
            .map(&purpose)
            .filter(|p| p.is_set())
            .unwrap_or_else(|| purpose(&self.default))
    }

    /// The webhook signing keys of a workspace.
    pub fn webhook(&self, workspace: &str) -> &KeyPair {
        self.pick(workspace, |s| &s.webhook)
    }

    /// The link signing keys of a workspace.
    pub fn link(&self, workspace: &str) -> &KeyPair {
        self.pick(workspace, |s| &s.link)
    }

    /// Whether any events token is configured (else /events/… are off).
    pub fn has_events_tokens(&self) -> bool {
        self.has_tokens(|s| &s.events)
    }

    /// Whom a presented events token speaks for, checking every token (constant time each).
    pub fn events_scope(&self, matches: impl Fn(&[u8]) -> bool) -> Option<TokenScope> {
        self.token_scope(|s| &s.events, matches)
    }

    /// Whether any stream token is configured (else /stream is off).
    pub fn has_stream_tokens(&self) -> bool {
        self.has_tokens(|s| &s.stream)
    }

    /// Whom a presented stream token reads for, checking every token (constant time each).
    pub fn stream_scope(&self, matches: impl Fn(&[u8]) -> bool) -> Option<TokenScope> {
        self.token_scope(|s| &s.stream, matches)
    }

    fn has_tokens(&self, purpose: impl Fn(&Secrets) -> &KeyPair) -> bool {
        purpose(&self.default).is_set() || self.workspaces.values().any(|s| purpose(s).is_set())
    }

    /// Every token of the purpose is compared (no early exit), so the time taken does not tell
    /// which one matched.
    fn token_scope(
        &self,
        purpose: impl Fn(&Secrets) -> &KeyPair,
        matches: impl Fn(&[u8]) -> bool,
    ) -> Option<TokenScope> {
        let mut found = None;
        for (name, s) in &self.workspaces {
            if purpose(s)
                .verifying()
                .fold(false, |hit, t| matches(t) | hit)
            {
                found = Some(TokenScope::Workspace(name.clone()));
            }
        }
        if purpose(&self.default)
            .verifying()
            .fold(false, |hit, t| matches(t) | hit)
        {
            found = Some(TokenScope::All);
        }
        found
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub database: tokio_postgres::Config,
    pub worker_id: String,
    pub concurrency: usize,
    pub poll_interval: Duration,
    pub lease: Duration,
    /// Provider key (upper-cased, `-` as `_`) → SMTP server.
    pub smtp: BTreeMap<String, SmtpSettings>,
    pub maildir: Option<PathBuf>,
    pub from: Mailbox,
    /// Signing keys and events tokens, default and per workspace.
    pub keys: std::sync::Arc<Keys>,
    pub webhook_allow: AllowList,
    pub metrics_addr: Option<SocketAddr>,
    pub unsubscribe_url: Option<url::Url>,
    /// The HTTP side: listen address, public URL and link key, all three or none.
    pub http: Option<HttpSide>,
    /// The operator's page on the HTTP side (HERALD_ADMIN_PASSWORD); off without it.
    pub admin: Option<AdminSide>,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    /// The long-transaction watch's threshold (horizon.rs).
    pub long_transaction_warn: Duration,
}

/// The HTTP side's settings (see `http/`).
#[derive(Clone, Debug)]
pub struct HttpSide {
    pub addr: SocketAddr,
    /// Without a trailing slash.
    pub public_url: String,
    /// The same keys as `Config::keys` (links and events tokens are checked here).
    pub keys: std::sync::Arc<Keys>,
    /// SendGrid's Signed Event Webhook key: when set, /events/sendgrid is checked by signature.
    pub sendgrid_key: Option<VerifyingKey>,
    /// `[workspaces.<ws>] sendgrid_verification_key`: a workspace's own SendGrid account; checks
    /// /events/sendgrid?workspace=<ws>, whose events may then only affect that workspace.
    pub sendgrid_workspace_keys: BTreeMap<String, VerifyingKey>,
    /// HERALD_API_RATE_PER_KEY: requests a second per API key (0: no limit).
    pub api_rate_per_key: u32,
    /// HERALD_HTTP_CONNECTIONS_PER_ADDRESS: open connections per client address (0: no limit).
    pub connections_per_address: usize,
}

/// Connections one client address may hold open on the HTTP side (and on /metrics) by default.
pub const CONNECTIONS_PER_ADDRESS: usize = 32;

/// The operator's page (`run/admin/`): its password and, optionally, a database role of its own.
#[derive(Clone, Debug)]
pub struct AdminSide {
    pub password: Secret,
    /// HERALD_ADMIN_DATABASE_URL; None: the daemon's DATABASE_URL.
    pub database: Option<tokio_postgres::Config>,
}

/// The key a provider's SMTP URL is stored under: `my-esp` → `MY_ESP`.
pub fn provider_key(provider: &str) -> String {
    provider.to_ascii_uppercase().replace('-', "_")
}

impl Config {
    /// Flags/environment (already read by clap), then the config file, then the process environment for
    /// `HERALD_SMTP_URL_*`.
    pub fn load(args: RunArgs, database_url: Option<String>) -> Result<Self> {
        let mut raw = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                parse_toml(&text).with_context(|| format!("config file {}", path.display()))?
            }
            None => BTreeMap::new(),
        };
        let given = args
            .given()
            .into_iter()
            .chain(database_url.map(|url| ("DATABASE_URL".to_string(), url)));
        for (k, v) in given {
            raw.insert(k, v);
        }
        let extra: Vec<String> = SECRET_PURPOSES
            .iter()
            .flat_map(|p| secret_settings(p).into_iter().skip(1))
            .collect();
        for (k, v) in std::env::vars() {
            if k.starts_with(SMTP_PREFIX) || extra.contains(&k) {
                raw.insert(k, v);
            }
        }
        Self::from_map(&raw)
    }

    /// Validates a complete set of raw settings (key → text).
    pub fn from_map(raw: &BTreeMap<String, String>) -> Result<Self> {
        let get = |k: &str| raw.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
        let number = |k: &str, default: u64, min: u64, max: u64| -> Result<u64> {
            match get(k) {
                None => Ok(default),
                Some(v) => v
                    .parse::<u64>()
                    .ok()
                    .filter(|n| (min..=max).contains(n))
                    .ok_or_else(|| {
                        anyhow!("{k}: expected a whole number from {min} to {max}, got {v:?}")
                    }),
            }
        };

        let database = match get("DATABASE_URL") {
            // the parser's message could quote the string, which may hold a password: say only what is wrong
            Some(url) => crate::db::parse_database_url(url).map_err(|e| match e {
                crate::db::UrlError::Tls(why) => anyhow!("DATABASE_URL: {why}"),
                crate::db::UrlError::Other(_) => anyhow!("DATABASE_URL: not a valid connection string (postgres://user@host/db or key=value pairs)"),
            })?,
            None => {
                let mut c = tokio_postgres::Config::new();
                c.host_path("/var/run/postgresql");
                c.user(crate::db::os_user());
                c.dbname("herald");
                c
            }
        };

        let worker_id = match get("HERALD_WORKER_ID") {
            Some(w) if w.len() > 200 => bail!("HERALD_WORKER_ID: at most 200 characters"),
            Some(w) => w.to_string(),
            None => format!("{}-{}", hostname(), std::process::id()),
        };

        let mut smtp = BTreeMap::new();
        for (k, v) in raw.range(SMTP_PREFIX.to_string()..) {
            let Some(name) = k.strip_prefix(SMTP_PREFIX) else {
                break;
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                bail!("{k}: the provider part must be letters, digits and _ (e.g. HERALD_SMTP_URL_DEFAULT)");
            }
            if v.trim().is_empty() {
                continue;
            }
            let settings = SmtpSettings::parse(v).map_err(|e| anyhow!("{k}: {e}"))?;
            smtp.insert(name.to_ascii_uppercase(), settings);
        }

        let from_text = get("HERALD_FROM").unwrap_or("herald <noreply@localhost>");
        let from = from_text
            .parse::<Mailbox>()
            .map_err(|e| anyhow!("HERALD_FROM: not a valid mailbox ({e}), got {from_text:?}"))?;

        let metrics_addr = get("HERALD_METRICS_ADDR")
            .map(|v| {
                v.parse::<SocketAddr>().map_err(|_| {
                    anyhow!(
                        "HERALD_METRICS_ADDR: expected host:port such as 127.0.0.1:9187, got {v:?}"
                    )
                })
            })
            .transpose()?;

        let unsubscribe_url = get("HERALD_UNSUBSCRIBE_URL")
            .map(|v| {
                let u = url::Url::parse(v)
                    .map_err(|e| anyhow!("HERALD_UNSUBSCRIBE_URL: {e}, got {v:?}"))?;
                if !matches!(u.scheme(), "http" | "https") {
                    bail!("HERALD_UNSUBSCRIBE_URL: must be an http(s) URL, got {v:?}");
                }
                Ok(u)
            })
            .transpose()?;

        let keys = std::sync::Arc::new(read_keys(raw)?);
        if unsubscribe_url.is_none()
            && http_parts(raw) == (false, false)
            && keys.default.link.is_set()
        {
            bail!("HERALD_HTTP_ADDR, HERALD_PUBLIC_URL and HERALD_LINK_SECRET go together: set all three or none (HERALD_LINK_SECRET alone keys HERALD_UNSUBSCRIBE_URL's tokens only)");
        }

        // validated before the HTTP side so that a bad key is named even when the side is incomplete
        let sendgrid_key = get("HERALD_SENDGRID_VERIFICATION_KEY")
            .map(|k| {
                parse_sendgrid_key(k).map_err(|e| anyhow!("HERALD_SENDGRID_VERIFICATION_KEY: {e}"))
            })
            .transpose()?;
        let sendgrid_workspace_keys = raw
            .iter()
            .filter_map(|(k, v)| {
                let name = k
                    .strip_prefix("workspaces.")?
                    .strip_suffix(".SENDGRID_VERIFICATION_KEY")?;
                Some(
                    parse_sendgrid_key(v)
                        .map(|key| (name.to_string(), key))
                        .map_err(|e| anyhow!("[workspaces.{name}] sendgrid_verification_key: {e}")),
                )
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        let api_rate_per_key = number("HERALD_API_RATE_PER_KEY", 1000, 0, 1_000_000)? as u32;
        let connections_per_address = number(
            "HERALD_HTTP_CONNECTIONS_PER_ADDRESS",
            CONNECTIONS_PER_ADDRESS as u64,
            0,
            512,
        )? as usize;
        let http = match (
            get("HERALD_HTTP_ADDR"),
            get("HERALD_PUBLIC_URL"),
            keys.default.link.is_set(),
        ) {
            (None, None, _) if sendgrid_key.is_some() || !sendgrid_workspace_keys.is_empty() => bail!(
                "{}: SendGrid events arrive through the HTTP side; set HERALD_HTTP_ADDR, HERALD_PUBLIC_URL and HERALD_LINK_SECRET too",
                match sendgrid_workspace_keys.keys().next() {
                    Some(ws) if sendgrid_key.is_none() =>
                        format!("[workspaces.{ws}] sendgrid_verification_key"),
                    _ => "HERALD_SENDGRID_VERIFICATION_KEY".to_string(),
                }
            ),
            (None, None, _) => None,
            (Some(addr), Some(public), true) => {
                let addr = addr.parse::<SocketAddr>().map_err(|_| {
                    anyhow!("HERALD_HTTP_ADDR: expected host:port such as 0.0.0.0:8080, got {addr:?}")
                })?;
                let public = url::Url::parse(public.trim_end_matches('/'))
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                    .ok_or_else(|| {
                        anyhow!("HERALD_PUBLIC_URL: must be an absolute http(s) URL, got {public:?}")
                    })?;
                Some(HttpSide {
                    addr,
                    public_url: public.as_str().trim_end_matches('/').to_string(),
                    keys: std::sync::Arc::clone(&keys),
                    sendgrid_key,
                    sendgrid_workspace_keys,
                    api_rate_per_key,
                    connections_per_address,
                })
            }
            _ => bail!(
                "HERALD_HTTP_ADDR, HERALD_PUBLIC_URL and HERALD_LINK_SECRET go together: set all three or none"
            ),
        };

        if http.is_none() && get("HERALD_API_RATE_PER_KEY").is_some() {
            bail!("HERALD_API_RATE_PER_KEY: the HTTP API is on the HTTP side; set HERALD_HTTP_ADDR, HERALD_PUBLIC_URL and HERALD_LINK_SECRET too");
        }
        if http.is_none() && get("HERALD_HTTP_CONNECTIONS_PER_ADDRESS").is_some() {
            bail!("HERALD_HTTP_CONNECTIONS_PER_ADDRESS: set HERALD_HTTP_ADDR, HERALD_PUBLIC_URL and HERALD_LINK_SECRET too (it limits the HTTP side)");
        }
        let admin = read_admin(raw, http.is_some())?;

        let log_format = match get("HERALD_LOG_FORMAT")
            .map(|s| s.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => bail!("HERALD_LOG_FORMAT: expected text or json, got {other:?}"),
        };

        Ok(Self {
            database,
            worker_id,
            concurrency: number("HERALD_CONCURRENCY", 64, 1, 10_000)? as usize,
            poll_interval: Duration::from_millis(number(
                "HERALD_POLL_INTERVAL_MS",
                1000,
                10,
                3_600_000,
            )?),
            lease: Duration::from_secs(number("HERALD_LEASE_SECONDS", 60, 1, 86_400)?),
            smtp,
            maildir: get("HERALD_MAILDIR").map(PathBuf::from),
            from,
            keys,
            webhook_allow: AllowList::parse(get("HERALD_WEBHOOK_ALLOW").unwrap_or(""))
                .map_err(|e| anyhow!("HERALD_WEBHOOK_ALLOW: {e}"))?,
            metrics_addr,
            unsubscribe_url,
            http,
            admin,
            log_format,
            shutdown_grace: Duration::from_secs(number(
                "HERALD_SHUTDOWN_GRACE_SECONDS",
                30,
                0,
                3600,
            )?),
            long_transaction_warn: Duration::from_secs(number(
                "HERALD_LONG_TRANSACTION_WARN_SECONDS",
                60,
                1,
                86_400,
            )?),
        })
    }

    /// One line for the start-up log: no secrets.
    pub fn summary(&self) -> String {
        let providers: Vec<String> = self.smtp.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "database {:?}, concurrency {}, lease {}s, poll {}ms, smtp [{}], maildir {}, webhook signing {}, workspaces with keys of their own [{}], allow [{}], metrics {}",
            self.database.get_dbname().unwrap_or("?"),
            self.concurrency,
            self.lease.as_secs(),
            self.poll_interval.as_millis(),
            providers.join(", "),
            self.maildir.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "off".into()),
            if self.keys.default.webhook.is_set() { "on" } else { "off" },
            self.keys.workspaces.keys().cloned().collect::<Vec<_>>().join(", "),
            self.webhook_allow,
            self.metrics_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        )
    }
}

/// The admin page's settings: a password (value or file, at least 12 characters) turns it on; it
/// needs the HTTP side; HERALD_ADMIN_DATABASE_URL alone is a mistake worth naming.
fn read_admin(raw: &BTreeMap<String, String>, http_side: bool) -> Result<Option<AdminSide>> {
    let password = read_secret(
        raw,
        "HERALD_ADMIN_PASSWORD",
        "HERALD_ADMIN_PASSWORD_FILE",
        ("HERALD_ADMIN_PASSWORD", "HERALD_ADMIN_PASSWORD_FILE"),
    )?;
    let database = raw
        .get("HERALD_ADMIN_DATABASE_URL")
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|url| {
            // never the URL in the message: it may hold a password
            crate::db::parse_database_url(url).map_err(|e| match e {
                crate::db::UrlError::Tls(why) => anyhow!("HERALD_ADMIN_DATABASE_URL: {why}"),
                crate::db::UrlError::Other(_) => anyhow!("HERALD_ADMIN_DATABASE_URL: not a valid connection string (postgres://user@host/db or key=value pairs)"),
            })
        })
        .transpose()?;
    match password {
        None if database.is_some() => bail!(
            "HERALD_ADMIN_DATABASE_URL: only the admin page uses it; set HERALD_ADMIN_PASSWORD (or HERALD_ADMIN_PASSWORD_FILE) to turn the page on"
        ),
        None => Ok(None),
        Some(_) if !http_side => bail!(
            "HERALD_ADMIN_PASSWORD: the admin page is served by the HTTP side; set HERALD_HTTP_ADDR, HERALD_PUBLIC_URL and HERALD_LINK_SECRET too"
        ),
        Some(p) if p.0.chars().count() < 12 => {
            bail!("HERALD_ADMIN_PASSWORD: must be at least 12 characters")
        }
        Some(password) => Ok(Some(AdminSide { password, database })),
    }
}

/// Whether HERALD_HTTP_ADDR and HERALD_PUBLIC_URL are set.
fn http_parts(raw: &BTreeMap<String, String>) -> (bool, bool) {
    let set = |k: &str| raw.get(k).is_some_and(|v| !v.trim().is_empty());
    (set("HERALD_HTTP_ADDR"), set("HERALD_PUBLIC_URL"))
}

/// One secret from its value or its file (never both); errors name the setting, never the value.
fn read_secret(
    raw: &BTreeMap<String, String>,
    value_key: &str,
    file_key: &str,
    (shown, shown_file): (&str, &str),
) -> Result<Option<Secret>> {
    let get = |k: &str| raw.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
    let secret = match (get(value_key), get(file_key)) {
        (Some(_), Some(_)) => bail!("{shown}: set the value or the file, not both"),
        (Some(v), None) => Some(v.to_string()),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow!("{shown_file}: cannot read {path}: {e}"))?;
            let text = text.trim_end_matches(['\r', '\n']).to_string();
            if text.trim().is_empty() {
                bail!("{shown_file}: {path} is empty");
            }
            Some(text)
        }
        (None, None) => None,
    };
    Ok(secret.map(Secret))
}

/// The defaults (`HERALD_<PURPOSE>…`) and the `[workspaces.<name>]` keys (flattened by `parse_toml`
/// to `workspaces.<name>.<purpose>…`), validated: link keys at least 16 characters, a previous key
/// only with a current one, and no events token shared by two scopes.
fn read_keys(raw: &BTreeMap<String, String>) -> Result<Keys> {
    let pair = |scope: &str, purpose: &str, keys: [String; 4]| -> Result<KeyPair> {
        let shown = |k: &str| {
            if scope.is_empty() {
                k.to_string()
            } else {
                let field = k.rsplit('.').next().unwrap_or(k);
                format!("[workspaces.{scope}] {}", field.to_ascii_lowercase())
            }
        };
        let current = read_secret(
            raw,
            &keys[0],
            &keys[2],
            (&shown(&keys[0]), &shown(&keys[2])),
        )?;
        let previous = read_secret(
            raw,
            &keys[1],
            &keys[3],
            (&shown(&keys[1]), &shown(&keys[3])),
        )?;
        if previous.is_some() && current.is_none() {
            bail!(
                "{}: a previous key needs a current one ({})",
                shown(&keys[1]),
                shown(&keys[0])
            );
        }
        if purpose == "LINK_SECRET" {
            for (k, s) in [(&keys[0], &current), (&keys[1], &previous)] {
                if s.as_ref().is_some_and(|s| s.0.chars().count() < 16) {
                    bail!("{}: must be at least 16 characters", shown(k));
                }
            }
        }
        Ok(KeyPair { current, previous })
    };
    let secrets = |scope: &str, names: &dyn Fn(&str) -> [String; 4]| -> Result<Secrets> {
        Ok(Secrets {
            webhook: pair(scope, "WEBHOOK_SECRET", names("WEBHOOK_SECRET"))?,
            link: pair(scope, "LINK_SECRET", names("LINK_SECRET"))?,
            events: pair(scope, "EVENTS_TOKEN", names("EVENTS_TOKEN"))?,
            stream: pair(scope, "STREAM_TOKEN", names("STREAM_TOKEN"))?,
        })
    };
    let mut keys = Keys {
        default: secrets("", &|p| secret_settings(p))?,
        workspaces: BTreeMap::new(),
    };
    let names: std::collections::BTreeSet<String> = raw
        .keys()
        .filter_map(|k| k.strip_prefix("workspaces."))
        .filter_map(|rest| rest.rsplit_once('.').map(|(name, _)| name.to_string()))
        .collect();
    for name in names {
        let prefix = format!("workspaces.{name}.");
        let own = secrets(&name, &|p| {
            secret_settings(p).map(|k| format!("{prefix}{}", k.trim_start_matches("HERALD_")))
        })?;
        keys.workspaces.insert(name, own);
    }
    // a token says whom it speaks for: the same token in two scopes would be ambiguous
    type Purpose = fn(&Secrets) -> &KeyPair;
    let purposes: [(&str, Purpose); 2] = [("events", |s| &s.events), ("stream", |s| &s.stream)];
    for (what, purpose) in purposes {
        let mut seen: Vec<(&[u8], String)> = Vec::new();
        let scopes = std::iter::once(("the default".to_string(), &keys.default)).chain(
            keys.workspaces
                .iter()
                .map(|(n, s)| (format!("workspace {n:?}"), s)),
        );
        for (scope, s) in scopes {
            for t in purpose(s).verifying() {
                if let Some((_, other)) = seen.iter().find(|(u, _)| *u == t) {
                    bail!("{what} tokens must differ: {scope} and {other} share one");
                }
                seen.push((t, scope.clone()));
            }
        }
    }
    Ok(keys)
}

/// The fields a `[workspaces.<name>]` table may hold: each secret purpose's four forms, lower-case,
/// and the workspace's SendGrid verification key.
fn workspace_fields() -> Vec<String> {
    SECRET_PURPOSES
        .iter()
        .flat_map(|p| secret_settings(p))
        .map(|k| k.trim_start_matches("HERALD_").to_ascii_lowercase())
        .chain(std::iter::once("sendgrid_verification_key".to_string()))
        .collect()
}

/// A config file: a flat TOML table whose keys are the environment variables' names.
pub fn parse_toml(text: &str) -> Result<BTreeMap<String, String>> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| anyhow!("{}", e.message()))?;
    let mut out = BTreeMap::new();
    // the names a file may use, worked out once from the declared settings
    let known = known_keys();
    let known_fields = workspace_fields();
    for (key, value) in table {
        if key == "workspaces" {
            let toml::Value::Table(workspaces) = value else {
                bail!("workspaces: expected tables, e.g. [workspaces.acme]");
            };
            for (name, fields) in workspaces {
                let toml::Value::Table(fields) = fields else {
                    bail!("workspaces.{name}: expected a table of keys ([workspaces.{name}])");
                };
                for (field, v) in fields {
                    let lower = field.to_ascii_lowercase();
                    if !known_fields.contains(&lower) {
                        bail!(
                            "[workspaces.{name}]: unknown key {field:?} (known: {})",
                            known_fields.join(", ")
                        );
                    }
                    let toml::Value::String(text) = v else {
                        bail!("[workspaces.{name}] {field}: expected a string");
                    };
                    out.insert(
                        format!("workspaces.{name}.{}", lower.to_ascii_uppercase()),
                        text,
                    );
                }
            }
            continue;
        }
        let upper = key.to_ascii_uppercase();
        let secret_form = SECRET_PURPOSES
            .iter()
            .any(|p| secret_settings(p).contains(&upper));
        if !known.contains(&upper) && !upper.starts_with(SMTP_PREFIX) && !secret_form {
            bail!(
                "unknown key {key:?} (known: {}, {SMTP_PREFIX}<NAME>)",
                known.join(", ")
            );
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s),
                    _ => Err(anyhow!("{key}: a list may hold strings only")),
                })
                .collect::<Result<Vec<_>>>()?
                .join(","),
            _ => bail!("{key}: expected a string or a whole number"),
        };
        out.insert(upper, text);
    }
    Ok(out)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "herald".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_named_once_by_their_flags() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "run",
            "--worker-id",
            "w1",
            "--shutdown-grace-seconds",
            "5",
        ])
        .unwrap();
        let given = cli.run.given();
        assert!(given.contains(&("HERALD_WORKER_ID".to_string(), "w1".to_string())));
        assert!(given.contains(&("HERALD_SHUTDOWN_GRACE_SECONDS".to_string(), "5".to_string())));
        let keys = known_keys();
        assert_eq!(keys[0], "DATABASE_URL");
        let distinct: std::collections::BTreeSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "each setting once: {keys:?}");
        for k in [
            "HERALD_CONCURRENCY",
            "HERALD_STREAM_TOKEN",
            "HERALD_LOG_FORMAT",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} in {keys:?}");
        }
        assert!(!keys.iter().any(|k| k == "HERALD_CONFIG"));
        // every declared setting is one a config file may hold
        for key in &keys[1..] {
            assert!(parse_toml(&format!("{key} = 'x'")).is_ok(), "{key}");
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults() {
        let c = Config::from_map(&BTreeMap::new()).unwrap();
        assert_eq!(c.concurrency, 64);
        assert_eq!(c.poll_interval, Duration::from_millis(1000));
        assert_eq!(c.lease, Duration::from_secs(60));
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.long_transaction_warn, Duration::from_secs(60));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.from.to_string(), "herald <noreply@localhost>");
        assert!(c.worker_id.ends_with(&format!("-{}", std::process::id())));
        assert_eq!(c.database.get_dbname(), Some("herald"));
        assert!(c.smtp.is_empty() && c.maildir.is_none() && c.metrics_addr.is_none());
    }

    #[test]
    fn numbers_are_validated_with_the_key_in_the_message() {
        for (k, v) in [
            ("HERALD_CONCURRENCY", "0"),
            ("HERALD_CONCURRENCY", "many"),
            ("HERALD_LEASE_SECONDS", "-1"),
            ("HERALD_POLL_INTERVAL_MS", "1"),
        ] {
            let e = Config::from_map(&map(&[(k, v)])).unwrap_err().to_string();
            assert!(e.starts_with(k), "{e}");
            assert!(e.contains(&format!("{v:?}")), "{e}");
        }
        let c = Config::from_map(&map(&[("HERALD_CONCURRENCY", " 8 ")])).unwrap();
        assert_eq!(c.concurrency, 8);
    }

    #[test]
    fn smtp_urls() {
        let s = SmtpSettings::parse("smtp://ann:p%40ss@mail.example.com:587?tls=required").unwrap();
        assert_eq!(s.host, "mail.example.com");
        assert_eq!(s.port, 587);
        assert_eq!(s.tls, SmtpTls::Required);
        assert_eq!(s.user.as_deref(), Some("ann"));
        assert_eq!(s.password.as_deref(), Some("p@ss"));
        assert!(!format!("{s:?}").contains("p@ss") && !s.to_string().contains("p@ss"));

        let s = SmtpSettings::parse("smtp://127.0.0.1:2525?tls=none&pool=4").unwrap();
        assert_eq!((s.tls, s.pool, s.port), (SmtpTls::None, 4, 2525));
        assert_eq!(
            SmtpSettings::parse("smtp://relay").unwrap().tls,
            SmtpTls::Opportunistic
        );
        assert_eq!(
            SmtpSettings::parse("smtp://u:p@relay").unwrap().tls,
            SmtpTls::Required
        );
        let s = SmtpSettings::parse("smtps://u:p@relay").unwrap();
        assert_eq!((s.tls, s.port), (SmtpTls::Wrapper, 465));

        for bad in [
            "http://x",
            "smtp://x?tls=maybe",
            "smtp://x?pool=0",
            "smtp://x?foo=1",
            "smtps://x?tls=none",
            "nope",
        ] {
            assert!(SmtpSettings::parse(bad).is_err(), "{bad}");
        }
        let e = Config::from_map(&map(&[(
            "HERALD_SMTP_URL_DEFAULT",
            "smtp://u:secret@x?tls=bad",
        )]))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("HERALD_SMTP_URL_DEFAULT") && !e.contains("secret"),
            "{e}"
        );
    }

    #[test]
    fn providers_are_keyed_upper_case() {
        let c = Config::from_map(&map(&[
            ("HERALD_SMTP_URL_DEFAULT", "smtp://a"),
            ("HERALD_SMTP_URL_MY_ESP", "smtp://b"),
        ]))
        .unwrap();
        assert_eq!(c.smtp[&provider_key("default")].host, "a");
        assert_eq!(c.smtp[&provider_key("my-esp")].host, "b");
    }

    #[test]
    fn database_url_errors_do_not_echo_the_password() {
        let e = Config::from_map(&map(&[(
            "DATABASE_URL",
            "postgres://u:hunter2@h:notaport/db",
        )]))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("DATABASE_URL") && !e.contains("hunter2"),
            "{e}"
        );
    }

    #[test]
    fn other_settings() {
        let c = Config::from_map(&map(&[
            ("HERALD_FROM", "Acme <news@acme.test>"),
            ("HERALD_METRICS_ADDR", "127.0.0.1:9187"),
            ("HERALD_LOG_FORMAT", "JSON"),
            ("HERALD_UNSUBSCRIBE_URL", "https://acme.test/unsub"),
            ("HERALD_WEBHOOK_SECRET", "k"),
        ]))
        .unwrap();
        assert_eq!(c.from.email.to_string(), "news@acme.test");
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(!format!("{c:?}").contains("\"k\""));
        for (k, v) in [
            ("HERALD_FROM", "not an address"),
            ("HERALD_METRICS_ADDR", "localhost"),
            ("HERALD_LOG_FORMAT", "xml"),
            ("HERALD_UNSUBSCRIBE_URL", "mailto:x@y"),
            ("HERALD_WEBHOOK_ALLOW", "10.0.0.0/33"),
        ] {
            let e = Config::from_map(&map(&[(k, v)])).unwrap_err().to_string();
            assert!(e.starts_with(k), "{e}");
        }
    }

    #[test]
    fn http_side_settings_go_together_and_hide_their_secrets() {
        let full = [
            ("HERALD_HTTP_ADDR", "127.0.0.1:8080"),
            ("HERALD_PUBLIC_URL", "https://mail.acme.test/"),
            ("HERALD_LINK_SECRET", "sixteen-chars-ok"),
            ("HERALD_EVENTS_TOKEN", "provider-token-x"),
        ];
        let c = Config::from_map(&map(&full)).unwrap();
        let h = c.http.as_ref().expect("the HTTP side is on");
        assert_eq!(h.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(h.public_url, "https://mail.acme.test");
        let shown = format!("{c:?}");
        assert!(!shown.contains("sixteen-chars-ok") && !shown.contains("provider-token-x"));
        assert!(Config::from_map(&map(&[])).unwrap().http.is_none());
        // any one of the three alone (or two of them) is refused, naming all three
        for (k, v) in &full[..3] {
            let e = Config::from_map(&map(&[(k, v)])).unwrap_err().to_string();
            assert!(e.contains("set all three or none"), "{e}");
        }
        for (k, v) in [
            ("HERALD_HTTP_ADDR", "localhost"),
            ("HERALD_PUBLIC_URL", "mail.acme.test"),
            ("HERALD_PUBLIC_URL", "ftp://mail.acme.test"),
            ("HERALD_LINK_SECRET", "short"),
        ] {
            let mut m = map(&full);
            m.insert(k.to_string(), v.to_string());
            let e = Config::from_map(&m).unwrap_err().to_string();
            assert!(e.starts_with(k), "{e}");
            assert!(!e.contains("short"), "the secret is not echoed: {e}");
        }
    }

    /// The HTTP side of a configuration that has one, with `extra` settings.
    fn http_side(extra: &[(&str, &str)]) -> Result<HttpSide> {
        let mut m = map(&[
            ("HERALD_HTTP_ADDR", "127.0.0.1:8080"),
            ("HERALD_PUBLIC_URL", "https://mail.acme.test/"),
            ("HERALD_LINK_SECRET", "sixteen-chars-ok"),
        ]);
        m.extend(map(extra));
        Config::from_map(&m).map(|c| c.http.expect("the HTTP side"))
    }

    #[test]
    fn api_rate_per_key_is_a_number_on_the_http_side() {
        let rate = |extra: &[(&str, &str)]| http_side(extra).map(|h| h.api_rate_per_key);
        assert_eq!(rate(&[]).unwrap(), 1000, "the default");
        assert_eq!(rate(&[("HERALD_API_RATE_PER_KEY", "0")]).unwrap(), 0, "off");
        assert_eq!(rate(&[("HERALD_API_RATE_PER_KEY", "25")]).unwrap(), 25);
        for bad in ["-1", "1.5", "lots", "1000001"] {
            let e = rate(&[("HERALD_API_RATE_PER_KEY", bad)])
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("HERALD_API_RATE_PER_KEY: expected a whole number"),
                "{e}"
            );
        }
        let e = Config::from_map(&map(&[("HERALD_API_RATE_PER_KEY", "25")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("set HERALD_HTTP_ADDR"), "{e}");
    }

    #[test]
    fn connections_per_address_is_a_number_on_the_http_side() {
        let limit = |extra: &[(&str, &str)]| http_side(extra).map(|h| h.connections_per_address);
        assert_eq!(limit(&[]).unwrap(), 32, "the default");
        assert_eq!(
            limit(&[("HERALD_HTTP_CONNECTIONS_PER_ADDRESS", "0")]).unwrap(),
            0
        );
        assert_eq!(
            limit(&[("HERALD_HTTP_CONNECTIONS_PER_ADDRESS", "200")]).unwrap(),
            200
        );
        for bad in ["-1", "513", "many"] {
            let e = limit(&[("HERALD_HTTP_CONNECTIONS_PER_ADDRESS", bad)])
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(
                    "HERALD_HTTP_CONNECTIONS_PER_ADDRESS: expected a whole number from 0 to 512"
                ),
                "{e}"
            );
        }
        let e = Config::from_map(&map(&[("HERALD_HTTP_CONNECTIONS_PER_ADDRESS", "64")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("set HERALD_HTTP_ADDR"), "{e}");
    }

    #[test]
    fn sendgrid_verification_key_is_a_p256_key_on_the_http_side() {
        let key = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEvl8xDT8gYPEN/AJ1nDAHCdeYcjsCC/pPZ1x2Z5qSAWcpZreqWAbg9tVykL0Og7/JuCctZSXvoKi9otsL+tpGew==";
        let side = [
            ("HERALD_HTTP_ADDR", "127.0.0.1:8080"),
            ("HERALD_PUBLIC_URL", "https://mail.acme.test"),
            ("HERALD_LINK_SECRET", "sixteen-chars-ok"),
        ];
        let mut m = map(&side);
        let c = Config::from_map(&m).unwrap();
        assert!(c.http.as_ref().unwrap().sendgrid_key.is_none());
        m.insert(
            "HERALD_SENDGRID_VERIFICATION_KEY".into(),
            format!(" {key}\n"),
        );
        let c = Config::from_map(&m).unwrap();
        assert!(c.http.as_ref().unwrap().sendgrid_key.is_some());
        // a P-384 key, an RSA-sized blob, text: refused at start, naming the setting
        for bad in [
            "MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEMMt3D8OUjxVzmIFsc1WkclS/rvbq+/wtd4wfGUvZDP3h0Ot5ID+7cRFyM+ZUEq2x5Rw4NqwkQSX9ucsxO+OfP5lcygmnSyaWWRGsCAWuOwLTRxfvypRhYsc9rCcA8Z5P",
            "aGVsbG8gd29ybGQ=",
            "not a key",
        ] {
            m.insert("HERALD_SENDGRID_VERIFICATION_KEY".into(), bad.into());
            let e = Config::from_map(&m).unwrap_err().to_string();
            assert!(e.starts_with("HERALD_SENDGRID_VERIFICATION_KEY: not "), "{e}");
        }
        // without the HTTP side nothing would receive SendGrid's events
        let e = Config::from_map(&map(&[("HERALD_SENDGRID_VERIFICATION_KEY", key)]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("HERALD_SENDGRID_VERIFICATION_KEY") && e.contains("HERALD_HTTP_ADDR"),
            "{e}"
        );
        assert!(parse_toml(&format!("HERALD_SENDGRID_VERIFICATION_KEY = \"{key}\"")).is_ok());
    }

    #[test]
    fn a_workspace_may_have_its_own_sendgrid_key() {
        let key = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEvl8xDT8gYPEN/AJ1nDAHCdeYcjsCC/pPZ1x2Z5qSAWcpZreqWAbg9tVykL0Og7/JuCctZSXvoKi9otsL+tpGew==";
        let file = |text: &str| parse_toml(text).map(|raw| raw.into_iter().collect::<Vec<_>>());
        let own = file(&format!(
            "[workspaces.acme]\nsendgrid_verification_key = \"{key}\"\n"
        ))
        .unwrap();
        let own: Vec<(&str, &str)> = own.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let side = http_side(&own).unwrap();
        assert!(side.sendgrid_key.is_none(), "no default key");
        assert_eq!(
            side.sendgrid_workspace_keys.keys().collect::<Vec<_>>(),
            ["acme"]
        );
        // a bad one is named by its workspace and field
        let e = http_side(&[("workspaces.globex.SENDGRID_VERIFICATION_KEY", "not a key")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("[workspaces.globex] sendgrid_verification_key: not "),
            "{e}"
        );
        // and, like the default one, it needs the HTTP side
        let e = Config::from_map(&map(&own)).unwrap_err().to_string();
        assert!(
            e.starts_with("[workspaces.acme] sendgrid_verification_key")
                && e.contains("HERALD_HTTP_ADDR"),
            "{e}"
        );
    }

    #[test]
    fn per_workspace_keys_with_rotation_and_defaults() {
        let dir = std::env::temp_dir().join(format!("herald-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("globex-link");
        std::fs::write(&file, "globex-link-key-from-file\n").unwrap();
        let mut m = parse_toml(&format!(
            "HERALD_WEBHOOK_SECRET = \"default-hook\"\n\
             HERALD_LINK_SECRET = \"default-link-key-16\"\n\
             HERALD_LINK_SECRET_PREVIOUS = \"default-link-key-old\"\n\
             HERALD_EVENTS_TOKEN = \"default-token\"\n\
             [workspaces.acme]\n\
             webhook_secret = \"acme-hook-new\"\n\
             webhook_secret_previous = \"acme-hook-old\"\n\
             events_token = \"acme-token\"\n\
             events_token_previous = \"acme-token-old\"\n\
             [workspaces.\"globex.eu\"]\n\
             link_secret_file = \"{}\"\n",
            file.display()
        ))
        .unwrap();
        m.insert("HERALD_HTTP_ADDR".into(), "127.0.0.1:8080".into());
        m.insert("HERALD_PUBLIC_URL".into(), "https://mail.test".into());
        let c = Config::from_map(&m).unwrap();
        let k = &c.keys;
        let text = |p: &KeyPair| {
            p.verifying()
                .map(|b| String::from_utf8(b.to_vec()).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(text(k.webhook("acme")), ["acme-hook-new", "acme-hook-old"]);
        assert_eq!(
            text(k.webhook("globex.eu")),
            ["default-hook"],
            "falls back per purpose"
        );
        assert_eq!(text(k.webhook("other")), ["default-hook"]);
        assert_eq!(
            text(k.link("acme")),
            ["default-link-key-16", "default-link-key-old"]
        );
        assert_eq!(text(k.link("globex.eu")), ["globex-link-key-from-file"]);
        let scope = |t: &str| k.events_scope(|x| x == t.as_bytes());
        assert_eq!(
            scope("acme-token"),
            Some(TokenScope::Workspace("acme".into()))
        );
        assert_eq!(
            scope("acme-token-old"),
            Some(TokenScope::Workspace("acme".into()))
        );
        assert_eq!(scope("default-token"), Some(TokenScope::All));
        assert_eq!(scope("nope"), None);
        let shown = format!("{c:?}");
        for secret in ["acme-hook-new", "globex-link-key-from-file", "acme-token"] {
            assert!(!shown.contains(secret), "{secret} shown");
        }

        // refusals name the setting, never the value
        for (toml, says) in [
            ("[workspaces.acme]\nlink_secret = \"short-secret\"\n", "[workspaces.acme] link_secret: must be at least 16 characters"),
            ("[workspaces.acme]\nevents_token_previous = \"x-secret\"\n", "[workspaces.acme] events_token_previous: a previous key needs a current one"),
            ("[workspaces.a]\nevents_token = \"same-secret\"\n[workspaces.b]\nevents_token = \"same-secret\"\n", "events tokens must differ"),
            ("HERALD_EVENTS_TOKEN = \"same-secret\"\n[workspaces.b]\nevents_token_previous = \"same-secret\"\nevents_token = \"b-secret\"\n", "events tokens must differ"),
            ("[workspaces.acme]\nwebhook_secret = \"a-secret\"\nwebhook_secret_file = \"/x\"\n", "[workspaces.acme] webhook_secret: set the value or the file, not both"),
            ("[workspaces.acme]\nwebhook_secret_file = \"/nonexistent/secret\"\n", "[workspaces.acme] webhook_secret_file: cannot read /nonexistent/secret"),
            ("HERALD_LINK_SECRET_PREVIOUS = \"x-secret-but-long-enough\"\n", "HERALD_LINK_SECRET_PREVIOUS: a previous key needs a current one"),
        ] {
            let e = Config::from_map(&parse_toml(toml).unwrap()).unwrap_err().to_string();
            assert!(e.starts_with(says), "{toml}: {e}");
            assert!(!e.contains("secret\""), "{e}");
            assert!(!e.contains("same-secret") && !e.contains("x-secret"), "{e}");
        }
        assert!(parse_toml("[workspaces.acme]\nwebhook_key = \"x\"\n")
            .unwrap_err()
            .to_string()
            .contains("unknown key \"webhook_key\""));
        assert!(parse_toml("[workspaces.acme]\nevents_token = 5\n").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn link_secret_alone_keys_the_unsubscribe_url() {
        let c = Config::from_map(&map(&[
            ("HERALD_UNSUBSCRIBE_URL", "https://acme.test/unsub"),
            ("HERALD_LINK_SECRET", "sixteen-chars-ok"),
        ]))
        .unwrap();
        assert!(c.http.is_none() && c.keys.link("acme").current.is_some());
        let e = Config::from_map(&map(&[("HERALD_LINK_SECRET", "sixteen-chars-ok")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("set all three or none"), "{e}");
    }

    #[test]
    fn admin_page_needs_a_password_and_the_http_side() {
        let side = [
            ("HERALD_HTTP_ADDR", "127.0.0.1:8080"),
            ("HERALD_PUBLIC_URL", "https://mail.acme.test/mail"),
            ("HERALD_LINK_SECRET", "sixteen-chars-ok"),
        ];
        assert!(Config::from_map(&map(&side)).unwrap().admin.is_none());
        let mut m = map(&side);
        m.insert("HERALD_ADMIN_PASSWORD".into(), "a-long-admin-pass".into());
        m.insert(
            "HERALD_ADMIN_DATABASE_URL".into(),
            "postgres://ops:hunter2@db/herald".into(),
        );
        let c = Config::from_map(&m).unwrap();
        let admin = c.admin.as_ref().expect("the page is on");
        assert_eq!(admin.password.0, "a-long-admin-pass");
        assert_eq!(admin.database.as_ref().unwrap().get_user(), Some("ops"));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("a-long-admin-pass") && !shown.contains("hunter2"),
            "{shown}"
        );
        for (k, v, says) in [
            (
                "HERALD_ADMIN_PASSWORD",
                "short-pass",
                "HERALD_ADMIN_PASSWORD: must be at least 12",
            ),
            (
                "HERALD_ADMIN_DATABASE_URL",
                "postgres://u:hunter2@h:nope/db",
                "HERALD_ADMIN_DATABASE_URL: not a valid",
            ),
            (
                "HERALD_ADMIN_PASSWORD_FILE",
                "/nonexistent/pw",
                "HERALD_ADMIN_PASSWORD: set the value or the file",
            ),
        ] {
            let mut bad = m.clone();
            bad.insert(k.into(), v.into());
            let e = Config::from_map(&bad).unwrap_err().to_string();
            assert!(e.starts_with(says), "{e}");
            assert!(!e.contains("short-pass") && !e.contains("hunter2"), "{e}");
        }
        // without the HTTP side, or a database URL without a password: refused, saying what is missing
        let e = Config::from_map(&map(&[("HERALD_ADMIN_PASSWORD", "a-long-admin-pass")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("HERALD_HTTP_ADDR"), "{e}");
        let e = Config::from_map(&map(&[("HERALD_ADMIN_DATABASE_URL", "dbname=x")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("HERALD_ADMIN_DATABASE_URL: only the admin page"),
            "{e}"
        );
        // from a file, trailing newline dropped
        let file = std::env::temp_dir().join(format!("herald-admin-pw-{}", std::process::id()));
        std::fs::write(&file, "from-a-file-password\n").unwrap();
        let mut m = map(&side);
        m.insert(
            "HERALD_ADMIN_PASSWORD_FILE".into(),
            file.display().to_string(),
        );
        let c = Config::from_map(&m).unwrap();
        assert_eq!(c.admin.unwrap().password.0, "from-a-file-password");
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn toml_file() {
        let m = parse_toml(
            "HERALD_CONCURRENCY = 8\nherald_from = \"x <x@y.z>\"\nHERALD_WEBHOOK_ALLOW = [\"127.0.0.1\", \"10.0.0.0/8\"]\nHERALD_SMTP_URL_DEFAULT = \"smtp://h\"\n",
        )
        .unwrap();
        assert_eq!(m["HERALD_CONCURRENCY"], "8");
        assert_eq!(m["HERALD_FROM"], "x <x@y.z>");
        assert_eq!(m["HERALD_WEBHOOK_ALLOW"], "127.0.0.1,10.0.0.0/8");
        let c = Config::from_map(&m).unwrap();
        assert_eq!(c.concurrency, 8);
        assert!(c.smtp.contains_key("DEFAULT"));
        assert!(parse_toml("HERALD_CONCURENCY = 8")
            .unwrap_err()
            .to_string()
            .contains("unknown key"));
        assert!(parse_toml("HERALD_CONCURRENCY = true").is_err());
        assert!(parse_toml("HERALD_CONCURRENCY = ").is_err());
    }
}
