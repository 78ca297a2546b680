//! The operator's page, `<public URL>/admin`, served on the HTTP side when HERALD_ADMIN_PASSWORD is
//! set: an overview per workspace, automations drawn as diagrams with their figures, broadcasts
//! (pause, resume, cancel), pending approvals (approve, reject) and dead letters (redrive), with
//! numbers that update in place.
//!
//! Files, one concept each: `auth` (password, signed session cookie, form tokens, Origin check),
//! `queries` (every statement the page runs), `pages` (HTML), `html` (escaping, the page frame),
//! `diagram` (graph layout and SVG), `graph` (definition + figures → diagram graph), `chart` (the
//! sent/failed chart), `live` (the live endpoint's answer), `assets/` (CSS and JS, compiled in).
//!
//! Routes (below `/admin`, and also below `<public URL path>/admin` when the public URL has a path,
//! so the page works whether or not a proxy strips that prefix; links are always the public path):
//!
//!   GET  /admin                      overview            GET  /admin/automations[/<id>[?email=]]
//!   GET  /admin/broadcasts           POST /admin/broadcasts/<id>/pause|resume|cancel
//!   GET  /admin/approvals            POST /admin/approvals/<enrollment>/approve|reject
//!   GET  /admin/dead-letters         POST /admin/dead-letters/<job>/redrive
//!   GET  /admin/live?view=…          the numbers as JSON    GET|POST /admin/login, POST /admin/logout
//!
//! Reads run in one read-only transaction per request with a statement timeout; actions call
//! herald's functions (pause_broadcast, decide_approval with the operator's name, redrive), so the
//! database decides what is allowed. The page connects as HERALD_ADMIN_DATABASE_URL when set (a
//! role in herald_admin), else through the daemon's pool.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, HOST, LOCATION, ORIGIN,
    REFERRER_POLICY, SET_COOKIE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::set_header::SetResponseHeaderLayer;

use super::config::{AdminSide, Config, HttpSide};
use super::database::{Database, DbError};
use super::db_health::DbHealth;

mod auth;
mod cache;
mod chart;
mod diagram;
mod graph;
mod html;
mod live;
mod pages;
mod queries;

use std::collections::HashMap;

use auth::{Keyring, Session};
use cache::Swr;
use html::{notice, Frame};
use queries::Action;

const CSS: &str = include_str!("assets/admin.css");
const JS: &str = include_str!("assets/admin.js");
/// Forms are small; anything larger is not ours.
const MAX_FORM: usize = 16 * 1024;
/// Every read transaction: a page's statements may take 10 s before the database stops them, and no
/// JIT (their plans' estimated costs pass jit_above_cost on tables the statistics know little about,
/// and compiling took longer than running: 20-200 ms a page).
const READ_SETTINGS: &str = "SET LOCAL statement_timeout = '10s'; SET LOCAL jit = off";
/// A wrong password costs this long, one attempt at a time (see `login`).
const FAILED_LOGIN_DELAY: Duration = Duration::from_secs(1);
const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The page's state: keys, where it lives, its database.
pub struct Admin {
    keys: Keyring,
    /// The page's path as browsers see it: the public URL's path + `/admin`.
    base: String,
    /// The paths it is served at (`/admin`, and `base` when different).
    mounts: Vec<String>,
    /// scheme://host[:port] of the public URL.
    public_origin: String,
    secure: bool,
    db: Arc<Database>,
    /// One sign-in attempt at a time; a failed one holds it for FAILED_LOGIN_DELAY.
    login_gate: tokio::sync::Mutex<()>,
    /// The counts that scan, kept a few seconds (cache.rs): per workspace, per automation in
    /// progress, per automation's nodes; and the chart's minutes that are over.
    counts: Arc<Swr<(), HashMap<String, queries::Counts>>>,
    in_progress: Arc<Swr<(), queries::InProgress>>,
    nodes: Arc<Swr<i64, queries::NodeFigures>>,
    minutes: cache::Minutes,
}

/// Adds the admin page to the HTTP side's router when it is configured (else returns it as is).
/// With HERALD_ADMIN_DATABASE_URL the page gets a pool of its own; else it borrows the daemon's.
pub fn mount(router: Router, config: &Config, database: &Arc<Database>) -> Router {
    let (Some(side), Some(admin)) = (&config.http, &config.admin) else {
        return router;
    };
    let db = match &admin.database {
        Some(c) => Arc::new(Database::new(Arc::new(DbHealth::new(c.clone())))),
        None => Arc::clone(database),
    };
    let state = Arc::new(Admin::new(side, admin, db));
    // the counts that scan are counted once at start, so that the first page does not wait for them
    tokio::spawn(warm_up(Arc::clone(&state)));
    tracing::info!(
        path = %state.base,
        own_database = admin.database.is_some(),
        "serving the admin page"
    );
    router.merge(routes(state))
}

