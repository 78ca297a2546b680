//! Notifier: one connection LISTENing on `herald.outbox` (jobs to claim) and `herald.tick` (enrollments
//! due). A notification only wakes the producer or the maintenance loop; they find the work themselves,
//! so a lost notification costs at most one fallback poll. Reconnects forever with back-off, and wakes
//! everyone after each (re)connection, since notifications sent meanwhile are gone. A lost connection
//! is logged; failed attempts to reconnect are `DbHealth`'s to report.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::db_health::DbHealth;
use super::pg::{self, Backoff};

pub struct Notifier {
    pub db: Arc<DbHealth>,
    pub outbox: Arc<Notify>,
    pub tick: Arc<Notify>,
    pub shutdown: CancellationToken,
}

impl Notifier {
    pub async fn run(self) {
        let mut backoff = Backoff::default();
        while !self.shutdown.is_cancelled() {
            let session = tokio::select! {
                () = self.shutdown.cancelled() => break,
                s = self.session(&mut backoff) => s,
            };
            match session {
                Ok(()) => break,
                Err(Lost::Connecting(e)) => {
                    tracing::debug!(error = %pg::describe(&e), "cannot connect");
                }
                Err(Lost::Listening(e)) => {
                    tracing::warn!(error = %e, "LISTEN connection lost; reconnecting (polling meanwhile)");
                }
            }
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = self.db.pause(backoff.step()) => {}
            }
        }
    }

    /// One connection's life: Ok when shut down, Err when the connection failed.
    async fn session(&self, backoff: &mut Backoff) -> Result<(), Lost> {
        let config = pg::settings(self.db.config(), "notifier");
        let (client, mut messages) = match crate::db::connect(&config).await {
            Ok(c) => {
                self.db.ok();
                c
            }
            Err(e) => {
                self.db.failed(&e);
                return Err(Lost::Connecting(e));
            }
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                match m {
                    Ok(m) => {
                        if tx.send(m).is_err() {
                            return Ok(());
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        client
            .batch_execute(r#"LISTEN "herald.outbox"; LISTEN "herald.tick""#)
            .await
            .map_err(|e| Lost::Listening(pg::describe(&e)))?;
        tracing::info!("listening on herald.outbox and herald.tick");
        backoff.reset();
        self.outbox.notify_one();
        self.tick.notify_one();
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return Ok(()),
                m = rx.recv() => match m {
                    Some(AsyncMessage::Notification(n)) => match n.channel() {
                        "herald.outbox" => self.outbox.notify_one(),
                        "herald.tick" => self.tick.notify_one(),
                        _ => {}
                    },
                    Some(_) => {}
                    None => {
                        drop(client);
                        return Err(Lost::Listening(match driver.await {
                            Ok(Err(e)) => pg::describe(&e),
                            _ => "the server closed the connection".to_string(),
                        }));
                    }
                },
            }
        }
    }
}

/// Why a session ended: an attempt to connect failed (reported to `DbHealth`), or an established
/// LISTEN connection was lost.
enum Lost {
    Connecting(tokio_postgres::Error),
    Listening(String),
}
