//! One client connection, start to finish, in one task: the handshake
//! (auth, path, the token's revocation), registration under the per-user
//! limit, HELLO, then a single loop that selects over the socket, the
//! queue and the heartbeat timer (also the token's expiry), and finally
//! the close handshake.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Utf8Bytes;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use tracing::Instrument;

use super::Inner;
use super::control_only::{ControlOnly, is_data_frame};
use super::frame;
use super::held::Held;
use super::queue::{Epoch, Queue, REPLACED, REVOKED, SLOW_CONSUMER};
use super::registry::{NoSlot, Released, ResumeFailed, Resumed, Slot};
use super::resume::{self, Greeting, Refused};
use crate::ids::UserId;
use crate::listen::{CLOSE_TIMEOUT, MAX_HEADERS, Prefixed, hang_up};
use crate::revoke;
use crate::shutdown::Shutdown;
use crate::token::{self, Claims, TokenKey};

/// The only path clients may upgrade on.
const PATH: &str = "/gateway";
/// The subprotocol the gateway answers when offered (DESIGN §2).
const SUBPROTOCOL: &str = "otako.v1";
/// A subprotocol carrying the token, for browsers that keep it out of URLs.
const TOKEN_PROTOCOL: &str = "otako.token.";
/// Most frames written per flush, and the byte budget of one batch: enough
/// to cut syscalls under load, small enough to keep heartbeats and reads
/// responsive between batches.
const MAX_BATCH: usize = 32;
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Most times a session woken for a short queue yields before writing;
/// it stops as soon as a yield brought no new frame.
const COALESCE_YIELDS: usize = 12;
/// Yields taken even when no frame arrived meanwhile: a fan-out may be
/// runnable right behind this task.
const MIN_YIELDS: usize = 2;

/// Close codes (DESIGN §2).
mod code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    /// Never sent: the label for connections that ended without a close frame.
    pub const ABNORMAL: u16 = 1006;
    pub const UNKNOWN: u16 = 4000;
    pub const CLIENT_DATA: u16 = 4003;
    pub const HEARTBEAT: u16 = 4008;
    pub const LIMIT: u16 = 4010;
}

fn reason(code: u16) -> &'static str {
    match code {
        code::GOING_AWAY => "gateway shutting down",
        code::PROTOCOL => "protocol error",
        code::CLIENT_DATA => "clients only receive",
        code::HEARTBEAT => "heartbeat timeout",
        SLOW_CONSUMER => "slow consumer",
        code::LIMIT => "session limit reached",
        REPLACED => "session replaced",
        REVOKED => "token revoked or expired",
        _ => "error",
    }
}

type Ws<'a> = WebSocketStream<Prefixed<Held<'a>, ControlOnly>>;

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// We close with this code.
    Close(u16),
    /// The client sent a close frame; we answer it.
    PeerClosed,
    /// The connection is gone (reset, EOF, write error): nothing to send.
    Dropped,
}

impl Exit {
    /// Whether the session stays detached for a resume: the network
    /// dropped, or we closed for a heartbeat timeout or a slow consumer.
    /// A client close (1000), 4003/4004/4010/4011 and shutdown end it.
    fn resumable(self) -> bool {
        matches!(
            self,
            Exit::Dropped | Exit::Close(code::HEARTBEAT | SLOW_CONSUMER)
        )
    }

    /// The `sessions_closed` label.
    fn code(self) -> u16 {
        match self {
            Exit::Close(code) => code,
            Exit::PeerClosed => code::NORMAL,
            Exit::Dropped => code::ABNORMAL,
        }
    }
}

