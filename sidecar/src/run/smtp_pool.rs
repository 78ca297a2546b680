//! A pool of SMTP connections per provider, built on lettre's `AsyncSmtpConnection`.
//!
//! Why not lettre's own pooled transport: it never sets `TCP_NODELAY`, and it writes a message and its
//! `\r\n.\r\n` terminator in two writes. With Nagle on, the terminator waits for the ACK of the body,
//! which the server delays (~40 ms on Linux): every message on a connection stalls that long, so a pool
//! of N connections tops out near N × 25 messages/s. Here each connection is opened by us with
//! `TCP_NODELAY` set and handed to lettre (`connect_with_transport`), which then does the SMTP dialogue
//! (EHLO, STARTTLS, AUTH, MAIL/RCPT/DATA) as before. Implicit TLS (`smtps://`) still goes through
//! lettre's own connect, so it keeps the stall; STARTTLS (the usual submission setup) does not.
//!
//! At most `pool` messages are in flight per provider; idle connections are reused, checked with a
//! NOOP when they have been idle a while, and closed after `IDLE_TIMEOUT`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::config::{SmtpSettings, SmtpTls};

/// Connect, greeting, EHLO, STARTTLS and AUTH together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// One message's MAIL, RCPT, DATA and the final reply.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections older than this are closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection idle longer than this is checked with NOOP before reuse (the server may have closed it).
const CHECK_AFTER: Duration = Duration::from_secs(5);

/// Why a send failed, for the caller's retry decision.
#[derive(Debug)]
pub enum SendError {
    Smtp(lettre::transport::smtp::Error),
    /// Connecting failed (refused, unreachable, DNS): always worth a retry.
    Io(std::io::Error),
    Timeout(&'static str),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Smtp(e) => write!(f, "{e}"),
            SendError::Io(e) => write!(f, "connecting to the SMTP server: {e}"),
            SendError::Timeout(what) => write!(f, "SMTP {what} timed out"),
        }
    }
}

impl From<lettre::transport::smtp::Error> for SendError {
    fn from(e: lettre::transport::smtp::Error) -> Self {
        SendError::Smtp(e)
    }
}

pub struct SmtpPool {
    settings: SmtpSettings,
    tls: Option<TlsParameters>,
    credentials: Option<Credentials>,
    hello: ClientId,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    /// At most `pool` messages in flight (each holds one connection while it sends).
    slots: Semaphore,
}

impl SmtpPool {
    pub fn new(settings: &SmtpSettings) -> Result<Self, lettre::transport::smtp::Error> {
        let tls = match settings.tls {
            SmtpTls::None => None,
            _ => Some(TlsParameters::new(settings.host.clone())?),
        };
        let credentials = settings.user.as_ref().map(|user| {
            Credentials::new(user.clone(), settings.password.clone().unwrap_or_default())
        });
        Ok(Self {
            settings: settings.clone(),
            tls,
            credentials,
            hello: ClientId::default(),
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(settings.pool as usize),
        })
    }

    /// Sends one message on a pooled (or new) connection; the connection goes back to the pool only if
    /// the whole transaction succeeded.
    pub async fn send(&self, envelope: &Envelope, message: &[u8]) -> Result<Response, SendError> {
        let _slot = self.slots.acquire().await.expect("never closed");
        let mut conn = match self.take_idle().await {
            Some(conn) => conn,
            None => tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
                .await
                .map_err(|_| SendError::Timeout("connect"))??,
        };
        match tokio::time::timeout(SEND_TIMEOUT, conn.send(envelope, message)).await {
            Ok(Ok(reply)) => {
                if !conn.has_broken() {
                    self.idle
                        .lock()
                        .expect("not poisoned")
                        .push((conn, Instant::now()));
                }
                Ok(reply)
            }
            Ok(Err(e)) => {
                // lettre leaves a failed transaction half-way; a fresh connection is simpler than RSET
                conn.abort().await;
                Err(SendError::Smtp(e))
            }
            Err(_) => Err(SendError::Timeout("send")),
        }
    }

    /// The most recently used idle connection that is still good, closing stale ones on the way.
    async fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        loop {
            let (mut conn, since) = self.idle.lock().expect("not poisoned").pop()?;
            let idle = since.elapsed();
            if idle > IDLE_TIMEOUT {
                conn.abort().await;
                continue;
            }
            if idle > CHECK_AFTER && !conn.test_connected().await {
                conn.abort().await;
                continue;
            }
            return Some(conn);
        }
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let s = &self.settings;
        let mut conn = if s.tls == SmtpTls::Wrapper {
            AsyncSmtpConnection::connect_tokio1(
                (s.host.as_str(), s.port),
                Some(CONNECT_TIMEOUT),
                &self.hello,
                self.tls.clone(),
                None,
            )
            .await?
        } else {
            let tcp = TcpStream::connect((s.host.as_str(), s.port))
                .await
                .map_err(SendError::Io)?;
            tcp.set_nodelay(true).map_err(SendError::Io)?;
            let mut conn =
                AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello).await?;
            match (&s.tls, &self.tls) {
                (SmtpTls::Required, Some(params)) => {
                    conn.starttls(params.clone(), &self.hello).await?;
                }
                (SmtpTls::Opportunistic, Some(params)) if conn.can_starttls() => {
                    conn.starttls(params.clone(), &self.hello).await?;
                }
                _ => {}
            }
            conn
        };
        if let Some(credentials) = &self.credentials {
            conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await?;
        }
        Ok(conn)
    }
}
