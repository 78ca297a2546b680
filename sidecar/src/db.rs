//! Connecting to Postgres. One place decides the default target so every subcommand agrees:
//! `DATABASE_URL` when given, else the local socket as the current OS user (peer auth).
//!
//! TLS (rustls): `sslmode=require` encrypts without checking the server (as libpq, unless
//! `sslrootcert` is given: then as verify-ca), `verify-ca` checks the certificate chain, `verify-full`
//! the chain and the host name. Roots: `sslrootcert=<PEM file>`, else the system's CA store (else
//! webpki-roots). tokio-postgres knows neither verify-* nor sslrootcert, so [`parse_database_url`]
//! takes them out of the string and hands tokio-postgres `sslmode=require`; what it took out is kept
//! for the process ([`tls`]), so every connection made from that configuration uses it.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context, Result};
use tokio_postgres::config::SslMode;
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
            Some(url) => parse_database_url(&url).unwrap_or_else(|e| {
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
        let (client, messages) = connect(&self.config)
            .await
            .with_context(|| format!("connecting to database {:?}", self.dbname()))?;
        tokio::spawn(drive(messages));
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
        .map_err(|e| {
            anyhow::anyhow!(
                "reading the installed herald extension version: {}",
                describe(&e)
            )
        })?
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

// ------------------------------------------------------------------------------------------------ TLS

/// What DATABASE_URL says about TLS beyond what tokio-postgres reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// The sslmode given (None: not given; tokio-postgres's default, prefer, then means no TLS here).
    pub mode: Option<TlsMode>,
    pub root_cert: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl TlsSettings {
    /// How the server's certificate is checked: not at all, its chain, or its chain and name.
    fn verify(&self) -> Verify {
        match self.mode {
            Some(TlsMode::VerifyFull) => Verify::Full,
            Some(TlsMode::VerifyCa) => Verify::Chain,
            // libpq: require with a root certificate behaves as verify-ca
            Some(TlsMode::Require) if self.root_cert.is_some() => Verify::Chain,
            _ => Verify::Nothing,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verify {
    Nothing,
    Chain,
    Full,
}

/// The connector for the process's DATABASE_URL (set by [`parse_database_url`]).
static TLS: RwLock<Option<RustlsConnect>> = RwLock::new(None);

/// The connector for connections with sslmode=require: DATABASE_URL's, or one that encrypts without
/// checking (a configuration made without [`parse_database_url`]).
fn connector() -> RustlsConnect {
    if let Some(c) = TLS.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
        return c.clone();
    }
    rustls_connector(&TlsSettings {
        mode: Some(TlsMode::Require),
        root_cert: None,
    })
    .expect("a connector that checks nothing reads no file and cannot fail")
}

/// Why DATABASE_URL was refused: its TLS settings (the message is safe to show) or anything else
/// (the parser's message may quote the string, password included).
#[derive(Debug)]
pub enum UrlError {
    Tls(String),
    Other(String),
}

impl std::fmt::Display for UrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tls(e) | Self::Other(e) => f.write_str(e),
        }
    }
}

/// Parses DATABASE_URL (URL or key=value form), taking out `sslmode=verify-ca|verify-full` and
/// `sslrootcert=…` (which tokio-postgres refuses), and remembers them for the process.
pub fn parse_database_url(url: &str) -> Result<Config, UrlError> {
    let (rest, settings) = split_tls(url).map_err(UrlError::Tls)?;
    let mut config: Config = rest.parse().map_err(|e| UrlError::Other(format!("{e}")))?;
    match settings.mode {
        Some(TlsMode::Disable) => {
            config.ssl_mode(SslMode::Disable);
        }
        Some(TlsMode::Allow | TlsMode::Prefer) | None => {}
        Some(TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull) => {
            config.ssl_mode(SslMode::Require);
        }
    }
    if config.get_ssl_mode() == SslMode::Require {
        // built now, so that a bad root certificate file stops the start with its reason
        let connector = rustls_connector(&settings).map_err(UrlError::Tls)?;
        *TLS.write().unwrap_or_else(|p| p.into_inner()) = Some(connector);
    }
    Ok(config)
}

/// The connection string without sslmode/sslrootcert, and what they said.
pub fn split_tls(url: &str) -> Result<(String, TlsSettings), String> {
    let mut settings = TlsSettings::default();
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => {
                settings.mode = Some(match value {
                    "disable" => TlsMode::Disable,
                    "allow" => TlsMode::Allow,
                    "prefer" => TlsMode::Prefer,
                    "require" => TlsMode::Require,
                    "verify-ca" => TlsMode::VerifyCa,
                    "verify-full" => TlsMode::VerifyFull,
                    other => {
                        return Err(format!(
                            "sslmode must be disable, allow, prefer, require, verify-ca or verify-full, got {other:?}"
                        ))
                    }
                });
                Ok(true)
            }
            "sslrootcert" => {
                settings.root_cert = Some(PathBuf::from(value));
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let decoded = percent_encoding::percent_decode_str(v)
                        .decode_utf8()
                        .map_err(|_| format!("{k}: not UTF-8 once decoded"))?;
                    if !take(k, &decoded)? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        // key = value pairs; values may be single-quoted with \\ and \' escapes
        let mut kept = String::new();
        let mut chars = url.char_indices().peekable();
        while let Some(&(start, c)) = chars.peek() {
            if c.is_whitespace() {
                chars.next();
                continue;
            }
            let mut key = String::new();
            while let Some(&(_, c)) = chars.peek() {
                if c == '=' || c.is_whitespace() {
                    break;
                }
                key.push(c);
                chars.next();
            }
            while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
                chars.next();
            }
            if chars.peek().map(|(_, c)| *c) != Some('=') {
                return Err(format!("expected = after {key:?}"));
            }
            chars.next();
            while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
                chars.next();
            }
            let mut value = String::new();
            if chars.peek().map(|(_, c)| *c) == Some('\'') {
                chars.next();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, c)) => value.push(c),
                            None => return Err("unterminated quoted value".into()),
                        },
                        Some((_, '\'')) => break,
                        Some((_, c)) => value.push(c),
                        None => return Err("unterminated quoted value".into()),
                    }
                }
            } else {
                while let Some(&(_, c)) = chars.peek() {
                    if c.is_whitespace() {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
            let end = chars.peek().map_or(url.len(), |(i, _)| *i);
            if !take(&key, &value)? {
                if !kept.is_empty() {
                    kept.push(' ');
                }
                kept.push_str(&url[start..end]);
            }
        }
        kept
    };
    Ok((rest, settings))
}