/// Serves one accepted TCP connection until it closes or shutdown.
pub(super) async fn handle(inner: Arc<Inner>, tcp: TcpStream, shutdown: Shutdown) {
    let mut admitted = None;
    let mut lookup = Lookup::Unchecked;
    let deadline = inner.guard.deadline();
    // TLS and the request head under the handshake timeout (an oversized
    // head is answered 431 there). Both handshake phases are boxed: their
    // state (TLS, the head, tungstenite's handshake machine) is large and
    // would otherwise stay reserved inline in this task for the session's
    // whole life, so every idle session would pay for it.
    let opened = tokio::select! {
        _ = shutdown.cancelled() => return,
        opened = Box::pin(inner.guard.accept(tcp, deadline)) => opened,
    };
    let Some((mut stream, head)) = opened else {
        return;
    };
    let hold = AtomicBool::new(false);
    let handshake = async {
        // tungstenite's callback can't await, so the token's revocation
        // is looked up from the head read ahead; the callback compares.
        lookup = look_up_revocation(&inner, &head).await;
        let checked = lookup;
        // tungstenite fixes the callback's error type (an HTTP response).
        #[allow(clippy::result_large_err)]
        let callback = |req: &Request, mut resp: Response| match admit(&inner, req, checked) {
            Ok(admission) => {
                if admission.otako_v1 {
                    resp.headers_mut().insert(
                        header::SEC_WEBSOCKET_PROTOCOL,
                        header::HeaderValue::from_static(SUBPROTOCOL),
                    );
                }
                admitted = Some(admission);
                // The 101 waits for HELLO: one write for both.
                hold.store(true, Ordering::Relaxed);
                Ok(resp)
            }
            Err(refusal) => Err(refusal.response()),
        };
        let io = Prefixed::new(head, Held::new(&mut stream, &hold)).checked(ControlOnly::new());
        tokio_tungstenite::accept_hdr_async_with_config(io, callback, Some(inner.ws_config)).await
    };
    let result = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = timeout_at(deadline, Box::pin(handshake)) => r,
    };
    let mut ws = match result {
        Ok(Ok(ws)) => {
            // Held bytes go out with the next flush: HELLO, or the close
            // frame if there is no slot.
            hold.store(false, Ordering::Relaxed);
            ws
        }
        Ok(Err(WsError::Http(response))) => {
            // The refusal was already written by the handshake.
            let refused = |reason| inner.guard.refused(reason);
            match response.status() {
                StatusCode::UNAUTHORIZED => {
                    inner.metrics.auth_failures.inc();
                }
                StatusCode::FORBIDDEN => refused("origin"),
                StatusCode::SERVICE_UNAVAILABLE if lookup == Lookup::Failed => {
                    refused("revocation_check");
                }
                StatusCode::SERVICE_UNAVAILABLE => refused("limit"),
                _ => {}
            }
            return;
        }
        Ok(Err(WsError::Protocol(err))) => {
            // Not a WebSocket upgrade, or a broken one: say which rather
            // than hang up silently.
            tracing::debug!(error = %err, "refused a non-websocket request");
            let response = handshake_refusal(&err);
            let _ = timeout(CLOSE_TIMEOUT, stream.write_all(response.as_bytes())).await;
            return;
        }
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "handshake failed");
            return;
        }
        Err(_) => {
            inner.guard.refused("timeout");
            tracing::debug!("handshake timed out");
            return;
        }
    };
    let Some(Admission {
        claims: Claims { user, issued_at },
        connection: _connection,
        resume,
        ..
    }) = admitted
    else {
        // Unreachable: a completed handshake went through the callback.
        finish(&mut ws, Exit::Close(code::UNKNOWN), &mut Unsent::default()).await;
        return;
    };

    // Debug level: an enabled span keeps its fields on the heap for the
    // session's life, which at the default `info` level would cost every
    // idle session; turn on `otako_gateway=debug` to get per-session context.
    // No session id: like tokens, it is a credential (a resume names it).
    let span = tracing::debug_span!("session", user_id = %user);
    async {
        let (slot, epoch, greeting) = match attach(&inner, user, issued_at, resume).await {
            Ok(attached) => attached,
            Err(no) => {
                // No slot: the limit (4010), or in cluster mode no way to
                // count now (1001: reconnect, perhaps to another node).
                let close = match no {
                    NoSlot::Limit => code::LIMIT,
                    NoSlot::Unavailable => code::GOING_AWAY,
                };
                tracing::debug!(code = close, "no session slot; closing");
                finish(&mut ws, Exit::Close(close), &mut Unsent::default()).await;
                inner.metrics.session_closed(close);
                return;
            }
        };
        inner.metrics.sessions_open.inc();
        match greeting {
            Greeting::Resumed { .. } => tracing::debug!("session resumed"),
            _ => tracing::debug!("session open"),
        }

        let mut unsent = Unsent::default();
        let exit = run(
            &inner,
            &mut ws,
            &mut unsent,
            &slot,
            epoch,
            user,
            greeting,
            &shutdown,
        )
        .await;
        let resumable = exit
            .resumable()
            .then(|| std::time::Instant::now() + inner.resume_window);
        match inner
            .admission
            .release(user, slot.clone(), epoch, resumable)
            .await
        {
            Released::Detached => {
                inner.detached_changed();
                tracing::debug!(code = exit.code(), "session detached; resumable");
            }
            Released::TakenOver => tracing::debug!("session taken over by a resume"),
            Released::Ended => {}
        }
        // Boxed for the same reason as a guarded write: only a closing
        // session needs its state.
        Box::pin(finish(&mut ws, exit, &mut unsent)).await;

        inner.metrics.sessions_open.dec();
        inner.metrics.session_closed(exit.code());
        if exit.code() == REVOKED {
            inner.metrics.sessions_revoked.inc();
        }
        tracing::debug!(code = exit.code(), "session closed");
    }
    .instrument(span)
    .await;
}

