//! Database connections of `herald run`: each component keeps its own and reconnects with back-off.
//! Server notices (e.g. complete()'s WARNING about ignored results) are logged, never dropped.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};
use tracing::instrument::WithSubscriber;

/// Opens a connection named after the component (`application_name`, visible in pg_stat_activity).
pub async fn connect(
    config: &Config,
    component: &'static str,
) -> Result<Client, tokio_postgres::Error> {
    let mut config = config.clone();
    config.application_name(format!("herald run: {component}"));
    config.connect_timeout(Duration::from_secs(10));
    let (client, mut connection) = config.connect(NoTls).await?;
    tokio::spawn(
        async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notice(n)) => match n.severity() {
                        "WARNING" | "ERROR" => tracing::warn!(component, "server: {}", n.message()),
                        _ => tracing::debug!(component, "server: {}", n.message()),
                    },
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(component, error = %e, "connection closed");
                        break;
                    }
                }
            }
        }
        .with_current_subscriber(),
    );
    Ok(client)
}

/// Exponential back-off with jitter: 100 ms, 200 ms, … up to 30 s.
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// The delay to wait now (between half and all of the current step); doubles the next one.
    pub fn step(&mut self) -> Duration {
        let current = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        current / 2 + current.mul_f64(f64::from(nanos % 1000) / 2000.0)
    }
}

/// True when the error says a function is not installed (an older herald build).
pub fn is_undefined_function(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_FUNCTION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap() {
        let mut b = Backoff::default();
        let first = b.step();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            assert!(b.step() <= Duration::from_secs(30));
        }
        assert!(b.step() >= Duration::from_secs(15));
        b.reset();
        assert!(b.step() <= Duration::from_millis(100));
    }
}
