//! A minimal SMTP server for the latency part of the delivery benchmark: EHLO/HELO, MAIL, RCPT, DATA,
//! RSET, NOOP, QUIT, always 250. It records, per recipient, the instant the final `.` of the message
//! arrived (before its 250 is written), which postfix's smtp-sink cannot tell.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// When a message for one recipient was taken, and its size (DATA bytes, dot-stuffing included).
#[derive(Clone, Copy, Debug)]
pub struct Accepted {
    pub at: Instant,
    pub wall: SystemTime,
    pub bytes: usize,
    /// The longest pause between two lines after DATA's 354, the final `.` included (a client that
    /// writes the message and its terminator separately, with Nagle on, waits for a delayed ACK here).
    pub longest_pause: Duration,
}

type Inbox = Arc<Mutex<HashMap<String, Accepted>>>;

/// Listens on 127.0.0.1 until dropped (which also closes every connection).
pub struct SmtpServer {
    pub addr: SocketAddr,
    inbox: Inbox,
    task: JoinHandle<()>,
}

impl SmtpServer {
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inbox: Inbox = Arc::default();
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&inbox)));
        Ok(Self { addr, inbox, task })
    }

    /// The message for `rcpt` (lower-cased address), once its final `.` has arrived.
    pub fn accepted(&self, rcpt: &str) -> Option<Accepted> {
        self.lock().get(rcpt).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Accepted>> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, inbox: Inbox) {
    // owned by this task: aborting it drops the set, which aborts every connection
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(session(stream, Arc::clone(&inbox)));
                }
                Err(e) => tracing::debug!(error = %e, "bench SMTP accept failed"),
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn session(stream: TcpStream, inbox: Inbox) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    write.write_all(b"220 bench ESMTP\r\n").await?;
    let mut line = Vec::with_capacity(256);
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        line.clear();
        if read.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let verb = text
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-bench\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n",
            "HELO" | "NOOP" => b"250 OK\r\n",
            "MAIL" | "RSET" => {
                rcpts.clear();
                b"250 OK\r\n"
            }
            "RCPT" => {
                let addr = text
                    .split_once('<')
                    .and_then(|(_, rest)| rest.split_once('>'))
                    .map_or("", |(a, _)| a);
                rcpts.push(addr.to_ascii_lowercase());
                b"250 OK\r\n"
            }
            "DATA" => {
                write.write_all(b"354 go ahead\r\n").await?;
                let mut bytes = 0;
                let mut last_line = Instant::now();
                let mut longest_pause = Duration::ZERO;
                loop {
                    line.clear();
                    if read.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(());
                    }
                    let now = Instant::now();
                    longest_pause = longest_pause.max(now - last_line);
                    last_line = now;
                    if line == b".\r\n" || line == b".\n" {
                        break;
                    }
                    bytes += line.len();
                }
                let got = Accepted {
                    at: last_line,
                    wall: SystemTime::now(),
                    bytes,
                    longest_pause,
                };
                {
                    let mut inbox = inbox.lock().unwrap_or_else(|e| e.into_inner());
                    for r in rcpts.drain(..) {
                        inbox.insert(r, got);
                    }
                }
                b"250 2.0.0 accepted\r\n"
            }
            "QUIT" => {
                write.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 5.5.2 not implemented\r\n",
        };
        write.write_all(reply).await?;
    }
}