/// The session this connection serves: the one a resume names if it can
/// be resumed, else a new one (HELLO says why), or why there is no slot.
async fn attach(
    inner: &Arc<Inner>,
    user: UserId,
    issued_at: u64,
    request: resume::Request,
) -> Result<(Arc<Slot>, Epoch, Greeting), NoSlot> {
    let max = usize::try_from(inner.config.max_per_user.get()).unwrap_or(usize::MAX);
    let on_limit = inner.config.on_limit;
    let greeting = match request {
        resume::Request::Fresh => Greeting::Fresh,
        resume::Request::Malformed => Greeting::Refused(Refused::UnknownSession),
        resume::Request::Resume { id, seq } => {
            let resumed = inner
                .admission
                .resume(user, id, seq, issued_at, max, on_limit)
                .await;
            match resumed {
                Ok(Resumed {
                    slot,
                    epoch,
                    replayed,
                }) => {
                    inner.detached_changed();
                    inner.metrics.resume("resumed", "none");
                    inner.metrics.frames_replayed.inc_by(replayed);
                    return Ok((slot, epoch, Greeting::Resumed { replayed }));
                }
                Err(ResumeFailed::NoSlot(no)) => {
                    let why = match no {
                        NoSlot::Limit => "session_limit",
                        NoSlot::Unavailable => "cluster_unavailable",
                    };
                    inner.metrics.resume("refused", why);
                    return Err(no);
                }
                Err(ResumeFailed::Refused(why)) => Greeting::Refused(why),
            }
        }
    };
    if let Greeting::Refused(why) = greeting {
        inner.metrics.resume("new_session", why.reason());
    }
    let queue = Queue::new(
        inner.config.outbound_queue.get(),
        inner.config.resume_buffer.get(),
        inner.metrics.resume_buffer_bytes.clone(),
    );
    let slot = Arc::new(Slot::new(queue, issued_at));
    match inner
        .admission
        .admit(user, slot.clone(), max, on_limit)
        .await
    {
        Err(no) => return Err(no),
        Ok(Some(_)) => tracing::debug!("replaced the user's oldest session"),
        Ok(None) => {}
    }
    inner.metrics.sessions_opened.inc();
    Ok((slot, 0, greeting))
}

/// Plain HTTP is told to upgrade (426); an upgrade request that breaks
/// the handshake rules (a bad `Sec-WebSocket-Key`, a missing version) is a
/// 400 that names the rule, so a hand-written client can see its mistake.
fn handshake_refusal(err: &ProtocolError) -> String {
    match err {
        ProtocolError::MissingConnectionUpgradeHeader
        | ProtocolError::MissingUpgradeWebSocketHeader => "HTTP/1.1 426 Upgrade Required\r\n\
             Upgrade: websocket\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            .to_owned(),
        other => {
            let reason = format!("{other}\n");
            format!(
                "HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\
                 Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{reason}",
                reason.len()
            )
        }
    }
}

/// Why a handshake was refused. Clients learn only the status; the
/// reason goes to the debug log.
enum Refusal {
    NotFound,
    Forbidden,
    Unauthorized,
    Full,
    /// The token's revocation could not be read: refused, not let through.
    Unavailable,
}

impl Refusal {
    fn response(self) -> ErrorResponse {
        match self {
            Refusal::NotFound => refuse(StatusCode::NOT_FOUND, "not found"),
            Refusal::Forbidden => refuse(StatusCode::FORBIDDEN, "origin not allowed"),
            Refusal::Unauthorized => refuse(StatusCode::UNAUTHORIZED, "unauthorized"),
            Refusal::Full => refuse(StatusCode::SERVICE_UNAVAILABLE, "too many connections"),
            Refusal::Unavailable => refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot check the token now",
            ),
        }
    }
}

