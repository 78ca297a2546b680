//! `GET /v1/openapi.json`: the API described in OpenAPI 3.1, written here by hand from the route
//! table (`routes::ROUTES`), so a route cannot be served undescribed; a unit test (`api::tests`)
//! checks the document against what the router serves, field by field.

use std::sync::OnceLock;

use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value as Json};

use super::routes::{Operation, MAX_BATCH, ROUTES};

pub async fn serve() -> Response {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let body = DOCUMENT.get_or_init(|| document().to_string()).clone();
    (
        [
            (CONTENT_TYPE, "application/json"),
            // the document changes only with the daemon's version
            (axum::http::header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// The whole document.
pub fn document() -> Json {
    let mut paths = serde_json::Map::new();
    for route in ROUTES {
        paths
            .entry(route.path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("an object")
            .insert(route.method.openapi().into(), operation(route.operation));
    }
    paths.insert("/v1/results".into(), json!({"get": read_results()}));
    paths
        .entry("/v1/suppressions/{email}")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("an object")
        .insert("get".into(), read_suppression());
    paths
        .entry("/v1/results/subscriptions")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("an object")
        .insert("get".into(), list_subscriptions());
    paths.insert(
        "/v1/openapi.json".into(),
        json!({"get": {
            "operationId": "openapi",
            "summary": "This document",
            "security": [],
            "responses": {"200": {"description": "The OpenAPI 3.1 description of this API",
                                  "content": {"application/json": {"schema": {"type": "object"}}}}}
        }}),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "herald HTTP API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Track events, identify contacts, send transactional email, manage list \
                membership, suppressions and read what herald did (results) for one workspace: the API key's. Each request \
                is one call of the SQL function named in its description, with the same checks and error \
                messages. Writes take an \
                Idempotency-Key header: the same key with the same body within 24 hours returns the first \
                answer (with Idempotent-Replayed: true) without running again; with another body, 409."
        },
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"apiKey": {
                "type": "http", "scheme": "bearer", "bearerFormat": "hk_<id>_<64 hex>",
                "description": "A key made by herald.create_api_key(workspace, name, scopes) (shown once)."
            }},
            "parameters": {"idempotencyKey": {
                "name": "Idempotency-Key", "in": "header", "required": false,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
                "description": "Makes a retry safe: the first answer is returned again for 24 hours."
            }},
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error"],
                    "properties": {"error": {
                        "type": "object", "required": ["message", "code"],
                        "properties": {
                            "message": {"type": "string", "description": "The SQL function's message, or what is wrong with the request"},
                            "hint": {"type": ["string", "null"]},
                            "detail": {"type": ["string", "null"]},
                            "code": {"type": "string", "description": "The SQLSTATE when the database refused, else a word such as unauthorized, invalid_json, unknown_field, batch_too_large, unavailable, extension_too_old"}
                        }
                    }}
                },
                "Event": {
                    "type": "object", "required": ["email", "kind"], "additionalProperties": false,
                    "properties": {
                        "email": {"type": "string", "format": "email"},
                        "kind": {"type": "string", "minLength": 1, "maxLength": 200},
                        "payload": {"type": "object"},
                        "occurred_at": {"type": "string", "format": "date-time"}
                    }
                },
                "Contact": {
                    "type": "object", "required": ["email"], "additionalProperties": false,
                    "properties": {
                        "email": {"type": "string", "format": "email"},
                        "attributes": {"type": "object", "description": "Merged into the stored ones; a key set to null removes it"},
                        "timezone": {"type": "string", "description": "An IANA name, e.g. Europe/Paris"}
                    }
                }
            }
        }
    })
}

/// GET /v1/results/subscriptions: the workspace's result webhooks.
fn list_subscriptions() -> Json {
    json!({
        "operationId": "list_result_subscriptions",
        "summary": "The workspace's result subscriptions (webhooks) and their state",
        "description": "Reads herald.result_subscription_overview for the API key's workspace. Needs the key \
            scope \"results\". state: idle, delivering, or blocked (a delivery failed for good or ran out of \
            attempts: an admin redrives its job, herald.redrive).",
        "parameters": [],
        "responses": {
            "200": {"description": "Every subscription, oldest first",
                    "content": {"application/json": {"schema": {
                        "type": "object", "required": ["subscriptions"],
                        "properties": {"subscriptions": {"type": "array", "items": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "integer"}, "url": {"type": "string"},
                                "kinds": {"type": ["array", "null"], "items": {"type": "string"}},
                                "options": {"type": "object"}, "cursor": {"type": "integer"},
                                "state": {"type": "string", "enum": ["idle", "delivering", "blocked"]},
                                "last_error": {"type": ["string", "null"]},
                                "created_at": {"type": "string", "format": "date-time"}
                            }}}}}}}},
            "401": error_response("No API key, an unknown one, or a revoked one"),
            "403": error_response("The key lacks the scope results"),
            "422": error_response("A query parameter (this read takes none)"),
            "429": error_response("The key is over its rate (HERALD_API_RATE_PER_KEY); the Retry-After header says when to come back"),
            "501": error_response(TOO_OLD),
            "503": error_response("The database is not reachable; try again")
        }
    })
}

