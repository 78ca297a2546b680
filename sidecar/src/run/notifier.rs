//! Notifier: one connection LISTENing on `herald.outbox` (jobs to claim) and `herald.tick` (enrollments
//! due). A notification only wakes the producer or the maintenance loop; they find the work themselves,
//! so a lost notification costs at most one fallback poll. Reconnects forever with back-off, and wakes
//! everyone after each (re)connection, since notifications sent meanwhile are gone.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::{AsyncMessage, Config, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::instrument::WithSubscriber;

use super::pg::Backoff;

pub struct Notifier {
    pub db: Config,
    pub outbox: Arc<Notify>,
    pub tick: Arc<Notify>,
    pub shutdown: CancellationToken,
}

impl Notifier {
    pub async fn run(self) {
        let mut backoff = Backoff::default();
        let mut failures = 0u32;
        while !self.shutdown.is_cancelled() {
            match self.session(&mut backoff).await {
                Ok(()) => break,
                Err(e) => {
                    failures += 1;
                    // the first failure and then every tenth, so an outage does not flood the log
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(error = %e, failures, "LISTEN connection lost; reconnecting (polling meanwhile)");
                    }
                }
            }
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = tokio::time::sleep(backoff.step()) => {}
            }
        }
    }

    /// One connection's life: Ok when shut down, Err when the connection failed.
    async fn session(&self, backoff: &mut Backoff) -> anyhow::Result<()> {
        let mut config = self.db.clone();
        config.application_name("herald run: notifier");
        let (client, mut connection) = config.connect(NoTls).await?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(
            async move {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
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
            }
            .with_current_subscriber(),
        );
        client
            .batch_execute(r#"LISTEN "herald.outbox"; LISTEN "herald.tick""#)
            .await?;
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
                        return match driver.await {
                            Ok(Err(e)) => Err(e.into()),
                            _ => Err(anyhow::anyhow!("the server closed the connection")),
                        };
                    }
                },
            }
        }
    }
}