/// A connection's server messages (notices); the connection runs while this is polled and ends
/// with it.
pub type Messages = std::pin::Pin<
    Box<
        dyn futures_util::Stream<Item = Result<tokio_postgres::AsyncMessage, tokio_postgres::Error>>
            + Send,
    >,
>;

/// Connects with TLS when the configuration requires it (the connector of [`parse_database_url`]),
/// else without.
pub async fn connect(config: &Config) -> Result<(Client, Messages), tokio_postgres::Error> {
    fn messages<S, T>(mut connection: tokio_postgres::Connection<S, T>) -> Messages
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        Box::pin(futures_util::stream::poll_fn(move |cx| {
            connection.poll_message(cx)
        }))
    }
    if config.get_ssl_mode() == SslMode::Require {
        let (client, connection) = config.connect(connector()).await?;
        Ok((client, messages(connection)))
    } else {
        let (client, connection) = config.connect(NoTls).await?;
        Ok((client, messages(connection)))
    }
}

/// The error with its causes: tokio-postgres prints only its kind ("db error", "error connecting to
/// server") and keeps the server's message or the OS error in the source chain.
pub fn describe(e: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string().replace('\n', " "));
        source = s.source();
    }
    text
}

/// Drives a connection to its end, logging only how it ended (for the command-line tools).
pub async fn drive(mut messages: Messages) {
    use futures_util::StreamExt;
    while let Some(m) = messages.next().await {
        if let Err(e) = m {
            tracing::debug!(error = %describe(&e), "connection closed");
            break;
        }
    }
}

/// tokio-postgres's TLS hooks over tokio-rustls.
#[derive(Clone)]
pub struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
}

pub struct RustlsConnectOne {
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for RustlsConnect
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnectOne;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> std::io::Result<RustlsConnectOne> {
        let name = rustls::pki_types::ServerName::try_from(domain.to_string()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{domain:?} is not a host name TLS can check"),
            )
        })?;
        Ok(RustlsConnectOne {
            config: Arc::clone(&self.config),
            name,
        })
    }
}

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnectOne
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<RustlsStream<S>>> + Send>,
    >;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move { connector.connect(self.name, stream).await.map(RustlsStream) })
    }
}

impl<S> tokio::io::AsyncRead for RustlsStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S> tokio::io::AsyncWrite for RustlsStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S> tokio_postgres::tls::TlsStream for RustlsStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        // SCRAM without channel binding (as libpq with channel_binding=prefer against a server that
        // does not require it)
        tokio_postgres::tls::ChannelBinding::none()
    }
}