/// An accepted handshake: who it is, whether to answer `otako.v1`, and
/// its place under `max_connections`.
struct Admission {
    claims: Claims,
    otako_v1: bool,
    connection: Connection,
    /// What the query asks for: a plain connect or a resume.
    resume: resume::Request,
}

/// One upgraded client connection counted against `max_connections`;
/// dropping it frees the place.
struct Connection(Arc<Inner>);

impl Connection {
    fn reserve(inner: &Arc<Inner>) -> Option<Connection> {
        let max = inner.edge.max_connections;
        inner
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        inner.metrics.client_connections.inc();
        Some(Connection(inner.clone()))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.client_connections.dec();
    }
}

/// Checks a handshake request in order: path, origin, credentials, the
/// token's revocation, then takes a connection place. The token itself is
/// never logged.
fn admit(inner: &Arc<Inner>, req: &Request, lookup: Lookup) -> Result<Admission, Refusal> {
    if req.uri().path() != PATH {
        return Err(Refusal::NotFound);
    }
    if !origin_allowed(inner.edge.allowed_origins.as_deref(), req) {
        tracing::debug!("handshake refused: origin not allowed");
        return Err(Refusal::Forbidden);
    }
    let (token, otako_v1) = credentials(req).map_err(|why| {
        tracing::debug!("handshake refused: {why}");
        Refusal::Unauthorized
    })?;
    let claims = inner
        .tokens
        .verify_claims(token, token::now_s())
        .map_err(|err| {
            tracing::debug!(reason = %err, "handshake refused: bad token");
            Refusal::Unauthorized
        })?;
    if inner.revocations.is_some() {
        match lookup {
            Lookup::Done { user, revoked_at } if user == claims.user => {
                if revoke::is_revoked(claims.issued_at, revoked_at) {
                    tracing::debug!("handshake refused: token revoked");
                    return Err(Refusal::Unauthorized);
                }
            }
            Lookup::Failed => return Err(Refusal::Unavailable),
            // The head read ahead didn't parse as tungstenite's did:
            // refused rather than admitted unchecked.
            _ => {
                tracing::debug!("handshake refused: token revocation not checked");
                return Err(Refusal::Unauthorized);
            }
        }
    }
    let Some(connection) = Connection::reserve(inner) else {
        tracing::debug!("handshake refused: max_connections reached");
        return Err(Refusal::Full);
    };
    Ok(Admission {
        claims,
        otako_v1,
        connection,
        resume: resume::Request::from_query(req.uri().query()),
    })
}

/// A token's revocation, read before the handshake's callback runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    /// No database to ask, or no token whose signature held.
    Unchecked,
    Done {
        user: UserId,
        revoked_at: Option<u64>,
    },
    Failed,
}

/// Looks up the revocation of the user whose token `head` carries, if
/// its signature holds: a forged or malformed token costs no read.
async fn look_up_revocation(inner: &Inner, head: &[u8]) -> Lookup {
    let Some(db) = &inner.revocations else {
        return Lookup::Unchecked;
    };
    let Some(claims) = claims_in_head(&inner.tokens, head) else {
        return Lookup::Unchecked;
    };
    match revoke::revoked_at(db, claims.user).await {
        Ok(revoked_at) => Lookup::Done {
            user: claims.user,
            revoked_at,
        },
        Err(err) => {
            tracing::warn!(error = %err, "handshake refused: cannot read token revocations");
            Lookup::Failed
        }
    }
}

/// The claims of the valid token a request head carries, read the way
/// [`credentials`] reads tungstenite's parse of the same head.
pub(crate) fn claims_in_head(tokens: &TokenKey, head: &[u8]) -> Option<Claims> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    if !matches!(parsed.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let mut req = Request::builder().uri(parsed.path.unwrap_or("/"));
    for h in parsed.headers.iter().filter(|h| {
        h.name.eq_ignore_ascii_case(header::AUTHORIZATION.as_str())
            || h.name
                .eq_ignore_ascii_case(header::SEC_WEBSOCKET_PROTOCOL.as_str())
    }) {
        req = req.header(h.name, h.value);
    }
    let req = req.body(()).ok()?;
    let (token, _) = credentials(&req).ok()?;
    tokens.verify_claims(token, token::now_s()).ok()
}

