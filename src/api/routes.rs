//! HTTP handlers of the reference backend. Errors are
//! `{"code","message"}` with 400, 401, 403, 404, 413 or 422; internal
//! details go to the log, not the response.

use std::sync::Arc;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::http::{self, HttpResponse};
use crate::ids::{ChannelId, MessageId, UserId};
use crate::listen::Guard;
use crate::shutdown::Shutdown;
use crate::token;

use super::store::{self, Written};
use super::{AppState, web};

/// Longest user or channel name.
const MAX_NAME: usize = 64;
/// Longest nonce.
const MAX_NONCE: usize = 64;
/// Most messages `GET /channels/{id}/messages` returns (and its default).
const MAX_LIST: i64 = 100;

/// A failed request: status, stable code, message for the caller.
struct Reject(StatusCode, &'static str, String);

type Reply = Result<HttpResponse, Reject>;

impl Reject {
    fn bad_request(message: impl Into<String>) -> Reject {
        Reject(StatusCode::BAD_REQUEST, "BAD_REQUEST", message.into())
    }
    fn unprocessable(message: impl Into<String>) -> Reject {
        Reject(StatusCode::UNPROCESSABLE_ENTITY, "INVALID", message.into())
    }
    fn not_found(what: &str) -> Reject {
        Reject(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("{what} not found"),
        )
    }
    fn forbidden(message: &str) -> Reject {
        Reject(StatusCode::FORBIDDEN, "FORBIDDEN", message.to_owned())
    }
}

impl From<sqlx::Error> for Reject {
    fn from(err: sqlx::Error) -> Reject {
        tracing::error!(error = %err, "api database error");
        Reject(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "the database failed; try again".to_owned(),
        )
    }
}

pub async fn serve(listener: TcpListener, state: Arc<AppState>, shutdown: Shutdown, guard: Guard) {
    http::serve(listener, shutdown, guard, move |req| {
        let state = state.clone();
        async move {
            match route(req, &state).await {
                Ok(response) => response,
                Err(Reject(status, code, message)) => {
                    http::json(status, &json!({"code": code, "message": message}))
                }
            }
        }
    })
    .await
}

async fn route(req: Request<Incoming>, state: &AppState) -> Reply {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if method == Method::GET
        && let Some(asset) = web::asset(path.trim_start_matches('/'))
    {
        return Ok(web::serve(asset));
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["config.json"]) => Ok(web::config(&state.gateway_url)),
        (&Method::POST, ["users"]) => create_user(req, state).await,
        (&Method::GET, ["users", "@me"]) => {
            let caller = authenticate(&req, state).await?;
            let name = store::user_name(&state.db, caller).await?;
            Ok(http::json(
                StatusCode::OK,
                &json!({"id": caller, "name": name}),
            ))
        }
        (&Method::GET, ["channels"]) => {
            let caller = authenticate(&req, state).await?;
            let channels = store::channels_of(&state.db, caller).await?;
            Ok(http::json(StatusCode::OK, &channels))
        }
        (&Method::GET, ["channels", channel, "messages"]) => {
            let caller = authenticate(&req, state).await?;
            let channel = parse_id(channel, "channel")?;
            list_messages(&req, state, caller, channel).await
        }
        (&Method::POST, ["channels"]) => {
            let caller = authenticate(&req, state).await?;
            create_channel(req, state, caller).await
        }
        (&Method::PUT, ["channels", channel, "members", user]) => {
            let caller = authenticate(&req, state).await?;
            add_member(
                state,
                caller,
                parse_id(channel, "channel")?,
                parse_id(user, "user")?,
            )
            .await
        }
        (&Method::POST, ["channels", channel, "messages"]) => {
            let caller = authenticate(&req, state).await?;
            let channel = parse_id(channel, "channel")?;
            create_message(req, state, caller, channel).await
        }
        (&Method::PATCH, ["channels", channel, "messages", message]) => {
            let caller = authenticate(&req, state).await?;
            let (channel, message) = (parse_id(channel, "channel")?, parse_id(message, "message")?);
            edit_message(req, state, caller, channel, message).await
        }
        (&Method::DELETE, ["channels", channel, "messages", message]) => {
            let caller = authenticate(&req, state).await?;
            let (channel, message) = (parse_id(channel, "channel")?, parse_id(message, "message")?);
            delete_message(state, caller, channel, message).await
        }
        _ => Err(Reject(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("no route for {method} {path}"),
        )),
    }
}