impl Admin {
    pub fn new(side: &HttpSide, admin: &AdminSide, db: Arc<Database>) -> Self {
        let link_key = side
            .keys
            .default
            .link
            .current
            .as_ref()
            .map(|s| s.0.as_bytes().to_vec())
            .unwrap_or_default();
        let public = url::Url::parse(&side.public_url).expect("validated by config");
        let prefix = public.path().trim_end_matches('/').to_string();
        let base = format!("{prefix}/admin");
        let mut mounts = vec!["/admin".to_string()];
        if base != "/admin" {
            mounts.push(base.clone());
        }
        Self {
            keys: Keyring::new(&link_key, &admin.password.0),
            base,
            mounts,
            public_origin: public.origin().ascii_serialization(),
            secure: public.scheme() == "https",
            db,
            login_gate: tokio::sync::Mutex::new(()),
            counts: Arc::default(),
            in_progress: Arc::default(),
            nodes: Arc::default(),
            minutes: cache::Minutes::default(),
        }
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let cookies = headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok());
        auth::cookie_value(cookies).and_then(|v| self.keys.open(v, Self::now()))
    }

    fn frame<'a>(&'a self, session: &'a Session, csrf: &'a str, live: Option<String>) -> Frame<'a> {
        Frame {
            base: &self.base,
            operator: Some(&session.name),
            csrf: Some(csrf),
            live,
        }
    }

    /// The part of a request's path below the page (`/automations/3`), whichever mount it came by.
    fn relative(&self, uri: &Uri) -> String {
        let path = uri.path();
        let below = self
            .mounts
            .iter()
            .filter_map(|m| path.strip_prefix(m.as_str()))
            .min_by_key(|rest| rest.len())
            .unwrap_or("");
        match uri.query() {
            Some(q) => format!("{below}?{q}"),
            None => below.to_string(),
        }
    }

    fn to_login(&self, uri: &Uri) -> Response {
        let next = safe_next(&self.relative(uri));
        let target = if next.is_empty() {
            format!("{}/login", self.base)
        } else {
            format!("{}/login?next={}", self.base, html::query_value(&next))
        };
        redirect(&target)
    }

    /// POST checks: signed in, from the page's origin, with the session's form token.
    fn check_post(&self, headers: &HeaderMap, form: &Form) -> Result<Session, Refused> {
        let Some(session) = self.session(headers) else {
            return Err((
                StatusCode::FORBIDDEN,
                "not signed in (or the session expired): sign in again\n",
            ));
        };
        let header = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        if !auth::origin_ok(
            header(&ORIGIN),
            header(&HeaderName::from_static("sec-fetch-site")),
            header(&HOST),
            &self.public_origin,
        ) {
            return Err((
                StatusCode::FORBIDDEN,
                "refused: the form was not sent from this page (Origin)\n",
            ));
        }
        if !self.keys.csrf_ok(&session, form.get("csrf")) {
            return Err((
                StatusCode::FORBIDDEN,
                "refused: the form's token is missing or stale; reload the page and try again\n",
            ));
        }
        Ok(session)
    }
}