/// Cross-site WebSocket hijacking guard. No `Origin` (not a browser) is
/// fine; otherwise the origin must be listed, or with no list, be the
/// page's own host (`Origin` authority equal to `Host`).
pub(crate) fn origin_allowed(allowed: Option<&[String]>, req: &Request) -> bool {
    let mut origins = req.headers().get_all(header::ORIGIN).iter();
    let (Some(origin), None) = (origins.next(), origins.next()) else {
        return req.headers().get(header::ORIGIN).is_none();
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.to_ascii_lowercase();
    match allowed {
        Some(list) => list.iter().any(|o| o == "*" || *o == origin),
        None => {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok());
            let authority = origin.split_once("://").map(|(_, a)| a);
            matches!((host, authority), (Some(h), Some(a)) if h.eq_ignore_ascii_case(a))
        }
    }
}

/// The token, from the `Authorization` header, `?token=` or the
/// `otako.token.<token>` subprotocol (equivalent ways), and whether the
/// client offered `otako.v1`. Two different tokens are ambiguous: 401.
/// The error says why, for the debug log.
pub(crate) fn credentials(req: &Request) -> Result<(&str, bool), &'static str> {
    let headers = req.headers();
    let mut tokens: Vec<&str> = Vec::new();
    for value in headers.get_all(header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| "unreadable Authorization header")?;
        tokens.push(value.strip_prefix("Bearer ").unwrap_or(value).trim());
    }
    if let Some(query) = req.uri().query() {
        tokens.extend(
            query
                .split('&')
                .filter_map(|pair| pair.strip_prefix("token=")),
        );
    }
    let mut otako_v1 = false;
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let value = value
            .to_str()
            .map_err(|_| "unreadable Sec-WebSocket-Protocol header")?;
        for protocol in value.split(',').map(str::trim) {
            if protocol == SUBPROTOCOL {
                otako_v1 = true;
            } else if let Some(token) = protocol.strip_prefix(TOKEN_PROTOCOL) {
                tokens.push(token);
            }
        }
    }
    match tokens.split_first() {
        Some((first, rest)) if !first.is_empty() && rest.iter().all(|t| t == first) => {
            Ok((first, otako_v1))
        }
        Some(_) => Err("empty or conflicting tokens"),
        None => Err("no token"),
    }
}