fn parse_id<T: std::str::FromStr>(text: &str, what: &str) -> Result<T, Reject> {
    text.parse()
        .map_err(|_| Reject::not_found(&format!("{what} '{text}'")))
}

/// The caller's user id from `Authorization: <token>`; the user must exist.
async fn authenticate(req: &Request<Incoming>, state: &AppState) -> Result<UserId, Reject> {
    let unauthorized = |m: &str| Reject(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", m.to_owned());
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| unauthorized("send Authorization: <token>"))?;
    let user = state
        .tokens
        .verify(header.trim(), token::now_s())
        .map_err(|_| unauthorized("invalid token"))?;
    if !store::missing_users(&state.db, &[user]).await?.is_empty() {
        return Err(unauthorized("the token's user no longer exists"));
    }
    Ok(user)
}

/// Reads and parses a JSON body within the size limit.
async fn body<T: for<'de> Deserialize<'de>>(
    req: Request<Incoming>,
    state: &AppState,
) -> Result<T, Reject> {
    let limit = state.max_body_bytes;
    let bytes = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|_| {
            Reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                "TOO_LARGE",
                format!("request body is larger than {limit} bytes"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| Reject::bad_request(format!("invalid JSON body: {e}")))
}

fn check_name(name: &str) -> Result<String, Reject> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME {
        return Err(Reject::unprocessable(format!(
            "name must be 1 to {MAX_NAME} characters"
        )));
    }
    Ok(name.to_owned())
}