/// Why a POST is refused before anything is done.
type Refused = (StatusCode, &'static str);

/// A form body (application/x-www-form-urlencoded) or a query string, as pairs.
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(bytes: &[u8]) -> Self {
        Self(
            url::form_urlencoded::parse(bytes)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn query(uri: &Uri) -> Self {
        Self::parse(uri.query().unwrap_or("").as_bytes())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Where a sign-in may send the browser: a path below the page, nothing else (no scheme, no
/// `//host`, no backslashes or control characters): never an open redirect.
fn safe_next(next: &str) -> String {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && next.len() < 1024
        && !next.contains('\\')
        && !next.chars().any(|c| c.is_control());
    if ok {
        next.to_string()
    } else {
        String::new()
    }
}

fn redirect(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(LOCATION, v);
    }
    r
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (status, [(CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

fn html_response(status: StatusCode, body: String) -> Response {
    (status, [(CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

/// A database error as the page shows it (and the log keeps).
fn db_error(admin: &Admin, session: &Session, csrf: &str, e: &DbError) -> Response {
    let (status, text) = if e.code()
        == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    {
        (
            StatusCode::FORBIDDEN,
            format!(
                "The page's database role may not do this ({}). Set HERALD_ADMIN_DATABASE_URL to a role in herald_admin.",
                e.describe()
            ),
        )
    } else if e.is_connection_error() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "The database is not answering; reload in a moment.".to_string(),
        )
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, e.describe())
    };
    tracing::warn!(error = %e.describe(), "admin page: database error");
    let frame = admin.frame(session, csrf, None);
    html_response(
        status,
        html::page(&frame, "Error", html::Nav::None, &notice("error", &text)),
    )
}

/// The message shown after a successful action (POST, then redirect, then this).
fn done_notice(query: &Form) -> String {
    let id = query.get("id").and_then(|v| v.parse::<i64>().ok());
    let text = match (query.get("done"), id) {
        (Some("pause"), Some(id)) => format!("Broadcast #{id} paused."),
        (Some("resume"), Some(id)) => format!("Broadcast #{id} resumed."),
        (Some("cancel"), Some(id)) => format!("Broadcast #{id} cancelled."),
        (Some("approve"), Some(id)) => format!("Enrollment #{id} approved."),
        (Some("reject"), Some(id)) => format!("Enrollment #{id} rejected."),
        (Some("redrive"), Some(id)) => format!("Job #{id} is back in the queue."),
        _ => return String::new(),
    };
    notice("ok", &text)
}

fn routes(admin: Arc<Admin>) -> Router {
    let mut router = Router::new();
    for m in admin.mounts.clone() {
        router = router
            .route(&m, get(overview))
            .route(&format!("{m}/"), get(overview))
            .route(&format!("{m}/login"), get(login_form).post(login))
            .route(&format!("{m}/logout"), post(logout))
            .route(&format!("{m}/automations"), get(automations))
            .route(&format!("{m}/automations/{{id}}"), get(automation))
            .route(&format!("{m}/broadcasts"), get(broadcasts))
            .route(
                &format!("{m}/broadcasts/{{id}}/{{verb}}"),
                post(broadcast_action),
            )
            .route(&format!("{m}/approvals"), get(approvals))
            .route(
                &format!("{m}/approvals/{{id}}/{{verb}}"),
                post(approval_action),
            )
            .route(&format!("{m}/dead-letters"), get(dead_letters))
            .route(&format!("{m}/dead-letters/{{id}}/{{verb}}"), post(redrive))
            .route(&format!("{m}/live"), get(live_numbers))
            .route(&format!("{m}/assets/admin.css"), get(css))
            .route(&format!("{m}/assets/admin.js"), get(js));
    }
    let header = |name: HeaderName, value: &'static str| {
        SetResponseHeaderLayer::overriding(name, HeaderValue::from_static(value))
    };
    router
        .with_state(admin)
        .layer(RequestBodyLimitLayer::new(MAX_FORM))
        .layer(header(CONTENT_SECURITY_POLICY, CSP))
        .layer(header(X_FRAME_OPTIONS, "DENY"))
        .layer(header(X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .layer(header(REFERRER_POLICY, "same-origin"))
        .layer(header(CACHE_CONTROL, "no-store"))
}

async fn css() -> Response {
    ([(CONTENT_TYPE, "text/css; charset=utf-8")], CSS).into_response()
}

async fn js() -> Response {
    ([(CONTENT_TYPE, "text/javascript; charset=utf-8")], JS).into_response()
}

async fn login_form(State(a): State<Arc<Admin>>, headers: HeaderMap, uri: Uri) -> Response {
    if a.session(&headers).is_some() {
        return redirect(&a.base);
    }
    let next = safe_next(Form::query(&uri).get("next").unwrap_or(""));
    let frame = Frame {
        base: &a.base,
        operator: None,
        csrf: None,
        live: None,
    };
    html_response(StatusCode::OK, pages::login(&frame, None, &next))
}

async fn login(State(a): State<Arc<Admin>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    let header = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if !auth::origin_ok(
        header(&ORIGIN),
        header(&HeaderName::from_static("sec-fetch-site")),
        header(&HOST),
        &a.public_origin,
    ) {
        return plain(
            StatusCode::FORBIDDEN,
            "refused: the form was not sent from this page (Origin)\n",
        );
    }
    let next = safe_next(form.get("next").unwrap_or(""));
    let name = form.get("name").unwrap_or("").trim().to_string();
    let frame = Frame {
        base: &a.base,
        operator: None,
        csrf: None,
        live: None,
    };
    // one attempt at a time; a wrong password keeps the gate closed for a second, so guessing is slow
    let gate = a.login_gate.lock().await;
    if !a.keys.password_ok(form.get("password").unwrap_or("")) {
        tokio::time::sleep(FAILED_LOGIN_DELAY).await;
        drop(gate);
        tracing::warn!("admin page: a sign-in with a wrong password");
        return html_response(
            StatusCode::UNAUTHORIZED,
            pages::login(&frame, Some("Wrong password."), &next),
        );
    }
    drop(gate);
    if !auth::valid_name(&name) {
        return html_response(
            StatusCode::BAD_REQUEST,
            pages::login(
                &frame,
                Some("Give your name (1 to 64 characters): it is recorded with your decisions."),
                &next,
            ),
        );
    }
    let (_, value) = a.keys.issue(&name, chrono::Utc::now().timestamp_millis());
    tracing::info!(operator = %name, "admin page: signed in");
    let mut r = redirect(&format!("{}{next}", a.base));
    if let Ok(v) = HeaderValue::from_str(&auth::set_cookie(Some(&value), &a.base, a.secure)) {
        r.headers_mut().insert(SET_COOKIE, v);
    }
    r
}

/// Signs out: in the database (so that a copy of the cookie stops working on every daemon), then
/// in the browser. `everyone=1` signs out every session issued until now, the operator's too.
async fn logout(State(a): State<Arc<Admin>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    let session = match a.check_post(&headers, &form) {
        Ok(s) => s,
        Err((status, why)) => return plain(status, why),
    };
    let everyone = form.get("everyone") == Some("1");
    let until = if everyone {
        Admin::now() + auth::SESSION_SECONDS
    } else {
        session.expires
    };
    let recorded: Result<(), DbError> = async {
        let client = a.db.get().await?;
        queries::sign_out(&client, (&session.nonce, &session.name), until, everyone).await
    }
    .await;
    match recorded {
        Ok(()) => tracing::info!(operator = %session.name, everyone, "admin page: signed out"),
        // the browser forgets the cookie all the same; signing everyone out must not seem done
        Err(e) if everyone => return db_error(&a, &session, &a.keys.csrf(&session), &e),
        Err(e) => tracing::warn!(operator = %session.name, error = %e.describe(),
            "admin page: signed out in the browser only (the database did not record it)"),
    }
    signed_out(&a, &Uri::from_static("/"))
}

/// To the sign-in form, the session cookie removed (it was signed out, here or elsewhere).
fn signed_out(a: &Admin, uri: &Uri) -> Response {
    let mut r = a.to_login(uri);
    if let Ok(v) = HeaderValue::from_str(&auth::set_cookie(None, &a.base, a.secure)) {
        r.headers_mut().insert(SET_COOKIE, v);
    }
    r
}

/// The pages that read: which one, and what it needs.
enum View {
    Overview,
    Automations,
    Automation { id: i64, email: Option<String> },
    Broadcasts,
    Approvals,
    DeadLetters,
}

impl View {
    fn live_query(&self) -> String {
        match self {
            View::Overview => "view=overview".into(),
            View::Automations => "view=automations".into(),
            View::Automation { id, .. } => format!("view=automation&id={id}"),
            View::Broadcasts => "view=broadcasts".into(),
            View::Approvals => "view=approvals".into(),
            View::DeadLetters => "view=dead-letters".into(),
        }
    }
}

/// What a view read: the page's HTML, or its live numbers.
enum Output {
    Page(String),
    Live(live::Live),
    /// The database says the session was signed out (sql/admin_sessions.sql).
    SignedOut,
}

/// A read-only transaction with the page's settings.
async fn begin_read(
    client: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, DbError> {
    let tx = client.build_transaction().read_only(true).start().await?;
    tx.batch_execute(READ_SETTINGS).await?;
    Ok(tx)
}

// The background counts of cache.rs, each in a read-only transaction of its own.

async fn count_workspaces(db: Arc<Database>) -> Result<HashMap<String, queries::Counts>, DbError> {
    let mut client = db.get().await?;
    let tx = begin_read(&mut client).await?;
    let counts = queries::counts(&tx).await?;
    tx.commit().await?;
    Ok(counts)
}

async fn count_in_progress(db: Arc<Database>) -> Result<queries::InProgress, DbError> {
    let mut client = db.get().await?;
    let tx = begin_read(&mut client).await?;
    let counts = queries::in_progress(&tx).await?;
    tx.commit().await?;
    Ok(counts)
}

async fn count_nodes(db: Arc<Database>, automation: i64) -> Result<queries::NodeFigures, DbError> {
    let mut client = db.get().await?;
    let tx = begin_read(&mut client).await?;
    let figures = queries::node_figures(&tx, automation).await?;
    tx.commit().await?;
    Ok(figures)
}

/// Fills the caches of the counts that scan (errors are left to the first page that needs them).
async fn warm_up(a: Arc<Admin>) {
    let db = Arc::clone(&a.db);
    let _ = a.counts.get((), move || count_workspaces(db)).await;
    let db = Arc::clone(&a.db);
    let _ = a.in_progress.get((), move || count_in_progress(db)).await;
}

/// Reads a view in one read-only transaction (plus the cached counts) and renders it as a page or
/// as live numbers.
async fn render(
    a: &Admin,
    session: &Session,
    csrf: &str,
    view: &View,
    as_live: bool,
    notice: &str,
) -> Result<Option<Output>, DbError> {
    let mut client = a.db.get().await?;
    if !queries::signed_in(&client, &session.nonce, session.issued_ms).await? {
        return Ok(Some(Output::SignedOut));
    }
    let tx = begin_read(&mut client).await?;
    let frame = a.frame(session, csrf, Some(view.live_query()));
    let out = match view {
        View::Overview => {
            let read_from = a.minutes.read_from();
            let fresh = queries::overview(&tx, read_from).await?;
            let db = Arc::clone(&a.db);
            let (counts, age) = a.counts.get((), move || count_workspaces(db)).await?;
            let ids: Vec<String> = fresh.workspaces.iter().map(|w| w.id.clone()).collect();
            let mut hours = a.minutes.merge(read_from, fresh.now, &fresh.minutes, &ids);
            let workspaces: Vec<queries::WorkspaceFigures> = fresh
                .workspaces
                .into_iter()
                .map(|mut w| {
                    w.counts = counts.get(&w.id).copied().unwrap_or_default();
                    w.counted_ago = age;
                    w.minutes = hours.remove(&w.id).unwrap_or_default();
                    w
                })
                .collect();
            if as_live {
                Output::Live(pages::overview_live(&workspaces))
            } else {
                Output::Page(pages::overview(&frame, &workspaces))
            }
        }
        View::Automations => {
            let mut rows = queries::automations(&tx).await?;
            let db = Arc::clone(&a.db);
            let (counts, _) = a.in_progress.get((), move || count_in_progress(db)).await?;
            for r in &mut rows {
                (r.active, r.waiting) = counts.get(&r.id).copied().unwrap_or_default();
            }
            if as_live {
                Output::Live(pages::automations_live(&rows))
            } else {
                Output::Page(pages::automations(&frame, &rows))
            }
        }
        View::Automation { id, email } => {
            let Some(mut detail) = queries::automation(&tx, *id).await? else {
                return Ok(None);
            };
            let db = Arc::clone(&a.db);
            let automation = *id;
            let (nodes, age) = a
                .nodes
                .get(automation, move || count_nodes(db, automation))
                .await?;
            detail.figures.now = nodes.now.clone();
            detail.figures.opened = nodes.opened.clone();
            detail.figures.clicked = nodes.clicked.clone();
            detail.counted_ago = age;
            if as_live {
                Output::Live(pages::automation_live(&detail))
            } else {
                let search = match email {
                    None => pages::Search::None,
                    Some(e) => {
                        match queries::contact_history(&tx, &detail.workspace, *id, e).await? {
                            Some(h) => pages::Search::Found(h),
                            None => pages::Search::NotFound(e.clone()),
                        }
                    }
                };
                Output::Page(pages::automation(&frame, &detail, &search))
            }
        }
        View::Broadcasts => {
            let rows = queries::broadcasts(&tx, None).await?;
            if as_live {
                Output::Live(pages::broadcasts_live(&rows))
            } else {
                Output::Page(pages::broadcasts(&frame, &rows, notice))
            }
        }
        View::Approvals => {
            let (rows, total) = queries::approvals(&tx).await?;
            if as_live {
                Output::Live(pages::approvals_live(total))
            } else {
                Output::Page(pages::approvals(&frame, &rows, total, notice))
            }
        }
        View::DeadLetters => {
            let (rows, total) = queries::dead_letters(&tx).await?;
            if as_live {
                Output::Live(pages::dead_letters_live(total))
            } else {
                Output::Page(pages::dead_letters(&frame, &rows, total, notice))
            }
        }
    };
    tx.commit().await?;
    Ok(Some(out))
}

/// A GET of a page: signed in (else to the sign-in form), read, rendered.
async fn show(
    a: &Admin,
    headers: &HeaderMap,
    uri: &Uri,
    view: View,
    status: StatusCode,
    notice: String,
) -> Response {
    let Some(session) = a.session(headers) else {
        return a.to_login(uri);
    };
    let csrf = a.keys.csrf(&session);
    let notice = if notice.is_empty() {
        done_notice(&Form::query(uri))
    } else {
        notice
    };
    match render(a, &session, &csrf, &view, false, &notice).await {
        Ok(Some(Output::Page(html))) => html_response(status, html),
        Ok(Some(Output::Live(_))) => unreachable!("asked for a page"),
        Ok(Some(Output::SignedOut)) => signed_out(a, uri),
        Ok(None) => {
            let frame = a.frame(&session, &csrf, None);
            html_response(
                StatusCode::NOT_FOUND,
                html::page(
                    &frame,
                    "Not found",
                    html::Nav::None,
                    &notice_html("error", "No such automation."),
                ),
            )
        }
        Err(e) => db_error(a, &session, &csrf, &e),
    }
}

fn notice_html(kind: &str, text: &str) -> String {
    notice(kind, text)
}

/// A page as asked for (200, no notice).
async fn page(a: &Admin, headers: &HeaderMap, uri: &Uri, view: View) -> Response {
    show(a, headers, uri, view, StatusCode::OK, String::new()).await
}

async fn overview(State(a): State<Arc<Admin>>, headers: HeaderMap, uri: Uri) -> Response {
    page(&a, &headers, &uri, View::Overview).await
}

async fn automations(State(a): State<Arc<Admin>>, headers: HeaderMap, uri: Uri) -> Response {
    page(&a, &headers, &uri, View::Automations).await
}

/// An email as contacts store it: trimmed, lower-case.
fn normalise_email(email: &str) -> String {
    email.trim().to_lowercase()
}

async fn automation(
    State(a): State<Arc<Admin>>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let email = Form::query(&uri)
        .get("email")
        .map(normalise_email)
        .filter(|e| !e.is_empty() && e.len() <= 254);
    page(&a, &headers, &uri, View::Automation { id, email }).await
}

async fn broadcasts(State(a): State<Arc<Admin>>, headers: HeaderMap, uri: Uri) -> Response {
    page(&a, &headers, &uri, View::Broadcasts).await
}

async fn approvals(State(a): State<Arc<Admin>>, headers: HeaderMap, uri: Uri) -> Response {
    page(&a, &headers, &uri, View::Approvals).await
}

async fn dead_letters(State(a): State<Arc<Admin>>, headers: HeaderMap, uri: Uri) -> Response {
    page(&a, &headers, &uri, View::DeadLetters).await
}

async fn live_numbers(State(a): State<Arc<Admin>>, headers: HeaderMap, uri: Uri) -> Response {
    let Some(session) = a.session(&headers) else {
        return plain(StatusCode::UNAUTHORIZED, "not signed in\n");
    };
    let q = Form::query(&uri);
    let id = q.get("id").and_then(|v| v.parse::<i64>().ok());
    let view = match (q.get("view"), id) {
        (Some("overview"), _) => View::Overview,
        (Some("automations"), _) => View::Automations,
        (Some("automation"), Some(id)) => View::Automation { id, email: None },
        (Some("broadcasts"), _) => View::Broadcasts,
        (Some("approvals"), _) => View::Approvals,
        (Some("dead-letters"), _) => View::DeadLetters,
        _ => return plain(StatusCode::BAD_REQUEST, "view must be overview, automations, automation (with id), broadcasts, approvals or dead-letters\n"),
    };
    let csrf = a.keys.csrf(&session);
    match render(&a, &session, &csrf, &view, true, "").await {
        Ok(Some(Output::Live(l))) => (
            [(CONTENT_TYPE, "application/json")],
            serde_json::to_string(&l).unwrap_or_else(|_| "{}".into()),
        )
            .into_response(),
        Ok(Some(Output::SignedOut)) => plain(StatusCode::UNAUTHORIZED, "signed out\n"),
        Ok(_) => plain(StatusCode::NOT_FOUND, "not found\n"),
        Err(e) => {
            tracing::debug!(error = %e.describe(), "admin page: live numbers not read");
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "could not read the numbers now\n",
            )
        }
    }
}

/// Runs an action (one call of a herald function, in its own transaction), then back to the page
/// it came from: 303 with a notice on success, the page with the database's refusal otherwise.
/// Where an action goes back to: the page (its view and path) and what the notice says.
struct Back {
    view: View,
    page: &'static str,
    verb: String,
    id: i64,
}

async fn act(
    a: &Admin,
    (headers, uri): (&HeaderMap, &Uri),
    session: &Session,
    action: Action,
    back: Back,
) -> Response {
    let Back {
        view,
        page,
        verb,
        id,
    } = back;
    let result: Result<bool, DbError> = async {
        let mut client = a.db.get().await?;
        if !queries::signed_in(&client, &session.nonce, session.issued_ms).await? {
            return Ok(false);
        }
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL statement_timeout = '30s'")
            .await?;
        queries::act(&tx, &action).await?;
        tx.commit().await?;
        Ok(true)
    }
    .await;
    match result {
        Ok(false) => {
            let from = format!("{}{page}", a.base);
            signed_out(a, &from.parse().unwrap_or_else(|_| uri.clone()))
        }
        Ok(true) => {
            tracing::info!(operator = %session.name, ?action, "admin page: action");
            redirect(&format!("{}{page}?done={verb}&id={id}", a.base))
        }
        Err(e)
            if e.code().is_some()
                && e.code() != Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
        {
            // refused by herald (a broadcast already sent, an approval decided meanwhile, …)
            let text = match &e {
                DbError::Pg(pg) => pg
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.describe()),
                DbError::Pool(p) => p.clone(),
            };
            show(
                a,
                headers,
                uri,
                view,
                StatusCode::CONFLICT,
                notice("error", &format!("Not done: {text}")),
            )
            .await
        }
        Err(e) => db_error(a, session, &a.keys.csrf(session), &e),
    }
}

async fn broadcast_action(
    State(a): State<Arc<Admin>>,
    Path((id, verb)): Path<(i64, String)>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    let session = match a.check_post(&headers, &Form::parse(&body)) {
        Ok(s) => s,
        Err((status, why)) => return plain(status, why),
    };
    let action = match verb.as_str() {
        "pause" => Action::Pause(id),
        "resume" => Action::Resume(id),
        "cancel" => Action::Cancel(id),
        _ => return plain(StatusCode::NOT_FOUND, "not found\n"),
    };
    act(
        &a,
        (&headers, &uri),
        &session,
        action,
        Back {
            view: View::Broadcasts,
            page: "/broadcasts",
            verb: verb.clone(),
            id,
        },
    )
    .await
}

async fn approval_action(
    State(a): State<Arc<Admin>>,
    Path((id, verb)): Path<(i64, String)>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    let session = match a.check_post(&headers, &Form::parse(&body)) {
        Ok(s) => s,
        Err((status, why)) => return plain(status, why),
    };
    let approved = match verb.as_str() {
        "approve" => true,
        "reject" => false,
        _ => return plain(StatusCode::NOT_FOUND, "not found\n"),
    };
    let action = Action::Decide {
        enrollment: id,
        approved,
        actor: session.name.clone(),
    };
    act(
        &a,
        (&headers, &uri),
        &session,
        action,
        Back {
            view: View::Approvals,
            page: "/approvals",
            verb: verb.clone(),
            id,
        },
    )
    .await
}

async fn redrive(
    State(a): State<Arc<Admin>>,
    Path((id, verb)): Path<(i64, String)>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    let session = match a.check_post(&headers, &Form::parse(&body)) {
        Ok(s) => s,
        Err((status, why)) => return plain(status, why),
    };
    if verb != "redrive" {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    act(
        &a,
        (&headers, &uri),
        &session,
        Action::Redrive(id),
        Back {
            view: View::DeadLetters,
            page: "/dead-letters",
            verb: "redrive".into(),
            id,
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::config::{KeyPair, Keys, Secret, Secrets};
    use axum::body::{to_bytes, Body};
    use axum::http::Request;
    use tower::ServiceExt as _;

    const PASSWORD: &str = "a-long-admin-password";

    /// A database nobody listens at.
    fn away() -> Arc<Database> {
        Database::unreachable()
    }

    fn admin(public_url: &str) -> Arc<Admin> {
        let keys = Keys {
            default: Secrets {
                link: KeyPair {
                    current: Some(Secret("a-link-key-for-unit-tests".into())),
                    previous: None,
                },
                ..Secrets::default()
            },
            workspaces: Default::default(),
        };
        let side = HttpSide {
            addr: "127.0.0.1:0".parse().expect("an address"),
            public_url: public_url.into(),
            keys: Arc::new(keys),
            sendgrid_key: None,
            sendgrid_workspace_keys: Default::default(),
            api_rate_per_key: 0,
            connections_per_address: crate::run::config::CONNECTIONS_PER_ADDRESS,
        };
        let settings = AdminSide {
            password: Secret(PASSWORD.into()),
            database: None,
        };
        Arc::new(Admin::new(&side, &settings, away()))
    }

    async fn call(app: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let response = app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let body = to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("a body");
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    fn get(path: &str, cookie: Option<&str>) -> Request<Body> {
        let mut r = Request::get(path).header(HOST, "mail.test");
        if let Some(c) = cookie {
            r = r.header(COOKIE, c);
        }
        r.body(Body::empty()).expect("a request")
    }

    fn post(path: &str, cookie: Option<&str>, origin: Option<&str>, body: &str) -> Request<Body> {
        let mut r = Request::post(path)
            .header(HOST, "mail.test")
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(c) = cookie {
            r = r.header(COOKIE, c);
        }
        if let Some(o) = origin {
            r = r.header(ORIGIN, o);
        }
        r.body(Body::from(body.to_string())).expect("a request")
    }

    /// Signs in and returns the cookie pair (`herald_admin=…`).
    async fn sign_in(app: &Router, base: &str) -> String {
        let (status, headers, _) = call(
            app,
            post(
                &format!("{base}/login"),
                None,
                Some("https://mail.test"),
                &format!("name=Ann+Op&password={PASSWORD}&next=%2Fbroadcasts"),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert_eq!(headers[LOCATION], format!("{base}/broadcasts").as_str());
        let cookie = headers[SET_COOKIE].to_str().unwrap().to_string();
        assert!(
            cookie.contains("HttpOnly")
                && cookie.contains("SameSite=Strict")
                && cookie.contains("Secure"),
            "{cookie}"
        );
        assert!(cookie.contains(&format!("Path={base}")), "{cookie}");
        cookie.split(';').next().unwrap().to_string()
    }

    #[tokio::test]
    async fn pages_need_a_session_and_the_login_sets_one() {
        let a = admin("https://mail.test/mail");
        let app = routes(Arc::clone(&a));
        // signed out: to the form, remembering where to come back to (both mounts)
        for path in [
            "/admin/automations/3?email=a%40b.c",
            "/mail/admin/automations/3?email=a%40b.c",
        ] {
            let (status, headers, _) = call(&app, get(path, None)).await;
            assert_eq!(status, StatusCode::SEE_OTHER);
            assert_eq!(
                headers[LOCATION],
                "/mail/admin/login?next=%2Fautomations%2F3%3Femail%3Da%2540b.c"
            );
        }
        let (status, headers, body) =
            call(&app, get("/mail/admin/login?next=%2Fbroadcasts", None)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("action=\"/mail/admin/login\"") && body.contains("value=\"/broadcasts\"")
        );
        assert!(headers[CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'"));
        assert_eq!(headers[CACHE_CONTROL], "no-store");
        // a wrong password: refused (after the delay), no cookie
        let (status, headers, body) = call(
            &app,
            post("/admin/login", None, None, "name=Ann&password=wrong"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(headers.get(SET_COOKIE).is_none() && body.contains("Wrong password."));
        // no name
        let (status, _, _) = call(
            &app,
            post(
                "/admin/login",
                None,
                None,
                &format!("name=+&password={PASSWORD}"),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        // another site's form
        let (status, _, _) = call(
            &app,
            post(
                "/admin/login",
                None,
                Some("https://evil.test"),
                &format!("name=x&password={PASSWORD}"),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        // an open redirect is not possible through next
        let (_, headers, _) = call(
            &app,
            post(
                "/admin/login",
                None,
                None,
                &format!("name=x&password={PASSWORD}&next=%2F%2Fevil.test"),
            ),
        )
        .await;
        assert_eq!(headers[LOCATION], "/mail/admin");
        let cookie = sign_in(&app, "/mail/admin").await;
        // signed in, the database away: the page says so (503), it does not crash
        let (status, _, body) = call(&app, get("/mail/admin/broadcasts", Some(&cookie))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            body.contains("The database is not answering")
                && body.contains("Signed in as <strong>Ann Op</strong>")
        );
        let (status, _, _) = call(&app, get("/mail/admin/live?view=overview", Some(&cookie))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, _, _) = call(&app, get("/mail/admin/live?view=overview", None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, headers, body) = call(&app, get("/admin/assets/admin.css", None)).await;
        assert_eq!(
            (status, headers[CONTENT_TYPE].to_str().unwrap()),
            (StatusCode::OK, "text/css; charset=utf-8")
        );
        assert!(body.contains("--ink"));
    }

    #[tokio::test]
    async fn posts_need_the_form_token_and_the_origin() {
        let a = admin("https://mail.test");
        let app = routes(Arc::clone(&a));
        let cookie = sign_in(&app, "/admin").await;
        let session = a
            .keys
            .open(cookie.split_once('=').unwrap().1, Admin::now())
            .unwrap();
        let token = a.keys.csrf(&session);
        // no token, a wrong one, another origin, no session: refused before anything is done
        for (cookie, origin, body, says) in [
            (
                Some(cookie.as_str()),
                Some("https://mail.test"),
                String::new(),
                "token",
            ),
            (
                Some(cookie.as_str()),
                Some("https://mail.test"),
                "csrf=0000".to_string(),
                "token",
            ),
            (
                Some(cookie.as_str()),
                Some("https://evil.test"),
                format!("csrf={token}"),
                "Origin",
            ),
            (
                None,
                Some("https://mail.test"),
                format!("csrf={token}"),
                "not signed in",
            ),
        ] {
            let (status, _, text) = call(
                &app,
                post("/admin/broadcasts/1/pause", cookie, origin, &body),
            )
            .await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
            assert!(text.contains(says), "{text}");
        }
        // with the token the action is tried (the database is away: the error page, 503)
        let (status, _, _) = call(
            &app,
            post(
                "/admin/broadcasts/1/pause",
                Some(&cookie),
                Some("https://mail.test"),
                &format!("csrf={token}"),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        // unknown verbs are not found, after the checks
        let (status, _, _) = call(
            &app,
            post(
                "/admin/broadcasts/1/explode",
                Some(&cookie),
                None,
                &format!("csrf={token}"),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // sign out: the cookie is removed
        let (status, headers, _) = call(
            &app,
            post(
                "/admin/logout",
                Some(&cookie),
                None,
                &format!("csrf={token}"),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert!(headers[SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
    }

    #[test]
    fn next_paths_stay_below_the_page() {
        assert_eq!(
            safe_next("/automations/3?email=x"),
            "/automations/3?email=x"
        );
        for bad in [
            "//evil.test",
            "https://evil.test",
            "/\\evil",
            "/a\nb",
            "evil",
        ] {
            assert_eq!(safe_next(bad), "", "{bad}");
        }
    }
}
