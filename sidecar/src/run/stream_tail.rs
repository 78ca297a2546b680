//! Reading a workspace's results for `/stream`: one shared reader ("tail") per workspace and kinds,
//! whatever the number of open streams that follow it.
//!
//! A tail reads the newest pages (`herald.read_results`, [`PAGE`] rows) once per wake-up and hands
//! each page to every follower through a broadcast channel; before, each stream read its own pages, so
//! 100 subscribers of a workspace read the same rows 100 times and held 100 pooled connections in turn
//! (one tenant's dashboards could crowd the pool the daemon's other work shares).
//!
//! A page says which range of the stream it covers: the results after `from` up to its last row, in
//! order, each once (the ids are the stream's cursor, see sql/results.sql "Order and cursor"). A
//! follower at cursor `pos` takes a page whose `from` is at or before `pos` (its rows after `pos`); a
//! page that starts after `pos` leaves a gap (the tail started later than the follower's last read, or
//! the follower fell behind and the channel dropped pages: `Lagged`), which the follower closes by
//! reading on its own from `pos` until it is level again. So a follower far behind (a reconnect with
//! `Last-Event-ID`) catches up with its own reads, and then costs nothing while it keeps up.
//!
//! A tail starts with its first follower and stops once it has none (checked on each wake-up, at least
//! every [`POLL`]); the registry's lock makes "no followers left" and "a new follower" exclusive.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value as Json;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::database::{Database, DbError};

/// Results read per query; a full page is followed by the next one at once.
pub const PAGE: i32 = 500;
/// How often an idle tail (or a follower reading on its own) looks for results published elsewhere
/// (another daemon's maintenance).
pub const POLL: Duration = Duration::from_secs(1);
/// How long a reader waits after a failed read before it tries again (the database may be away).
const RETRY: Duration = Duration::from_secs(2);
/// Pages a tail keeps for followers that are slower than it (a slow client's TCP window); one that
/// falls further behind reads on its own.
const BACKLOG: usize = 16;

/// One result as it comes from `herald.read_results`.
#[derive(Debug)]
pub struct Row {
    pub id: i64,
    pub kind: String,
    pub json: Json,
}

/// The results after `from`, in order (non-empty).
#[derive(Debug)]
pub struct Page {
    from: i64,
    rows: Vec<Row>,
}

const READ: &str = "SELECT r.id, r.kind, jsonb_strip_nulls(jsonb_build_object(\
      'id', r.id, 'kind', r.kind, 'at', r.at, 'contact_id', r.contact_id, \
      'automation_id', r.automation_id, 'enrollment_id', r.enrollment_id, \
      'broadcast_id', r.broadcast_id, 'job_id', r.job_id)) || jsonb_build_object('data', r.data) \
      FROM herald.read_results($1, $2, $3, $4) r";

/// One page of a workspace's results after `after` (of `kinds`, or all).
pub async fn read(
    database: &Database,
    workspace: &str,
    after: i64,
    kinds: Option<&[String]>,
) -> Result<Vec<Row>, DbError> {
    let client = database.get().await?;
    let rows = client
        .query(READ, &[&workspace, &after, &PAGE, &kinds])
        .await?;
    Ok(rows
        .iter()
        .map(|r| Row {
            id: r.get(0),
            kind: r.get(1),
            json: r.get(2),
        })
        .collect())
}

/// The newest result published in the workspace now (0 when none): where a stream without a cursor
/// starts, and where a tail starts.
pub async fn newest(database: &Database, workspace: &str) -> Result<i64, DbError> {
    let client = database.get().await?;
    let row = client
        .query_one("SELECT herald.newest_result($1)", &[&workspace])
        .await?;
    Ok(row.get::<_, Option<i64>>(0).unwrap_or(0))
}