/// The 501 of an operation the database's extension does not have yet (the results operations came
/// in 0.16.0, the suppressions ones in 0.18.0; a daemon may be upgraded before the extension).
const TOO_OLD: &str = "The database's herald extension is older than 0.16.0 and lacks this operation: ALTER EXTENSION herald UPDATE";
const TOO_OLD_SUPPRESSIONS: &str = "The database's herald extension is older than 0.18.0 and lacks this operation: ALTER EXTENSION herald UPDATE";

/// The email path parameter of the suppressions routes.
fn email_parameter() -> Json {
    json!({"name": "email", "in": "path", "required": true, "schema": {"type": "string", "format": "email"},
           "description": "The address (percent-encoded if need be); compared trimmed and lower-cased"})
}

/// GET /v1/suppressions/{email}: whether an address is suppressed in the key's workspace, and why.
fn read_suppression() -> Json {
    let error = error_response;
    json!({
        "operationId": "read_suppression",
        "summary": "Whether an address is suppressed (never mailed) in the workspace, and why",
        "description": "Reads herald.suppressions for the API key's workspace. Needs the key scope \"suppressions\". \
            reason: unsubscribed, hard_bounce (reported by a provider, or refused by the receiving server at send \
            time: detail.smtp_reply), complaint, manual, or erased (the contact was erased; not lifted by DELETE).",
        "parameters": [email_parameter()],
        "responses": {
            "200": {"description": "The address and whether it is suppressed",
                    "content": {"application/json": {"schema": {
                        "type": "object", "required": ["email", "suppressed"],
                        "properties": {
                            "email": {"type": "string"}, "suppressed": {"type": "boolean"},
                            "reason": {"type": "string", "enum": ["unsubscribed", "hard_bounce", "complaint", "manual", "erased"]},
                            "detail": {"type": "object"},
                            "since": {"type": "string", "format": "date-time"}
                        }}}}},
            "401": error("No API key, an unknown one, or a revoked one"),
            "403": error("The key lacks the scope suppressions"),
            "422": error("Not an email address, or a query string (this read takes none)"),
            "429": error("The key is over its rate (HERALD_API_RATE_PER_KEY); the Retry-After header says when to come back"),
            "501": error(TOO_OLD_SUPPRESSIONS),
            "503": error("The database is not reachable; try again")
        }
    })
}

