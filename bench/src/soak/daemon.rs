//! `herald run` as users run it: the `herald` binary built next to `herald-bench` (or the one
//! `HERALD_SOAK_DAEMON` names), a child process with
//! its settings in the environment and its log (text, stderr and stdout) in a file the soak reads for
//! error lines. Stopped with SIGTERM (its graceful path), killed if it outlives the grace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio_postgres::config::Host;
use tokio_postgres::Config;

pub struct Daemon {
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(config: &Config, log: &Path, settings: &[(&str, String)]) -> Result<Self> {
        // HERALD_SOAK_DAEMON: another build of the daemon against the same load (an A/B of two
        // daemons); by default the one built beside herald-bench
        let bin = match std::env::var_os("HERALD_SOAK_DAEMON") {
            Some(path) => PathBuf::from(path),
            None => std::env::current_exe()
                .context("locating herald-bench")?
                .with_file_name("herald"),
        };
        if !bin.is_file() {
            bail!(
                "{} not found: build it with `make build` (the soak runs the daemon binary)",
                bin.display()
            );
        }
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(&bin);
        command
            .arg("run")
            .env("DATABASE_URL", dsn(config))
            .env("HERALD_LOG_FORMAT", "text")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        for (k, v) in settings {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then up to `grace` for it to finish its in-flight work; killed after that.
    pub async fn stop(mut self, grace: Duration) -> Result<()> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "herald run did not stop within {} s of SIGTERM",
            grace.as_secs()
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Lines of the daemon's text log at ERROR and at WARN level (`<time> LEVEL target: message`).
pub fn log_levels(log: &Path) -> (usize, usize, Vec<String>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let (mut errors, mut warnings, mut first) = (0, 0, Vec::new());
    for line in text.lines() {
        match line.split_whitespace().nth(1) {
            Some("ERROR") => {
                errors += 1;
                if first.len() < 5 {
                    first.push(line.to_string());
                }
            }
            Some("WARN") => warnings += 1,
            _ => {}
        }
    }
    (errors, warnings, first)
}

/// The connection settings as a key=value string for the child's DATABASE_URL.
fn dsn(config: &Config) -> String {
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut parts = Vec::new();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    if !hosts.is_empty() {
        parts.push(format!("host={}", quote(&hosts.join(","))));
    }
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    if !ports.is_empty() {
        parts.push(format!("port={}", ports.join(",")));
    }
    if let Some(user) = config.get_user() {
        parts.push(format!("user={}", quote(user)));
    }
    if let Some(password) = config.get_password() {
        parts.push(format!(
            "password={}",
            quote(&String::from_utf8_lossy(password))
        ));
    }
    if let Some(db) = config.get_dbname() {
        parts.push(format!("dbname={}", quote(db)));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsn_round_trips() {
        let mut c = Config::new();
        c.host_path("/var/run/postgresql");
        c.user("o'neil");
        c.password("p w");
        c.dbname("herald_bench_soak");
        let back: Config = dsn(&c).parse().expect("parses");
        assert_eq!(back.get_user(), Some("o'neil"));
        assert_eq!(back.get_password(), Some(&b"p w"[..]));
        assert_eq!(back.get_dbname(), Some("herald_bench_soak"));
        assert!(
            matches!(&back.get_hosts()[0], Host::Unix(p) if p == Path::new("/var/run/postgresql"))
        );
    }

    #[test]
    fn counts_levels() {
        let path = std::env::temp_dir().join(format!("soak-log-{}", std::process::id()));
        std::fs::write(
            &path,
            "2026-12-06T07:00:00Z  INFO herald_sidecar::run: started\n\
             2026-12-06T07:00:01Z ERROR herald_sidecar::run::producer: claim failed\n\
             2026-12-06T07:00:02Z  WARN herald_sidecar::run: slow\n",
        )
        .unwrap();
        let (errors, warnings, first) = log_levels(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!((errors, warnings), (1, 1));
        assert!(first[0].contains("claim failed"));
    }
}