/// What a follower at `pos` does with a page: the index of its first row after `pos` (the page's
/// length when it has nothing new), or None when the page starts after `pos` (a gap to read on its own).
fn take_from(page: &Page, pos: i64) -> Option<usize> {
    (page.from <= pos).then(|| page.rows.partition_point(|r| r.id <= pos))
}

/// What a tail follows: a workspace and the kinds asked for (sorted, so that the same set shares).
type Key = (String, Option<Vec<String>>);

/// The tails running in this daemon.
#[derive(Clone, Default)]
pub struct Tails(Arc<Mutex<HashMap<Key, broadcast::Sender<Arc<Page>>>>>);

/// Where a follower's tail reads from and when it wakes.
#[derive(Clone)]
pub struct Source {
    pub database: Arc<Database>,
    pub published: watch::Receiver<u64>,
    pub shutdown: CancellationToken,
}

impl Tails {
    /// A follower of `workspace`'s results (of `kinds`) after `after`, starting with `first` (already
    /// read from `after` on); starts the tail it follows if none runs.
    pub fn follow(
        &self,
        source: &Source,
        workspace: String,
        kinds: Option<Vec<String>>,
        after: i64,
        first: Vec<Row>,
    ) -> Follower {
        let key: Key = (
            workspace,
            kinds.map(|mut k| {
                k.sort();
                k.dedup();
                k
            }),
        );
        let pages = self.subscribe(source, &key);
        let level = first.len() < PAGE as usize;
        Follower {
            source: source.clone(),
            tails: self.clone(),
            key,
            pos: after,
            queued: first.into(),
            taking: None,
            level,
            pages,
        }
    }

    fn subscribe(&self, source: &Source, key: &Key) -> broadcast::Receiver<Arc<Page>> {
        let mut tails = self.0.lock().expect("the tails' lock is never poisoned");
        if let Some(sender) = tails.get(key) {
            return sender.subscribe();
        }
        let (sender, receiver) = broadcast::channel(BACKLOG);
        tails.insert(key.clone(), sender.clone());
        tokio::spawn(run_tail(self.clone(), source.clone(), key.clone(), sender));
        receiver
    }

    /// Removes `key`'s tail if nobody follows it; false when someone does (it goes on).
    fn retire(&self, key: &Key, sender: &broadcast::Sender<Arc<Page>>) -> bool {
        let mut tails = self.0.lock().expect("the tails' lock is never poisoned");
        if sender.receiver_count() > 0 {
            return false;
        }
        tails.remove(key);
        true
    }
}

/// A tail: reads the newest pages after where it started and sends each to its followers.
async fn run_tail(
    tails: Tails,
    mut source: Source,
    key: Key,
    sender: broadcast::Sender<Arc<Page>>,
) {
    let (workspace, kinds) = &key;
    let mut after = None;
    loop {
        if source.shutdown.is_cancelled() || tails.retire(&key, &sender) {
            return;
        }
        let Some(from) = after else {
            match newest(&source.database, workspace).await {
                Ok(id) => after = Some(id),
                Err(e) => {
                    tracing::debug!(error = %e.describe(), "stream tail: start failed; retrying");
                    wait(&mut source, RETRY).await;
                }
            }
            continue;
        };
        match read(&source.database, workspace, from, kinds.as_deref()).await {
            Ok(rows) if !rows.is_empty() => {
                let full = rows.len() == PAGE as usize;
                after = rows.last().map(|r| r.id);
                // no follower at this instant: the next turn of the loop retires the tail
                let _ = sender.send(Arc::new(Page { from, rows }));
                if !full {
                    wait(&mut source, POLL).await;
                }
            }
            Ok(_) => wait(&mut source, POLL).await,
            Err(e) => {
                tracing::debug!(error = %e.describe(), "stream tail: read failed; retrying");
                wait(&mut source, RETRY).await;
            }
        }
    }
}

async fn wait(source: &mut Source, at_most: Duration) {
    tokio::select! {
        _ = source.published.changed() => {}
        () = tokio::time::sleep(at_most) => {}
        () = source.shutdown.cancelled() => {}
    }
}