fn error_response(what: &str) -> Json {
    json!({"description": what,
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

/// GET /v1/results: a read, with its arguments in the query.
fn read_results() -> Json {
    let error = error_response;
    json!({
        "operationId": "read_results",
        "summary": "Read the workspace's results (what herald did), in order, from a cursor",
        "description": "Calls herald.read_results for the API key's workspace. Needs the key scope \"results\" \
            (never a default: results carry contact ids, replies and contexts). Pass the answer's next as \
            the following call's after: nothing is skipped or read twice. GET /stream?kinds=… serves the \
            same results as server-sent events to the same key.",
        "parameters": [
            {"name": "after", "in": "query", "required": false,
             "schema": {"type": "integer", "minimum": 0},
             "description": "A result id: the results after it. 0 reads every result kept; left out, the read starts at what is published now (and next says where that is)."},
            {"name": "kinds", "in": "query", "required": false, "style": "form", "explode": false,
             "schema": {"type": "array", "items": {"type": "string"}},
             "description": "Comma-separated kinds, e.g. email.sent,email.bounced; left out, every kind."},
            {"name": "limit", "in": "query", "required": false,
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}}
        ],
        "responses": {
            "200": {"description": "The results after the cursor, oldest first",
                    "content": {"application/json": {"schema": {
                        "type": "object", "required": ["results", "next"],
                        "properties": {
                            "results": {"type": "array", "items": {
                                "type": "object", "required": ["id", "kind", "at", "data"],
                                "properties": {
                                    "id": {"type": "integer"}, "kind": {"type": "string"},
                                    "at": {"type": "string", "format": "date-time"},
                                    "contact_id": {"type": "integer"}, "automation_id": {"type": "integer"},
                                    "enrollment_id": {"type": "integer"}, "broadcast_id": {"type": "integer"},
                                    "job_id": {"type": "integer"}, "data": {"type": "object"}
                                }}},
                            "next": {"type": "integer", "description": "The after of the next call"}
                        }}}}},
            "400": error("A query parameter given twice"),
            "401": error("No API key, an unknown one, or a revoked one"),
            "403": error("The key lacks the scope results"),
            "422": error("A bad after, kinds or limit, or an unknown parameter (the SQL function's message)"),
            "429": error("The key is over its rate (HERALD_API_RATE_PER_KEY); the Retry-After header says when to come back"),
            "501": error(TOO_OLD),
            "503": error("The database is not reachable; try again")
        }
    })
}

fn operation(op: Operation) -> Json {
    let (summary, function, properties, required, answer) = describe(op);
    let mut parameters = vec![json!({"$ref": "#/components/parameters/idempotencyKey"})];
    if matches!(op, Operation::Subscribe | Operation::Unsubscribe) {
        parameters.push(json!({"name": "list", "in": "path", "required": true,
                               "schema": {"type": "string", "minLength": 1, "maxLength": 200}}));
    }
    if matches!(
        op,
        Operation::UnsubscribeResults | Operation::RetryResultSubscription
    ) {
        parameters.push(json!({"name": "id", "in": "path", "required": true,
                               "schema": {"type": "integer", "minimum": 1}}));
    }
    if op == Operation::Unsuppress {
        parameters.push(email_parameter());
    }
    let error = error_response;
    let mut described = json!({
        "operationId": op.sql_name(),
        "summary": summary,
        "description": format!("Calls {function} for the API key's workspace. Needs the key scope \"{}\".", op.scope()),
        "parameters": parameters,
        "requestBody": {"required": !op.fields().is_empty(), "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": false,
            "properties": properties, "required": required
        }}}},
        "responses": {
            "200": {"description": "Done (or, with Idempotent-Replayed: true, done before)",
                    "content": {"application/json": {"schema": answer}}},
            "400": error("Not JSON, too deep, or a malformed header"),
            "401": error("No API key, an unknown one, or a revoked one"),
            "403": error("The key lacks the scope"),
            "404": error("An unknown template or provider"),
            "409": error("The Idempotency-Key was used for another request"),
            "413": error("Too many items, or a body over 1 MiB"),
            "422": error("A value the SQL function refuses (its message, hint and detail)"),
            "429": error("The key is over its rate (HERALD_API_RATE_PER_KEY); the Retry-After header says when to come back"),
            "503": error("The database is not reachable; try again")
        }
    });
    match op.scope() {
        "results" => described["responses"]["501"] = error(TOO_OLD),
        "suppressions" => described["responses"]["501"] = error(TOO_OLD_SUPPRESSIONS),
        _ => {}
    }
    described
}

