//! Connecting to Postgres. One place decides the default target so every subcommand agrees:
//! `DATABASE_URL` when given, else the local socket as the current OS user (peer auth).

use anyhow::{bail, Context, Result};
use tokio_postgres::{Client, Config, NoTls};

use crate::compat::{self, Verdict};

/// Where to connect; can hand out connections to sibling databases (demo and bench make their own).
#[derive(Clone, Debug)]
pub struct Target {
    config: Config,
}

/// The OS user, which peer authentication maps to the database role of the same name.
pub fn os_user() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            let out = std::process::Command::new("id").arg("-un").output().ok()?;
            Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap_or_else(|| "postgres".to_string())
}

impl Target {
    pub fn new(database_url: Option<String>) -> Self {
        let config = match database_url {
            Some(url) => url.parse().unwrap_or_else(|e| {
                eprintln!("herald: DATABASE_URL is not a valid connection string: {e}");
                std::process::exit(2)
            }),
            None => {
                let mut c = Config::new();
                c.host_path("/var/run/postgresql");
                c.user(os_user());
                c.dbname("herald");
                c
            }
        };
        Self { config }
    }

    /// The same server and credentials, another database.
    pub fn with_dbname(&self, dbname: &str) -> Self {
        let mut config = self.config.clone();
        config.dbname(dbname);
        Self { config }
    }

    /// The connection settings (the daemon reuses them as they are, password included).
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dbname(&self) -> &str {
        self.config.get_dbname().unwrap_or("herald")
    }

    pub async fn connect(&self) -> Result<Client> {
        let (client, connection) = self
            .config
            .connect(NoTls)
            .await
            .with_context(|| format!("connecting to database {:?}", self.dbname()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection closed");
            }
        });
        Ok(client)
    }

    /// A connection to a database with a herald extension this binary fits (see [`compat`]); for the
    /// subcommands that use an existing installation.
    pub async fn connect_herald(&self) -> Result<Client> {
        let client = self.connect().await?;
        check_extension(&client, self.dbname()).await?;
        Ok(client)
    }

    /// Drops and re-creates this target's database with the extension installed (demo and bench
    /// run in databases of their own so they never touch real data).
    pub async fn recreate_with_extension(&self) -> Result<Client> {
        let admin = self.with_dbname("postgres").connect().await?;
        let name = self.dbname().replace('"', "\"\"");
        // two round trips: DROP/CREATE DATABASE refuse to run inside the implicit transaction of a batch
        for sql in [
            format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
            format!("CREATE DATABASE \"{name}\""),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .with_context(|| format!("re-creating database {name}"))?;
        }
        let client = self.connect().await?;
        client
            .batch_execute("CREATE EXTENSION herald")
            .await
            .context("CREATE EXTENSION herald (run `make install` first)")?;
        Ok(client)
    }
}

/// Reads the installed extension's version and applies [`compat::check`]: refuses with a message that
/// says what to run, or warns and goes on.
pub async fn check_extension(client: &Client, dbname: &str) -> Result<()> {
    let installed: Option<String> = client
        .query_opt(
            "SELECT extversion FROM pg_extension WHERE extname = 'herald'",
            &[],
        )
        .await
        .context("reading the installed herald extension version")?
        .map(|row| row.get(0));
    match compat::check(installed.as_deref(), dbname) {
        Verdict::Fits => Ok(()),
        Verdict::Warn(message) => {
            tracing::warn!("{message}");
            Ok(())
        }
        Verdict::Refuse(message) => bail!(message),
    }
}