/// The rustls client configuration for these settings.
pub fn rustls_connector(settings: &TlsSettings) -> Result<RustlsConnect, String> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match &settings.root_cert {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "sslrootcert {}: no certificate in it",
                    path.display()
                ));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| e.to_string());

    /// verify-ca: the chain is checked, the name is not; require: nothing is checked.
    #[derive(Debug)]
    struct Lenient {
        chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
        provider: Arc<rustls::crypto::CryptoProvider>,
    }
    impl ServerCertVerifier for Lenient {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let Some(chain) = &self.chain else {
                return Ok(ServerCertVerified::assertion());
            };
            match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
                Ok(v) => Ok(v),
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                Err(e) => Err(e),
            }
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    let config = match settings.verify() {
        Verify::Full => builder.with_webpki_verifier(webpki?).with_no_client_auth(),
        Verify::Chain => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient {
                chain: Some(webpki?),
                provider: Arc::clone(&provider),
            }))
            .with_no_client_auth(),
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient {
                chain: None,
                provider: Arc::clone(&provider),
            }))
            .with_no_client_auth(),
    };
    Ok(RustlsConnect {
        config: Arc::new(config),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_come_out_of_both_forms() {
        let (rest, s) = split_tls(
            "postgres://u:p@db.example.com:5432/herald?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p@db.example.com:5432/herald?application_name=x"
        );
        assert_eq!(s.mode, Some(TlsMode::VerifyFull));
        assert_eq!(
            s.root_cert.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(s.verify(), Verify::Full);

        let (rest, s) = split_tls(
            "host=db.example.com sslmode = verify-ca  dbname='her ald' sslrootcert='/a b/c\\'d.pem' user=x",
        )
        .unwrap();
        assert_eq!(rest, "host=db.example.com dbname='her ald' user=x");
        assert_eq!(s.mode, Some(TlsMode::VerifyCa));
        assert_eq!(
            s.root_cert.as_deref(),
            Some(std::path::Path::new("/a b/c'd.pem"))
        );
        assert_eq!(s.verify(), Verify::Chain);

        let (_, s) = split_tls("postgres://h/db?sslmode=require").unwrap();
        assert_eq!(
            (s.mode, s.verify()),
            (Some(TlsMode::Require), Verify::Nothing)
        );
        let (_, s) = split_tls("host=h sslmode=require sslrootcert=/x").unwrap();
        assert_eq!(
            s.verify(),
            Verify::Chain,
            "require + root cert: as libpq, verify-ca"
        );
        let (rest, s) = split_tls("host=/var/run/postgresql dbname=herald").unwrap();
        assert_eq!(
            (rest.as_str(), s),
            (
                "host=/var/run/postgresql dbname=herald",
                TlsSettings::default()
            )
        );
        assert_eq!(split_tls("postgres://h/db").unwrap().0, "postgres://h/db");

        for bad in [
            "postgres://h/db?sslmode=maybe",
            "host=h sslmode=secure",
            "host",
            "host='x",
        ] {
            assert!(split_tls(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokio_postgres_gets_require_for_every_checking_mode() {
        for (url, mode) in [
            ("postgres://h/db?sslmode=verify-full", SslMode::Require),
            ("host=h dbname=d sslmode=verify-ca", SslMode::Require),
            ("host=h sslmode=require", SslMode::Require),
            ("host=h sslmode=disable", SslMode::Disable),
            ("host=h", SslMode::Prefer),
        ] {
            assert_eq!(
                parse_database_url(url).unwrap().get_ssl_mode(),
                mode,
                "{url}"
            );
        }
        assert!(matches!(
            parse_database_url("host=h sslmode=verify-full sslrootcert=/nonexistent/ca.pem"),
            Err(UrlError::Tls(e)) if e.contains("/nonexistent/ca.pem")
        ));
        assert!(matches!(
            parse_database_url("postgres://u:hunter2@h:notaport/db?sslmode=require"),
            Err(UrlError::Other(_))
        ));
    }

    #[test]
    fn connectors_build_for_each_mode() {
        for mode in [TlsMode::Require, TlsMode::VerifyCa, TlsMode::VerifyFull] {
            let s = TlsSettings {
                mode: Some(mode),
                root_cert: None,
            };
            assert!(rustls_connector(&s).is_ok(), "{mode:?}");
        }
        let dir = std::env::temp_dir().join(format!("herald-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let s = TlsSettings {
            mode: Some(TlsMode::VerifyFull),
            root_cert: Some(empty),
        };
        let e = rustls_connector(&s).err().unwrap();
        assert!(e.contains("no certificate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