/// (summary, SQL function, body properties, required fields, answer schema) of an operation.
fn describe(op: Operation) -> (&'static str, &'static str, Json, Json, Json) {
    let id =
        json!({"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}});
    let counts = |names: [&str; 3]| {
        json!({"type": "object", "required": names,
               "properties": {names[0]: {"type": "integer"}, names[1]: {"type": "integer"}, names[2]: {"type": "integer"}}})
    };
    let emails = json!({
        "email": {"type": "string", "description": "One address (or use emails)"},
        "emails": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_BATCH}
    });
    match op {
        Operation::Track => (
            "Track one event (creates the contact if new)",
            "herald.track(workspace, email, kind, payload)",
            json!({"email": {"type": "string", "format": "email"},
                   "kind": {"type": "string", "minLength": 1, "maxLength": 200},
                   "payload": {"type": "object"}}),
            json!(["email", "kind"]),
            id,
        ),
        Operation::TrackMany => (
            "Track many events in one call",
            "herald.track_many(workspace, events)",
            json!({"events": {"type": "array", "maxItems": MAX_BATCH,
                              "items": {"$ref": "#/components/schemas/Event"}}}),
            json!(["events"]),
            json!({"type": "object", "required": ["accepted"],
                   "properties": {"accepted": {"type": "integer", "description": "Events recorded (all, or none with an error naming the first bad entry)"}}}),
        ),
        Operation::UpsertContact => (
            "Identify a contact: create it, or merge its attributes",
            "herald.upsert_contact(workspace, email, attributes)",
            json!({"email": {"type": "string", "format": "email"},
                   "attributes": {"type": "object"}}),
            json!(["email"]),
            id,
        ),
        Operation::UpsertContacts => (
            "Create or update many contacts",
            "herald.upsert_contacts(workspace, contacts)",
            json!({"contacts": {"type": "array", "maxItems": MAX_BATCH,
                                "items": {"$ref": "#/components/schemas/Contact"}}}),
            json!(["contacts"]),
            counts(["inserted", "updated", "rejected"]),
        ),
        Operation::Send => (
            "Send a transactional email with a template",
            "herald.send(workspace, email, template, context, provider, dedupe_key)",
            json!({"email": {"type": "string", "format": "email"},
                   "template": {"type": "string"},
                   "context": {"type": "object", "description": "Template variables"},
                   "provider": {"type": "string", "default": "default"},
                   "dedupe_key": {"type": "string", "description": "Sending twice with one key sends once"}}),
            json!(["email", "template"]),
            id,
        ),
        Operation::Subscribe => (
            "Subscribe addresses to a list (creates the list and contacts if new)",
            "herald.subscribe(workspace, list, emails)",
            emails,
            json!([]),
            counts(["subscribed", "already", "rejected"]),
        ),
        Operation::Unsubscribe => (
            "Unsubscribe addresses from a list",
            "herald.unsubscribe(workspace, list, emails)",
            emails,
            json!([]),
            counts(["unsubscribed", "not_subscribed", "rejected"]),
        ),
        Operation::SubscribeResults => (
            "Subscribe a URL to the workspace's results: POSTed to it in order, signed, retried",
            "herald.subscribe_results(workspace, url, kinds, options)",
            json!({"url": {"type": "string", "format": "uri", "description": "http or https; the daemon's address policy applies"},
                   "kinds": {"type": ["array", "null"], "items": {"type": "string"}, "description": "Left out: every kind"},
                   "options": {"type": "object", "description": "batch (1-1000, default 100), max_attempts (1-100, default 20), timeout_ms, after (a result id; default: from now on)"}}),
            json!(["url"]),
            id,
        ),
        Operation::UnsubscribeResults => (
            "End a result subscription (its delivery not yet handed out is cancelled)",
            "herald.unsubscribe_results(workspace, id)",
            json!({}),
            json!([]),
            json!({"type": "object", "required": ["unsubscribed"],
                   "properties": {"unsubscribed": {"type": "boolean", "description": "false: no such subscription in the key's workspace (or ended already)"}}}),
        ),
        Operation::RetryResultSubscription => (
            "Deliver again to a blocked result subscription (its batch failed for good or ran out of attempts)",
            "herald.redrive / herald.retry_failed of the subscription's delivery job",
            json!({}),
            json!([]),
            json!({"type": "object", "required": ["retried", "state"],
                   "properties": {"retried": {"type": "boolean", "description": "false: it was not blocked (nothing to retry)"},
                                  "state": {"type": "string", "enum": ["idle", "delivering", "blocked"],
                                            "description": "As GET /v1/results/subscriptions gives it"}}}),
        ),
        Operation::Suppress => (
            "Suppress an address: herald never mails it again in this workspace (until lifted)",
            "herald.suppress(workspace, email, reason, detail)",
            json!({"email": {"type": "string", "format": "email"},
                   "reason": {"type": "string", "enum": ["unsubscribed", "hard_bounce", "complaint", "manual"], "default": "manual"},
                   "detail": {"type": "object", "description": "Kept with it, e.g. a ticket number"}}),
            json!(["email"]),
            json!({"type": "object", "required": ["added"],
                   "properties": {"added": {"type": "boolean", "description": "false: it was suppressed already (its reason is kept)"}}}),
        ),
        Operation::Unsuppress => (
            "Lift an address's suppression (not an erased contact's)",
            "herald.unsuppress(workspace, email)",
            json!({}),
            json!([]),
            json!({"type": "object", "required": ["removed"],
                   "properties": {"removed": {"type": "boolean", "description": "false: it was not suppressed (or was erased)"}}}),
        ),
    }
}