fn refuse(status: StatusCode, body: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(body.to_owned()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    headers.insert(
        header::CONTENT_LENGTH,
        header::HeaderValue::from(body.len()),
    );
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// What woke the session loop.
enum Wake {
    Shutdown,
    Tick,
    Inbound(Option<Result<Message, WsError>>),
    Queue,
}

/// The open session: HELLO, then frames out, pings out, pongs in, until
/// something ends it.
#[allow(clippy::too_many_arguments)]
async fn run(
    inner: &Inner,
    ws: &mut Ws<'_>,
    unsent: &mut Unsent,
    slot: &Slot,
    epoch: Epoch,
    user: UserId,
    greeting: Greeting,
    shutdown: &Shutdown,
) -> Exit {
    let issued_at = slot.issued_at.load(std::sync::atomic::Ordering::Relaxed);
    let interval = inner.heartbeat;
    // With `auth.token_ttl_s`, the session ends (4004) when its token
    // expires; the heartbeat timer doubles as the expiry timer.
    let expiry = inner.tokens.expires_at(issued_at).map(|at| {
        let left_ms = (u128::from(at) * 1000).saturating_sub(crate::db::now_ms().max(0) as u128);
        Instant::now() + Duration::from_millis(u64::try_from(left_ms).unwrap_or(u64::MAX))
    });
    let wake_at = |next_ping: Instant| expiry.map_or(next_ping, |e| e.min(next_ping));
    let hello = frame::hello(
        slot.id,
        user,
        inner.config.heartbeat_interval_ms.get(),
        greeting,
    );
    let guard = Guard {
        slot,
        epoch,
        shutdown,
        stall: 2 * interval,
    };
    if let Err(exit) = guard.run(ws.send(Message::text(hello))).await {
        return exit;
    }

    // One inline timer (no boxed `Interval`) drives both pings and the
    // pong deadline.
    let mut next_ping = Instant::now() + interval;
    let mut timer = pin!(sleep_until(wake_at(next_ping)));
    // When the oldest unanswered ping went out.
    let mut unanswered: Option<Instant> = None;

    loop {
        let wake = tokio::select! {
            biased;
            _ = shutdown.cancelled() => Wake::Shutdown,
            _ = timer.as_mut() => Wake::Tick,
            msg = ws.next() => Wake::Inbound(msg),
            _ = slot.queue.ready(epoch) => Wake::Queue,
        };
        match wake {
            Wake::Shutdown => return Exit::Close(code::GOING_AWAY),
            Wake::Tick => {
                let now = Instant::now();
                if expiry.is_some_and(|at| now >= at) {
                    tracing::debug!("token expired; closing with 4004");
                    return Exit::Close(REVOKED);
                }
                if unanswered.is_some_and(|sent| now.duration_since(sent) >= 2 * interval) {
                    tracing::debug!("no pong within two heartbeat intervals");
                    return Exit::Close(code::HEARTBEAT);
                }
                unanswered.get_or_insert(now);
                next_ping = now + interval;
                timer.as_mut().reset(wake_at(next_ping));
                let ping = ws.send(Message::Ping(Bytes::new()));
                if let Err(exit) = guard.run(ping).await {
                    return exit;
                }
            }
            Wake::Inbound(msg) => match inbound(inner, msg) {
                Inbound::Pong => unanswered = None,
                Inbound::Ignore => {}
                Inbound::End(exit) => return exit,
            },
            Wake::Queue => {
                if let Some(code) = slot.queue.close_code(epoch) {
                    return Exit::Close(code);
                }
                // Woken for a frame or two: let the fan-outs already
                // runnable go first, so their frames share this write.
                // Each socket write costs far more than a frame; under
                // load this is what batches, and idle it costs two polls.
                // While frames keep arriving, keep letting them.
                let mut seen = slot.queue.pending();
                for round in 0..COALESCE_YIELDS {
                    if seen >= MAX_BATCH as u64 {
                        break;
                    }
                    tokio::task::yield_now().await;
                    let now = slot.queue.pending();
                    if now == seen && round + 1 >= MIN_YIELDS {
                        break;
                    }
                    seen = now;
                }
                let batch = write_batch(inner, ws, unsent, slot, epoch);
                if let Err(exit) = guard.run(batch).await {
                    return exit;
                }
            }
        }
    }
}

enum Inbound {
    Pong,
    Ignore,
    End(Exit),
}

/// Classifies one read: clients may only pong, ping and close.
fn inbound(inner: &Inner, msg: Option<Result<Message, WsError>>) -> Inbound {
    let reject = || {
        inner.metrics.client_data_rejected.inc();
        tracing::debug!("client sent data; closing with 4003");
        Inbound::End(Exit::Close(code::CLIENT_DATA))
    };
    match msg {
        Some(Ok(Message::Pong(_))) => Inbound::Pong,
        // tungstenite queues the pong reply and writes it on the next read.
        Some(Ok(Message::Ping(_) | Message::Frame(_))) => Inbound::Ignore,
        Some(Ok(Message::Close(_))) => Inbound::End(Exit::PeerClosed),
        Some(Ok(Message::Text(_) | Message::Binary(_))) => reject(),
        // Over the tiny inbound cap, or text that isn't UTF-8: data either way.
        Some(Err(WsError::Capacity(_) | WsError::Utf8(_))) => reject(),
        // A data frame's header (a first fragment, a continuation), caught
        // before tungstenite buffers any of it.
        Some(Err(WsError::Io(err))) if is_data_frame(&err) => reject(),
        Some(Err(WsError::Protocol(err))) => {
            tracing::debug!(error = %err, "client broke the websocket protocol");
            if matches!(
                err,
                tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake
            ) {
                Inbound::End(Exit::Dropped)
            } else {
                Inbound::End(Exit::Close(code::PROTOCOL))
            }
        }
        Some(Err(err)) => {
            tracing::debug!(error = %err, "read failed");
            Inbound::End(Exit::Dropped)
        }
        None => Inbound::End(Exit::Dropped),
    }
}

/// Writes up to one batch of queued frames (a resume's replay first:
/// they are the same log) with one socket write.
async fn write_batch(
    inner: &Inner,
    ws: &mut Ws<'_>,
    unsent: &mut Unsent,
    slot: &Slot,
    epoch: Epoch,
) -> Result<(), WsError> {
    // A pong tungstenite queued while reading may be partly written:
    // it goes first, so frames never interleave on the wire.
    ws.flush().await?;
    let mut frames = 0u64;
    while frames < MAX_BATCH as u64 && unsent.0.len() < MAX_BATCH_BYTES {
        let popped = slot.queue.pop(epoch, |seq, frame| {
            frame.encode_ws(seq, &mut unsent.0);
        });
        if popped.is_none() {
            break;
        }
        frames += 1;
    }
    unsent.write_out(ws.get_mut()).await?;
    inner.metrics.frames_delivered.inc_by(frames);
    Ok(())
}

/// Data frames encoded for the socket and not yet written: they bypass
/// tungstenite ([`frame::ClientFrame::encode_ws`]), which only writes the
/// control frames. A write cut short by a close request leaves the rest
/// here, and it goes out before the close frame: a client never sees half
/// a frame.
#[derive(Default)]
struct Unsent(Vec<u8>);

/// Past this, a written buffer is freed rather than kept for the next
/// batch: a burst must not leave every session holding its peak.
const KEEP_UNSENT: usize = 16 * 1024;

impl Unsent {
    /// Writes what is left and flushes (TLS holds records until then).
    /// Cancel-safe: what a write took is removed before the next one.
    async fn write_out(&mut self, io: &mut Prefixed<Held<'_>, ControlOnly>) -> std::io::Result<()> {
        while !self.0.is_empty() {
            let n = io.write(&self.0).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            if n == self.0.len() && self.0.capacity() > KEEP_UNSENT {
                self.0 = Vec::new();
            } else {
                // Usually all of it; a partial write moves the rest up.
                self.0.drain(..n);
            }
        }
        io.flush().await
    }
}

/// What a write is guarded by: the session's close request (for this
/// connection's epoch), shutdown, and a stall limit.
struct Guard<'a> {
    slot: &'a Slot,
    epoch: Epoch,
    shutdown: &'a Shutdown,
    stall: Duration,
}

impl<'a> Guard<'a> {
    /// Runs a write, but gives up on it if the session is told to close
    /// (or taken over), shutdown begins, or it stalls past `stall` (a
    /// client that stopped reading can't answer pings either: 4008).
    ///
    /// Boxed: a guarded write's state (the write, its timer, two waits)
    /// is the largest a session has, and a session is idle most of its
    /// life; inline, every idle session's task would reserve room for it
    /// (the task shrank from 2,304 to 1,888 bytes).
    fn run<'w>(
        &'w self,
        write: impl Future<Output = Result<(), WsError>> + Send + 'w,
    ) -> Pin<Box<dyn Future<Output = Result<(), Exit>> + Send + 'w>>
    where
        'a: 'w,
    {
        Box::pin(async move {
            tokio::select! {
                biased;
                result = write => result.map_err(|err| {
                    tracing::debug!(error = %err, "write failed");
                    Exit::Dropped
                }),
                _ = self.shutdown.cancelled() => Err(Exit::Close(code::GOING_AWAY)),
                code = self.slot.queue.closed(self.epoch) => Err(Exit::Close(code)),
                _ = sleep(self.stall) => Err(Exit::Close(code::HEARTBEAT)),
            }
        })
    }
}

/// Ends the connection: our close frame (or the reply to the client's),
/// then TCP FIN, then reading until the client hangs up so unread input
/// can't turn our close into a reset. Every step is time-limited.
async fn finish(ws: &mut Ws<'_>, exit: Exit, unsent: &mut Unsent) {
    // The rest of a frame a close request cut short: whole frames only.
    if exit != Exit::Dropped
        && !matches!(
            timeout(CLOSE_TIMEOUT, unsent.write_out(ws.get_mut())).await,
            Ok(Ok(_))
        )
    {
        return;
    }
    match exit {
        Exit::Close(code) => {
            let frame = CloseFrame {
                code: code.into(),
                reason: Utf8Bytes::from_static(reason(code)),
            };
            match timeout(CLOSE_TIMEOUT, ws.close(Some(frame))).await {
                Ok(Ok(())) | Ok(Err(WsError::ConnectionClosed)) => {}
                _ => return,
            }
        }
        Exit::PeerClosed => {
            // tungstenite queued the close reply when it read the client's.
            let _ = timeout(CLOSE_TIMEOUT, ws.flush()).await;
        }
        Exit::Dropped => return,
    }
    hang_up(ws.get_mut().get_mut()).await;
}