/// An open stream's reading: its cursor, what it read on its own and has not sent yet, the tail's page
/// it is taking rows from, and whether it is level with its tail (takes the tail's pages) or reads on
/// its own.
pub struct Follower {
    source: Source,
    tails: Tails,
    key: Key,
    pos: i64,
    queued: VecDeque<Row>,
    taking: Option<(Arc<Page>, usize)>,
    level: bool,
    pages: broadcast::Receiver<Arc<Page>>,
}

/// A result handed to a stream: read on its own, or a row of a page it shares with other streams.
pub enum Next {
    Own(Row),
    Shared(Arc<Page>, usize),
}

impl Next {
    pub fn row(&self) -> &Row {
        match self {
            Next::Own(row) => row,
            Next::Shared(page, i) => &page.rows[*i],
        }
    }
}

impl Follower {
    /// The next result, waiting for one as long as it takes; None ends the stream (shutdown).
    pub async fn next(&mut self) -> Option<Next> {
        loop {
            if let Some((page, i)) = self.taking.take() {
                if i < page.rows.len() {
                    self.pos = page.rows[i].id;
                    self.taking = Some((page.clone(), i + 1));
                    return Some(Next::Shared(page, i));
                }
            }
            if let Some(row) = self.queued.pop_front() {
                self.pos = row.id;
                return Some(Next::Own(row));
            }
            if self.source.shutdown.is_cancelled() {
                return None;
            }
            if !self.level {
                self.read_own().await;
                continue;
            }
            let received = tokio::select! {
                r = self.pages.recv() => r,
                () = self.source.shutdown.cancelled() => return None,
            };
            match received {
                Ok(page) => match take_from(&page, self.pos) {
                    Some(i) => self.taking = Some((page, i)),
                    None => self.level = false,
                },
                // pages were dropped while this stream was slow: read them on its own
                Err(broadcast::error::RecvError::Lagged(_)) => self.level = false,
                // the tail ended (it does only on shutdown, or if its task died): follow a new one
                Err(broadcast::error::RecvError::Closed) => {
                    self.pages = self.tails.subscribe(&self.source, &self.key);
                    self.level = false;
                }
            }
        }
    }

    async fn read_own(&mut self) {
        let (workspace, kinds) = &self.key;
        match read(&self.source.database, workspace, self.pos, kinds.as_deref()).await {
            Ok(rows) => {
                self.level = rows.len() < PAGE as usize;
                self.queued = rows.into();
            }
            Err(e) => {
                tracing::debug!(error = %e.describe(), "stream: read failed; retrying");
                wait(&mut self.source, RETRY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(from: i64, ids: &[i64]) -> Page {
        Page {
            from,
            rows: ids
                .iter()
                .map(|&id| Row {
                    id,
                    kind: "email.sent".into(),
                    json: serde_json::json!({"id": id}),
                })
                .collect(),
        }
    }

    #[test]
    fn a_follower_takes_what_a_page_has_after_its_cursor_and_nothing_across_a_gap() {
        // ids of one workspace are not consecutive (one identity for all workspaces)
        let p = page(10, &[12, 15, 20]);
        assert_eq!(
            take_from(&p, 10),
            Some(0),
            "level with the page's start: all of it"
        );
        assert_eq!(
            take_from(&p, 15),
            Some(2),
            "read ahead on its own: only what is newer"
        );
        assert_eq!(take_from(&p, 13), Some(1), "a cursor between two rows");
        assert_eq!(take_from(&p, 20), Some(3), "nothing new");
        assert_eq!(take_from(&p, 99), Some(3), "ahead of the whole page");
        // the page starts after the cursor: what lies between is in no page this follower has
        assert_eq!(take_from(&p, 9), None);
        assert_eq!(take_from(&page(0, &[1]), 0), Some(0));
    }
}