fn check_content(content: &str, max: usize) -> Result<(), Reject> {
    if content.trim().is_empty() {
        return Err(Reject::unprocessable("content must not be empty"));
    }
    let len = content.chars().count();
    if len > max {
        return Err(Reject::unprocessable(format!(
            "content is {len} characters; the limit is {max}"
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
struct NewUser {
    name: String,
}

async fn create_user(req: Request<Incoming>, state: &AppState) -> Reply {
    let new: NewUser = body(req, state).await?;
    let name = check_name(&new.name)?;
    let id = UserId::new(state.ids.next().get())
        .ok_or_else(|| Reject::bad_request("id space exhausted"))?;
    store::create_user(&state.db, id, &name).await?;
    let token = state.tokens.issue(id, token::now_s());
    Ok(http::json(
        StatusCode::CREATED,
        &json!({"id": id, "name": name, "token": token}),
    ))
}

#[derive(Deserialize)]
struct NewChannel {
    name: String,
    #[serde(default)]
    members: Vec<UserId>,
}

async fn create_channel(req: Request<Incoming>, state: &AppState, caller: UserId) -> Reply {
    let new: NewChannel = body(req, state).await?;
    let name = check_name(&new.name)?;
    let mut members = new.members;
    members.push(caller);
    members.sort_unstable();
    members.dedup();
    let missing = store::missing_users(&state.db, &members).await?;
    if let Some(user) = missing.first() {
        return Err(Reject::unprocessable(format!("user {user} does not exist")));
    }
    let id = ChannelId::new(state.ids.next().get())
        .ok_or_else(|| Reject::bad_request("id space exhausted"))?;
    store::create_channel(&state.db, id, &name, &members).await?;
    Ok(http::json(
        StatusCode::CREATED,
        &json!({"id": id, "name": name, "members": members}),
    ))
}

/// 404 for a missing channel, 403 when the caller isn't a member.
async fn require_member(
    state: &AppState,
    channel: ChannelId,
    caller: UserId,
) -> Result<(), Reject> {
    if !store::channel_exists(&state.db, channel).await? {
        return Err(Reject::not_found("channel"));
    }
    if !store::is_member(&state.db, channel, caller).await? {
        return Err(Reject::forbidden("you are not a member of this channel"));
    }
    Ok(())
}

async fn add_member(state: &AppState, caller: UserId, channel: ChannelId, user: UserId) -> Reply {
    require_member(state, channel, caller).await?;
    if !store::missing_users(&state.db, &[user]).await?.is_empty() {
        return Err(Reject::not_found("user"));
    }
    store::add_member(&state.db, channel, user).await?;
    Ok(http::text(StatusCode::NO_CONTENT, ""))
}

/// A nonce may be a string or an integer, as clients send either.
#[derive(Deserialize)]
#[serde(untagged)]
enum Nonce {
    Text(String),
    Number(i64),
}

#[derive(Deserialize)]
struct NewMessage {
    content: String,
    nonce: Option<Nonce>,
}

async fn create_message(
    req: Request<Incoming>,
    state: &AppState,
    caller: UserId,
    channel: ChannelId,
) -> Reply {
    let new: NewMessage = body(req, state).await?;
    require_member(state, channel, caller).await?;
    check_content(&new.content, state.max_content_len)?;
    let nonce = match new.nonce {
        None => None,
        Some(Nonce::Text(s)) if s.len() <= MAX_NONCE => Some(s),
        Some(Nonce::Number(n)) => Some(n.to_string()),
        Some(Nonce::Text(_)) => {
            return Err(Reject::unprocessable(format!(
                "nonce must be at most {MAX_NONCE} bytes"
            )));
        }
    };
    let written = store::create_message(
        &state.db,
        &state.ids,
        channel,
        caller,
        &new.content,
        nonce.as_deref(),
    )
    .await?;
    let row = match written {
        Written::Created(row) => {
            state.outbox_ready.notify_one();
            row
        }
        Written::Existing(row) => row,
    };
    Ok(http::json(StatusCode::CREATED, &message_json(&row, false)))
}

/// The message object of DESIGN §7; edits also carry `edited_timestamp`.
fn message_json(row: &store::MessageRow, edited: bool) -> serde_json::Value {
    let mut value = row.to_json();
    if !edited && let Some(object) = value.as_object_mut() {
        object.remove("edited_timestamp");
    }
    value
}

/// `GET /channels/{id}/messages?limit=N`: the latest N (default and at
/// most 100) messages, oldest first, for a client that (re)loads a channel.
async fn list_messages(
    req: &Request<Incoming>,
    state: &AppState,
    caller: UserId,
    channel: ChannelId,
) -> Reply {
    require_member(state, channel, caller).await?;
    let limit = match req
        .uri()
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("limit="))
    {
        None => MAX_LIST,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIST).contains(n))
            .ok_or_else(|| {
                Reject::bad_request(format!("limit must be a number from 1 to {MAX_LIST}"))
            })?,
    };
    let rows = store::recent_messages(&state.db, channel, limit).await?;
    let messages: Vec<serde_json::Value> = rows.iter().map(|r| message_json(r, true)).collect();
    Ok(http::json(StatusCode::OK, &messages))
}

#[derive(Deserialize)]
struct Edit {
    content: String,
}

/// 404 unless the message exists in the channel, 403 unless the caller wrote it.
async fn require_author(
    state: &AppState,
    channel: ChannelId,
    message: MessageId,
    caller: UserId,
) -> Result<(), Reject> {
    require_member(state, channel, caller).await?;
    let row = store::get_message(&state.db, channel, message)
        .await?
        .ok_or_else(|| Reject::not_found("message"))?;
    if row.author_id != caller.as_i64() {
        return Err(Reject::forbidden("only the author can change a message"));
    }
    Ok(())
}

async fn edit_message(
    req: Request<Incoming>,
    state: &AppState,
    caller: UserId,
    channel: ChannelId,
    message: MessageId,
) -> Reply {
    let edit: Edit = body(req, state).await?;
    require_author(state, channel, message, caller).await?;
    check_content(&edit.content, state.max_content_len)?;
    let row = store::update_message(&state.db, &state.ids, channel, message, &edit.content)
        .await?
        .ok_or_else(|| Reject::not_found("message"))?;
    state.outbox_ready.notify_one();
    Ok(http::json(StatusCode::OK, &message_json(&row, true)))
}

async fn delete_message(
    state: &AppState,
    caller: UserId,
    channel: ChannelId,
    message: MessageId,
) -> Reply {
    require_author(state, channel, message, caller).await?;
    if !store::delete_message(&state.db, &state.ids, channel, message).await? {
        return Err(Reject::not_found("message"));
    }
    state.outbox_ready.notify_one();
    Ok(http::text(StatusCode::NO_CONTENT, ""))
}
