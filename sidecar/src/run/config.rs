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

use super::http::parse_sendgrid_key;
use super::webhook::AllowList;

/// Prefix of the per-provider SMTP settings: `HERALD_SMTP_URL_<NAME>` (provider name upper-cased, `-` as `_`).
pub const SMTP_PREFIX: &str = "HERALD_SMTP_URL_";

#[derive(clap::Args, Debug)]
#[command(after_long_help = "\
Email providers: HERALD_SMTP_URL_<NAME> (environment or config file) gives the SMTP server of the provider
named <NAME> (upper-cased, '-' written '_'); jobs of provider 'default' use HERALD_SMTP_URL_DEFAULT.
  smtp://user:pass@host:587?tls=required      STARTTLS, refused if the server does not offer it
  smtp://host:25?tls=opportunistic            STARTTLS when offered (default without credentials)
  smtp://127.0.0.1:2525?tls=none              plain text (a local relay)
  smtps://user:pass@host:465                  TLS from the first byte
  &pool=N                                     at most N connections to that server (default 16)
A provider without an SMTP URL writes its mail as <message-id>.eml files into HERALD_MAILDIR.

Database: --database-url or DATABASE_URL (environment or config file); by default
the local socket /var/run/postgresql, database herald, as the current OS user.

Signals: SIGTERM or SIGINT stops claiming, waits up to the grace period for jobs in flight, reports
their results and exits 0.")]
pub struct RunArgs {
    /// TOML file with the same keys as the environment (e.g. `HERALD_CONCURRENCY = 64`); flags and
    /// environment variables win over it.
    #[arg(long, value_name = "FILE", env = "HERALD_CONFIG")]
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
    /// Folder for the file transport (one <message-id>.eml per message), used by providers without
    /// an SMTP URL.
    #[arg(long, value_name = "DIR", env = "HERALD_MAILDIR")]
    pub maildir: Option<String>,
    /// Default From address. Default: "herald <noreply@localhost>".
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
    /// Log format: text or json. Default: text.
    #[arg(long, value_name = "FORMAT", env = "HERALD_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// On SIGTERM/SIGINT, how long to wait for jobs in flight, in seconds (0-3600). Default: 30.
    #[arg(long, value_name = "SECONDS", env = "HERALD_SHUTDOWN_GRACE_SECONDS")]
    pub shutdown_grace_seconds: Option<String>,
}

/// Keys a config file may hold (plus `HERALD_SMTP_URL_<NAME>`).
const KEYS: &[&str] = &[
    "DATABASE_URL",
    "HERALD_WORKER_ID",
    "HERALD_CONCURRENCY",
    "HERALD_POLL_INTERVAL_MS",
    "HERALD_LEASE_SECONDS",
    "HERALD_MAILDIR",
    "HERALD_FROM",
    "HERALD_WEBHOOK_SECRET",
    "HERALD_WEBHOOK_ALLOW",
    "HERALD_METRICS_ADDR",
    "HERALD_UNSUBSCRIBE_URL",
    "HERALD_HTTP_ADDR",
    "HERALD_PUBLIC_URL",
    "HERALD_LINK_SECRET",
    "HERALD_EVENTS_TOKEN",
    "HERALD_SENDGRID_VERIFICATION_KEY",
    "HERALD_LOG_FORMAT",
    "HERALD_SHUTDOWN_GRACE_SECONDS",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

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
    pub webhook_secret: Option<Secret>,
    pub webhook_allow: AllowList,
    pub metrics_addr: Option<SocketAddr>,
    pub unsubscribe_url: Option<url::Url>,
    /// The HTTP side: listen address, public URL and link key, all three or none.
    pub http: Option<HttpSide>,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
}

