//! Email jobs: render the template, build a multipart/alternative message (text + html), deliver it by
//! the provider's transport (`transport`: its kind decides, SMTP pool or file mailbox, never the other).
//! From and Reply-To come resolved in the claim's payload (broadcast > template > provider); without a
//! From there, HERALD_FROM.
//!
//! The Message-ID is derived from the job's id, workspace and dedupe key (`message_id`), so a
//! message sent again after a crash (its lease expired before the result was recorded) carries the same
//! Message-ID as the first copy and receivers can recognise it.
//!
//! SMTP replies: 4xx, connection, TLS and time-out errors are retried; 5xx and messages the client
//! cannot send at all fail permanently.

use std::collections::HashMap;
use std::path::PathBuf;

use hmac::{Hmac, KeyInit, Mac};
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::Message;
use serde_json::{json, Value as Json};
use sha2::Sha256;

use super::config::{Config, HttpSide, Keys, SMTP_PREFIX};
use super::job::{Job, Outcome};
use super::links::{self, message_id, Claims, Purpose};
use super::render::{RenderedEmail, Renderer, Vars};
use super::smtp_pool::{SendError, SmtpPool};
use super::transport::{Transport, Transports, Unavailable};

const LIST_UNSUBSCRIBE: HeaderName = HeaderName::new_from_ascii_str("List-Unsubscribe");
const LIST_UNSUBSCRIBE_POST: HeaderName = HeaderName::new_from_ascii_str("List-Unsubscribe-Post");

/// Whether an SMTP failure is worth retrying, and the error recorded for it ("451 4.3.0 try later").
pub fn classify_smtp(e: &lettre::transport::smtp::Error) -> (bool, String) {
    let detail = std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_default();
    let message = match e.status() {
        Some(code) => format!("{code} {detail}").trim().to_string(),
        None => e.to_string(),
    };
    let retryable = if e.is_permanent() {
        false
    } else if e.is_transient() {
        true
    } else {
        // a message the client refuses to send (e.g. a non-ASCII address the server cannot take) fails
        // the same way every time; connection, network, TLS and time-out errors may pass later
        !e.is_client()
    };
    (retryable, message)
}

/// Whether an SMTP failure ("550 5.1.1 user unknown", as `classify_smtp` records it) refuses the
/// recipient's address for good: a permanent reply whose enhanced status code (RFC 3463) is about the
/// destination address, X.1.* other than the sender's (5.1.7, 5.1.8). Without an enhanced code a 550
/// may as well be a policy or content refusal, so it is not taken as a bounce: suppressing a good
/// address is worse than trying it again.
pub fn hard_bounce(reply: &str) -> bool {
    let mut words = reply.split_whitespace();
    let basic_permanent = words.next().is_some_and(|c| {
        c.len() == 3 && c.starts_with('5') && c.bytes().all(|b| b.is_ascii_digit())
    });
    let enhanced: Vec<&str> = words.next().map_or(Vec::new(), |w| w.split('.').collect());
    let number = |p: &&str| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit());
    basic_permanent
        && enhanced.len() == 3
        && enhanced.iter().all(number)
        && enhanced[0] == "5"
        && enhanced[1] == "1"
        && !matches!(enhanced[2], "7" | "8")
}

pub struct Mailer {
    smtp: HashMap<String, SmtpPool>,
    maildir: Option<PathBuf>,
    transports: Transports,
    from: Mailbox,
    unsubscribe: Option<url::Url>,
    keys: std::sync::Arc<Keys>,
    /// With the HTTP side on: signed unsubscribe, click and open links in every email.
    http: Option<HttpSide>,
}

