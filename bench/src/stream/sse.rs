//! A minimal server-sent-events client over a raw tokio `TcpStream`: one HTTP/1.1 GET from a chosen
//! local address, the response head checked, the body de-chunked and split into events. Enough for the
//! daemon's `/stream` (axum's `Sse`), nothing more: no redirects, no TLS, no compression.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long the response head may take.
const HEAD_TIMEOUT: Duration = Duration::from_secs(15);

/// One event: its `id:` (None when absent or not a number), `event:` and `data:` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: Option<i64>,
    pub kind: String,
    pub data: String,
}

/// An open stream: the connection and what was read past the response head.
pub struct Connection {
    pub stream: TcpStream,
    pub body: Body,
}

/// Connects from `local` (port chosen by the system) to `server` and asks for `path_and_query`
/// with the given extra request headers; returns once the response head says 200 and
/// `text/event-stream`.
pub async fn open(
    local: IpAddr,
    server: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, String)],
) -> Result<Connection> {
    let socket = match local {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket
        .bind(SocketAddr::new(local, 0))
        .with_context(|| format!("binding a client socket to {local}"))?;
    let mut stream = socket
        .connect(server)
        .await
        .with_context(|| format!("connecting from {local} to {server}"))?;
    stream.set_nodelay(true)?;
    let mut request = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {server}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n"
    );
    for (name, value) in headers {
        request += &format!("{name}: {value}\r\n");
    }
    request += "\r\n";
    stream.write_all(request.as_bytes()).await?;

    let mut buf = Vec::with_capacity(4096);
    let head_end = tokio::time::timeout(HEAD_TIMEOUT, async {
        loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                return Ok(end);
            }
            if buf.len() > 64 * 1024 {
                bail!("the response head is over 64 KiB");
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                bail!(
                    "the server closed the connection before answering ({} bytes read){}",
                    buf.len(),
                    if buf.is_empty() {
                        " (refused unread: over the connections per address?)"
                    } else {
                        ""
                    }
                );
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .context("no response head in time")??;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let rest = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    if code != "200" {
        bail!(
            "{status}: {}",
            String::from_utf8_lossy(&rest)
                .trim()
                .chars()
                .take(200)
                .collect::<String>()
        );
    }
    if !header("content-type").is_some_and(|t| t.starts_with("text/event-stream")) {
        bail!("not an event stream: {head}");
    }
    let chunked = header("transfer-encoding").is_some_and(|t| t.contains("chunked"));
    let mut body = Body::new(chunked);
    body.feed(&rest)?;
    Ok(Connection { stream, body })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The response body: de-chunked (when chunked) and split into events.
pub struct Body {
    chunks: Option<Chunks>,
    parser: Parser,
}

impl Body {
    pub fn new(chunked: bool) -> Self {
        Self {
            chunks: chunked.then(Chunks::default),
            parser: Parser::default(),
        }
    }

    /// Takes the bytes read from the connection.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.chunks {
            Some(chunks) => {
                let mut plain = Vec::with_capacity(bytes.len());
                chunks.decode(bytes, &mut plain)?;
                self.parser.feed(&plain);
            }
            None => self.parser.feed(bytes),
        }
        Ok(())
    }

    /// The events complete so far, oldest first.
    pub fn events(&mut self) -> std::collections::vec_deque::Drain<'_, Event> {
        self.parser.events.drain(..)
    }

    /// Whether the body ended (the last, empty chunk arrived).
    pub fn ended(&self) -> bool {
        self.chunks.as_ref().is_some_and(|c| c.state == State::Done)
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
enum State {
    /// Reading a chunk-size line (hex digits, maybe extensions) up to CRLF.
    #[default]
    Size,
    /// This many data bytes left in the chunk.
    Data(usize),
    /// The CRLF after a chunk's data: this many bytes of it left.
    DataEnd(usize),
    /// The last chunk: nothing more (trailers are ignored).
    Done,
}

/// `Transfer-Encoding: chunked`, decoded as it arrives.
#[derive(Default)]
struct Chunks {
    state: State,
    line: Vec<u8>,
}

impl Chunks {
    fn decode(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<()> {
        while !input.is_empty() {
            match self.state {
                State::Size => {
                    let Some(at) = input.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(input);
                        return Ok(());
                    };
                    self.line.extend_from_slice(&input[..at]);
                    input = &input[at + 1..];
                    let line = String::from_utf8_lossy(&self.line).to_string();
                    self.line.clear();
                    let digits = line.trim().split(';').next().unwrap_or_default().trim();
                    let size = usize::from_str_radix(digits, 16)
                        .with_context(|| format!("bad chunk size line {line:?}"))?;
                    self.state = if size == 0 {
                        State::Done
                    } else {
                        State::Data(size)
                    };
                }
                State::Data(left) => {
                    let n = left.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if n == left {
                        State::DataEnd(2)
                    } else {
                        State::Data(left - n)
                    };
                }
                State::DataEnd(left) => {
                    let n = left.min(input.len());
                    input = &input[n..];
                    self.state = if n == left {
                        State::Size
                    } else {
                        State::DataEnd(left - n)
                    };
                }
                State::Done => return Ok(()),
            }
        }
        Ok(())
    }
}

/// The event-stream format: lines `field: value`, an empty line ends an event, `:` starts a comment.
#[derive(Default)]
struct Parser {
    line: Vec<u8>,
    id: Option<String>,
    kind: Option<String>,
    data: Option<String>,
    events: std::collections::VecDeque<Event>,
}

impl Parser {
    fn feed(&mut self, mut input: &[u8]) {
        while let Some(at) = input.iter().position(|&b| b == b'\n') {
            self.line.extend_from_slice(&input[..at]);
            input = &input[at + 1..];
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.line_done(&line);
            self.line = line;
            self.line.clear();
        }
        self.line.extend_from_slice(input);
    }

    fn line_done(&mut self, line: &[u8]) {
        if line.is_empty() {
            let (id, kind, data) = (self.id.take(), self.kind.take(), self.data.take());
            if id.is_some() || kind.is_some() || data.is_some() {
                self.events.push_back(Event {
                    id: id.and_then(|i| i.parse().ok()),
                    kind: kind.unwrap_or_else(|| "message".into()),
                    data: data.unwrap_or_default(),
                });
            }
            return;
        }
        if line[0] == b':' {
            return; // a comment (keep-alive)
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (&*text, ""),
        };
        match field {
            "id" => self.id = Some(value.to_string()),
            "event" => self.kind = Some(value.to_string()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(body: &mut Body) -> Vec<Event> {
        body.events().collect()
    }

    #[test]
    fn chunked_events_split_anywhere() {
        let plain = "id: 7\nevent: email.sent\ndata: {\"id\":7}\n\n: keep-alive\n\nid:8\nevent:x\ndata:a\ndata:b\n\n";
        // two chunks, then the last one
        let (a, b) = plain.split_at(20);
        let wire = format!(
            "{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        );
        for step in [1, 3, 7, wire.len()] {
            let mut body = Body::new(true);
            let mut got = Vec::new();
            for piece in wire.as_bytes().chunks(step) {
                body.feed(piece).unwrap();
                got.extend(events(&mut body));
            }
            assert_eq!(
                got,
                vec![
                    Event {
                        id: Some(7),
                        kind: "email.sent".into(),
                        data: "{\"id\":7}".into()
                    },
                    Event {
                        id: Some(8),
                        kind: "x".into(),
                        data: "a\nb".into()
                    },
                ],
                "step {step}"
            );
            assert!(body.ended());
        }
    }

    #[test]
    fn crlf_lines_and_unchunked_bodies() {
        let mut body = Body::new(false);
        body.feed(b"id: 1\r\nevent: k\r\ndata: d\r\n\r\n").unwrap();
        assert_eq!(
            events(&mut body),
            vec![Event {
                id: Some(1),
                kind: "k".into(),
                data: "d".into()
            }]
        );
        assert!(!body.ended());
    }
}