/// The HTTP side's settings (see `http.rs`).
#[derive(Clone, Debug)]
pub struct HttpSide {
    pub addr: SocketAddr,
    /// Without a trailing slash.
    pub public_url: String,
    pub link_secret: Secret,
    pub events_token: Option<Secret>,
    /// SendGrid's Signed Event Webhook key: when set, /events/sendgrid is checked by signature.
    pub sendgrid_key: Option<VerifyingKey>,
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
        let given = [
            ("DATABASE_URL", database_url),
            ("HERALD_WORKER_ID", args.worker_id),
            ("HERALD_CONCURRENCY", args.concurrency),
            ("HERALD_POLL_INTERVAL_MS", args.poll_interval_ms),
            ("HERALD_LEASE_SECONDS", args.lease_seconds),
            ("HERALD_MAILDIR", args.maildir),
            ("HERALD_FROM", args.from),
            ("HERALD_WEBHOOK_SECRET", args.webhook_secret),
            ("HERALD_WEBHOOK_ALLOW", args.webhook_allow),
            ("HERALD_METRICS_ADDR", args.metrics_addr),
            ("HERALD_UNSUBSCRIBE_URL", args.unsubscribe_url),
            ("HERALD_HTTP_ADDR", args.http_addr),
            ("HERALD_PUBLIC_URL", args.public_url),
            ("HERALD_LINK_SECRET", args.link_secret),
            ("HERALD_EVENTS_TOKEN", args.events_token),
            (
                "HERALD_SENDGRID_VERIFICATION_KEY",
                args.sendgrid_verification_key,
            ),
            ("HERALD_LOG_FORMAT", args.log_format),
            ("HERALD_SHUTDOWN_GRACE_SECONDS", args.shutdown_grace_seconds),
        ];
        for (k, v) in given {
            if let Some(v) = v {
                raw.insert(k.to_string(), v);
            }
        }
        for (k, v) in std::env::vars() {
            if k.starts_with(SMTP_PREFIX) {
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
            Some(url) => url.parse::<tokio_postgres::Config>().map_err(|_| {
                anyhow!("DATABASE_URL: not a valid connection string (postgres://user@host/db or key=value pairs)")
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

        // validated before the HTTP side so that a bad key is named even when the side is incomplete
        let sendgrid_key = get("HERALD_SENDGRID_VERIFICATION_KEY")
            .map(|k| {
                parse_sendgrid_key(k).map_err(|e| anyhow!("HERALD_SENDGRID_VERIFICATION_KEY: {e}"))
            })
            .transpose()?;
        let http = match (
            get("HERALD_HTTP_ADDR"),
            get("HERALD_PUBLIC_URL"),
            get("HERALD_LINK_SECRET"),
        ) {
            (None, None, None) if sendgrid_key.is_some() => bail!(
                "HERALD_SENDGRID_VERIFICATION_KEY: SendGrid events arrive through the HTTP side; set HERALD_HTTP_ADDR, HERALD_PUBLIC_URL and HERALD_LINK_SECRET too"
            ),
            (None, None, None) => None,
            (Some(addr), Some(public), Some(secret)) => {
                let addr = addr.parse::<SocketAddr>().map_err(|_| {
                    anyhow!("HERALD_HTTP_ADDR: expected host:port such as 0.0.0.0:8080, got {addr:?}")
                })?;
                let public = url::Url::parse(public.trim_end_matches('/'))
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                    .ok_or_else(|| {
                        anyhow!("HERALD_PUBLIC_URL: must be an absolute http(s) URL, got {public:?}")
                    })?;
                if secret.chars().count() < 16 {
                    bail!("HERALD_LINK_SECRET: must be at least 16 characters");
                }
                Some(HttpSide {
                    addr,
                    public_url: public.as_str().trim_end_matches('/').to_string(),
                    link_secret: Secret(secret.to_string()),
                    events_token: get("HERALD_EVENTS_TOKEN").map(|t| Secret(t.to_string())),
                    sendgrid_key,
                })
            }
            _ => bail!(
                "HERALD_HTTP_ADDR, HERALD_PUBLIC_URL and HERALD_LINK_SECRET go together: set all three or none"
            ),
        };

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
            webhook_secret: get("HERALD_WEBHOOK_SECRET").map(|s| Secret(s.to_string())),
            webhook_allow: AllowList::parse(get("HERALD_WEBHOOK_ALLOW").unwrap_or(""))
                .map_err(|e| anyhow!("HERALD_WEBHOOK_ALLOW: {e}"))?,
            metrics_addr,
            unsubscribe_url,
            http,
            log_format,
            shutdown_grace: Duration::from_secs(number(
                "HERALD_SHUTDOWN_GRACE_SECONDS",
                30,
                0,
                3600,
            )?),
        })
    }

    /// One line for the start-up log: no secrets.
    pub fn summary(&self) -> String {
        let providers: Vec<String> = self.smtp.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "database {:?}, concurrency {}, lease {}s, poll {}ms, smtp [{}], maildir {}, webhook signing {}, allow [{}], metrics {}",
            self.database.get_dbname().unwrap_or("?"),
            self.concurrency,
            self.lease.as_secs(),
            self.poll_interval.as_millis(),
            providers.join(", "),
            self.maildir.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "off".into()),
            if self.webhook_secret.is_some() { "on" } else { "off" },
            self.webhook_allow,
            self.metrics_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        )
    }
}

/// A config file: a flat TOML table whose keys are the environment variables' names.
pub fn parse_toml(text: &str) -> Result<BTreeMap<String, String>> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| anyhow!("{}", e.message()))?;
    let mut out = BTreeMap::new();
    for (key, value) in table {
        let upper = key.to_ascii_uppercase();
        if !KEYS.contains(&upper.as_str()) && !upper.starts_with(SMTP_PREFIX) {
            bail!(
                "unknown key {key:?} (known: {}, {SMTP_PREFIX}<NAME>)",
                KEYS.join(", ")
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