impl Mailer {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let mut smtp = HashMap::new();
        for (name, settings) in &config.smtp {
            let provider = SmtpPool::new(settings)
                .map_err(|e| anyhow::anyhow!("{}{name}: {e}", super::config::SMTP_PREFIX))?;
            smtp.insert(name.clone(), provider);
        }
        if let Some(dir) = &config.maildir {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("HERALD_MAILDIR {}: {e}", dir.display()))?;
        }
        Ok(Self {
            smtp,
            maildir: config.maildir.clone(),
            transports: Transports::new(config),
            from: config.from.clone(),
            unsubscribe: config.unsubscribe_url.clone(),
            keys: std::sync::Arc::clone(&config.keys),
            http: config.http.clone(),
        })
    }

    pub async fn send(&self, job: &Job, renderer: &Renderer, vars: &Vars) -> Outcome {
        let id = message_id(&job.workspace, &job.dedupe_key, Some(job.id));
        let provider = job
            .provider
            .as_deref()
            .or_else(|| job.payload.get("provider").and_then(Json::as_str))
            .unwrap_or("default");
        let kind = job.payload.get("provider_kind").and_then(Json::as_str);
        let transport = match self.transports.route(&job.workspace, provider, kind) {
            Ok(t) => t,
            // configuration can be fixed while the job waits for its next attempt
            Err(e @ Unavailable::Nothing(_)) => return Outcome::retry(e.to_string()),
            Err(e) => {
                tracing::error!(job = job.id, workspace = %job.workspace, provider, "email: {e}");
                return Outcome::permanent(e.to_string());
            }
        };
        let prepared = match self.prepare(job) {
            Ok(p) => p,
            Err(error) => return Outcome::permanent(error),
        };
        let template = match job.payload.get("template") {
            Some(t @ Json::Object(_)) => t,
            _ => {
                return Outcome::permanent(
                    "the template no longer exists (deleted after the job was queued)",
                )
            }
        };
        let rendered = match &prepared.tracking {
            Some((_, _, unsubscribe)) => {
                renderer
                    .render_email(template, &vars.with_unsubscribe_url(unsubscribe))
                    .await
            }
            None => renderer.render_email(template, vars).await,
        };
        let rendered = match rendered {
            Ok(r) => r,
            Err(e) => return e.outcome(),
        };
        let message = match self.build(job, &id, prepared, rendered) {
            Ok(m) => m,
            Err(error) => return Outcome::permanent(error),
        };
        match transport {
            Transport::Smtp(key) => self.send_smtp(&key, id, &message).await,
            Transport::File => self.write(id, &message).await,
        }
    }

    async fn send_smtp(&self, key: &str, id: String, message: &Message) -> Outcome {
        let Some(smtp) = self.smtp.get(key) else {
            // Transports and the pools are built from the same settings
            return Outcome::permanent(format!("no SMTP pool for {SMTP_PREFIX}{key}"));
        };
        match smtp.send(message.envelope(), &message.formatted()).await {
            Ok(reply) => {
                let text = reply.message().collect::<Vec<_>>().join(" ");
                Outcome::Done {
                    message_id: Some(id),
                    response: Some(json!({"smtp": format!("{} {text}", reply.code()).trim()})),
                }
            }
            Err(SendError::Smtp(e)) => {
                let (retryable, error) = classify_smtp(&e);
                if hard_bounce(&error) {
                    Outcome::Refused {
                        message_id: id,
                        error,
                    }
                } else {
                    Outcome::Failed { retryable, error }
                }
            }
            Err(e) => Outcome::retry(e.to_string()),
        }
    }

    async fn write(&self, id: String, message: &Message) -> Outcome {
        let Some(dir) = &self.maildir else {
            return Outcome::permanent("HERALD_MAILDIR is not set");
        };
        match write_file(dir, &id, &message.formatted()).await {
            Ok(path) => Outcome::Done {
                message_id: Some(id),
                response: Some(json!({"file": path})),
            },
            Err(e) => Outcome::retry(format!("writing to HERALD_MAILDIR {}: {e}", dir.display())),
        }
    }

    /// Addresses and links, before rendering.
    fn prepare(&self, job: &Job) -> Result<Prepared, String> {
        let p = &job.payload;
        let to_text = p
            .get("to")
            .and_then(Json::as_str)
            .ok_or("the job has no recipient (contact deleted?)")?;
        let to: Mailbox = to_text
            .parse()
            .map_err(|e| format!("invalid recipient {to_text:?}: {e}"))?;
        let from = match p.get("from").and_then(Json::as_str) {
            Some(f) => f
                .parse()
                .map_err(|e| format!("invalid from address {f:?}: {e}"))?,
            None => self.from.clone(),
        };
        let reply_to = match p.get("reply_to").and_then(Json::as_str) {
            Some(r) => Some(
                r.parse()
                    .map_err(|e| format!("invalid reply_to address {r:?}: {e}"))?,
            ),
            None => None,
        };
        // the HTTP side's links: one-click unsubscribe (also {{ unsubscribe_url }}), tracked clicks, a pixel
        let tracking = self.http.as_ref().map(|h| {
            let claims = Claims {
                purpose: Purpose::Unsubscribe,
                workspace: job.workspace.clone(),
                email: to_text.to_ascii_lowercase(),
                key: job.dedupe_key.clone(),
                job: Some(job.id),
                broadcast: p.get("broadcast_id").and_then(Json::as_i64),
                variation: p
                    .get("variation")
                    .and_then(Json::as_str)
                    .map(str::to_string),
                url: None,
            };
            let key = self.link_key(&job.workspace);
            let unsubscribe = format!("{}/u/{}", h.public_url, links::sign(key, &claims));
            (h.clone(), claims, unsubscribe)
        });
        Ok(Prepared {
            to_text: to_text.to_string(),
            to,
            from,
            reply_to,
            tracking,
        })
    }

    fn build(
        &self,
        job: &Job,
        id: &str,
        prepared: Prepared,
        mut rendered: RenderedEmail,
    ) -> Result<Message, String> {
        let Prepared {
            to_text,
            to,
            from,
            reply_to,
            tracking,
        } = prepared;
        if let Some((h, claims, _)) = &tracking {
            let key = self.link_key(&job.workspace);
            rendered.html = links::rewrite_links(&rendered.html, |url| {
                if url.starts_with(&format!("{}/", h.public_url)) {
                    return url.to_string(); // herald's own links (the unsubscribe link) stay as they are
                }
                let click = Claims {
                    purpose: Purpose::Click,
                    url: Some(url.to_string()),
                    ..claims.clone()
                };
                format!("{}/c/{}", h.public_url, links::sign(key, &click))
            });
            let open = Claims {
                purpose: Purpose::Open,
                ..claims.clone()
            };
            let pixel = format!(
                r#"<img src="{}/o/{}" width="1" height="1" alt="" style="display:none">"#,
                h.public_url,
                links::sign(key, &open)
            );
            match rendered.html.to_ascii_lowercase().rfind("</body>") {
                Some(at) => rendered.html.insert_str(at, &pixel),
                None => rendered.html.push_str(&pixel),
            }
        }
        let mut builder = Message::builder()
            .message_id(Some(id.to_string()))
            .date_now()
            .from(from)
            .to(to)
            .subject(rendered.subject);
        if let Some(reply_to) = reply_to {
            builder = builder.reply_to(reply_to);
        }
        let link = match &tracking {
            Some((_, _, unsubscribe)) => Some(unsubscribe.clone()),
            None => self.unsubscribe_link(&job.workspace, &to_text.to_ascii_lowercase()),
        };
        if let Some(link) = link {
            builder = builder
                .raw_header(HeaderValue::new(LIST_UNSUBSCRIBE, format!("<{link}>")))
                .raw_header(HeaderValue::new(
                    LIST_UNSUBSCRIBE_POST,
                    "List-Unsubscribe=One-Click".into(),
                ));
        }
        builder
            .multipart(MultiPart::alternative_plain_html(
                rendered.text,
                rendered.html,
            ))
            .map_err(|e| format!("cannot build the message: {e}"))
    }

    /// The key that signs this workspace's links (the HTTP side is on, so one exists).
    fn link_key(&self, workspace: &str) -> &[u8] {
        self.keys
            .link(workspace)
            .current
            .as_ref()
            .map_or(&[][..], |k| k.0.as_bytes())
    }

    /// `<base>?workspace=…&email=…[&token=…]`; the token (with a link key configured, or else the
    /// webhook secret) is hex(HMAC-SHA256(key, "unsubscribe:" + workspace + ":" + email))[..32], for
    /// the endpoint to check. The workspace's own link key when it has one.
    fn unsubscribe_link(&self, workspace: &str, email: &str) -> Option<String> {
        let mut url = self.unsubscribe.clone()?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("workspace", workspace)
                .append_pair("email", email);
            // the link key; the webhook secret only as the deprecated fallback (warned at start)
            let keys = [self.keys.link(workspace), self.keys.webhook(workspace)];
            if let Some(key) = keys.iter().find_map(|k| k.current.as_ref()) {
                q.append_pair(
                    "token",
                    &unsubscribe_token(key.0.as_bytes(), workspace, email),
                );
            }
        }
        Some(url.to_string())
    }
}

