//! A tiny HTTP/1.1 receiver for the webhook part of the delivery benchmark: reads each request (head and
//! Content-Length body), answers `200 OK` with a small JSON body, keeps the connection alive. Counts the
//! requests it answered. The same receiver serves herald and wrk.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

const REPLY: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}";

/// Listens on 127.0.0.1 until dropped (which also closes every connection).
pub struct Receiver {
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&requests)));
        Ok(Self {
            addr,
            requests,
            task,
        })
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, requests: Arc<AtomicU64>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(connection(stream, Arc::clone(&requests)));
                }
                Err(e) => tracing::debug!(error = %e, "bench receiver accept failed"),
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn connection(stream: TcpStream, requests: Arc<AtomicU64>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = Vec::with_capacity(256);
    let mut body = Vec::new();
    loop {
        // the head: request line and headers, up to the empty line
        let mut length = 0usize;
        let mut close = false;
        let mut first = true;
        loop {
            line.clear();
            if read.read_until(b'\n', &mut line).await? == 0 {
                return Ok(());
            }
            if line == b"\r\n" || line == b"\n" {
                if first {
                    continue; // stray empty line between requests
                }
                break;
            }
            first = false;
            if let Some((name, value)) = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.split_once(':'))
            {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("connection") {
                    close = value.eq_ignore_ascii_case("close");
                }
            }
        }
        body.resize(length, 0);
        read.read_exact(&mut body).await?;
        write.write_all(REPLY).await?;
        requests.fetch_add(1, Ordering::Relaxed);
        if close {
            return Ok(());
        }
    }
}