/// What `prepare` found: recipient, sender, Reply-To, and with the HTTP side its settings, the link claims and
/// the unsubscribe link.
struct Prepared {
    to_text: String,
    to: Mailbox,
    from: Mailbox,
    reply_to: Option<Mailbox>,
    tracking: Option<(HttpSide, Claims, String)>,
}

pub fn unsubscribe_token(key: &[u8], workspace: &str, email: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("unsubscribe:{workspace}:{email}").as_bytes());
    hex::encode(mac.finalize().into_bytes())[..32].to_string()
}

/// Writes `<dir>/<id without brackets>.eml` through a temporary name and a rename, so a reader never
/// sees half a message. A resend replaces the file of the same Message-ID.
pub async fn write_file(dir: &std::path::Path, id: &str, bytes: &[u8]) -> std::io::Result<String> {
    let name = format!("{}.eml", id.trim_start_matches('<').trim_end_matches('>'));
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let path = dir.join(&name);
    tokio::fs::write(&tmp, bytes).await?;
    if let Err(e) = tokio::fs::rename(&tmp, &path).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    Ok(path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_follow_the_job_workspace_and_dedupe_key() {
        let id = message_id("acme", "send:1", Some(17));
        assert_eq!(id.len(), 1 + 16 + 1 + 32 + "@herald>".len());
        assert!(id.starts_with("<0000000000000011.") && id.ends_with("@herald>"));
        assert_eq!(id, message_id("acme", "send:1", Some(17)));
        assert_ne!(id, message_id("acme", "send:2", Some(17)));
        // the same key in another workspace is another message
        assert_ne!(id, message_id("globex", "send:1", Some(17)));
        // sha256("acme\nabc"); without a job id, the form before 0.9.0 (links signed before it)
        assert_eq!(
            message_id("acme", "abc", Some(0x1_0000_0000)),
            "<0000000100000000.9cf5df17ede6ceb7b99c45b77006317f@herald>"
        );
        assert_eq!(
            message_id("acme", "abc", None),
            "<9cf5df17ede6ceb7b99c45b77006317f@herald>"
        );
        // later jobs sort after earlier ones, as text (the index the history is probed by)
        let ids: Vec<_> = [9_i64, 10, 255, 256, 70_000, 1 << 40]
            .iter()
            .map(|&j| message_id("acme", "abc", Some(j)))
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }

    #[test]
    fn address_refusals_are_hard_bounces() {
        for reply in [
            "550 5.1.1 mailbox unavailable",
            "550 5.1.1 <ann@example.com>: Recipient address rejected: User unknown",
            "551 5.1.6 moved",
            "553 5.1.3 bad address syntax",
            "550 5.1.10 null MX",
        ] {
            assert!(hard_bounce(reply), "{reply}");
        }
        for reply in [
            "450 4.1.1 try later",         // transient
            "550 5.7.1 rejected as spam",  // policy or content, not the address
            "553 5.1.8 bad sender domain", // the sender's address, not the recipient's
            "550 5.1.7 bad sender syntax",
            "550 no such user", // no enhanced code: could be anything
            "550",
            "5.1.1 user unknown",
            "550 5.1 user unknown",
            "550 4.1.1 odd",
            "",
        ] {
            assert!(!hard_bounce(reply), "{reply}");
        }
    }

    #[test]
    fn unsubscribe_tokens_are_keyed() {
        let a = unsubscribe_token(b"k", "acme", "ann@example.com");
        assert_eq!(a.len(), 32);
        assert_ne!(a, unsubscribe_token(b"k2", "acme", "ann@example.com"));
        assert_ne!(a, unsubscribe_token(b"k", "acme", "bob@example.com"));
    }

    #[tokio::test]
    async fn files_appear_whole_under_the_message_id() {
        let dir = std::env::temp_dir().join(format!("herald-maildir-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = write_file(&dir, "<abc@herald>", b"Subject: x\r\n\r\nbody")
            .await
            .unwrap();
        assert!(path.ends_with("abc@herald.eml"));
        assert_eq!(std::fs::read(&path).unwrap(), b"Subject: x\r\n\r\nbody");
        write_file(&dir, "<abc@herald>", b"again").await.unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
