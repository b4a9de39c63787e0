//! Plugin lookups on PostgreSQL, pipelined over a few connections.
//!
//! Every lookup is still its own `BEGIN READ ONLY` … `ROLLBACK` (the
//! security boundary: whatever the statement changes, `set_config`
//! included, is undone), but its three messages are written together,
//! and lookups running at once share a connection's socket, so
//! PostgreSQL reads many statements per wake-up. sqlx awaits each
//! statement's reply before it sends the next: three round trips per
//! lookup, ~240 µs of PostgreSQL CPU and ~200 µs of the gateway's per
//! event (BENCHMARKS.md, "Ack rate on PostgreSQL").
//!
//! The three messages of one lookup must reach the connection back to
//! back. tokio-postgres queues a request when its future is first polled,
//! so [`PgReader::read`] polls all three once while holding the
//! connection's submit lock, then awaits them without it. Because the
//! `ROLLBACK` is already queued when a lookup is abandoned (its timeout,
//! too many rows), the connection stays usable: tokio-postgres discards
//! the replies nobody waits for.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::{StreamExt, pin_mut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row, Statement};

/// Prepared statements kept per connection: plugins send a few fixed SQL
/// texts, so each is prepared once per connection.
const STATEMENT_CACHE: usize = 128;

/// Lookups in flight on a connection before the next one is used.
const DEPTH: usize = 4;

/// Why a URL can't use the pipelined reader (sqlx reads it instead).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(String);

/// A small set of connections that pipeline read-only lookups.
pub struct PgReader {
    config: tokio_postgres::Config,
    tls: RustlsConnect,
    slots: Box<[Slot]>,
}

impl std::fmt::Debug for PgReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgReader")
            .field("connections", &self.slots.len())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Slot {
    live: ArcSwapOption<Live>,
    /// One connect at a time per slot; lookups arriving meanwhile wait.
    connecting: tokio::sync::Mutex<()>,
}

/// A connection's prepared statements, by SQL text, then parameter types
/// (looked up by `&str` and `&[Type]`: no allocation per lookup).
type Statements = HashMap<Box<str>, Vec<(Vec<Type>, Statement)>>;

struct Live {
    client: Client,
    /// The session's `statement_timeout`: that of the lookup that opened
    /// the connection. A lookup with another limit sets its own in its
    /// transaction (a reload may change it).
    timeout_ms: u64,
    /// Held while one lookup queues its three requests.
    submit: Mutex<()>,
    statements: Mutex<Statements>,
    in_flight: AtomicUsize,
}

impl PgReader {
    /// Reads `url` as tokio-postgres does; connects lazily.
    pub fn new(url: &str, connections: usize) -> Result<PgReader, Unsupported> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| Unsupported(e.to_string()))?;
        if config.get_application_name().is_none() {
            config.application_name("otako-gateway plugin reads");
        }
        Ok(PgReader {
            config,
            tls: RustlsConnect::new().map_err(|e| Unsupported(e.to_string()))?,
            slots: (0..connections.max(1)).map(|_| Slot::default()).collect(),
        })
    }

    /// Runs `sql` with `params` (of the declared `types`) in its own
    /// read-only transaction, handing each row to `on_row` until it
    /// returns `false`. `timeout` is enforced by the server.
    pub async fn read(
        &self,
        sql: &str,
        types: &[Type],
        params: &[&(dyn ToSql + Sync)],
        timeout: Duration,
        mut on_row: impl FnMut(Row) -> bool,
    ) -> Result<(), tokio_postgres::Error> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let (slot, live) = self.connection(timeout_ms).await?;
        live.in_flight.fetch_add(1, Ordering::Relaxed);
        let _counted = InFlight(&live);
        let rows = AtomicUsize::new(0);
        let mut on_row = |row| {
            rows.fetch_add(1, Ordering::Relaxed);
            on_row(row)
        };
        let mut result = live
            .lookup(sql, types, params, timeout_ms, &mut on_row)
            .await;
        if rows.load(Ordering::Relaxed) == 0 && result.as_ref().is_err_and(plan_changed) {
            // A table changed shape under the prepared statement (a
            // migration): prepare it again, once, rather than fail every
            // later lookup of this text on this connection.
            live.forget(sql, types);
            result = live
                .lookup(sql, types, params, timeout_ms, &mut on_row)
                .await;
        }
        if live.client.is_closed() {
            // The next lookup opens a fresh connection.
            slot.live.compare_and_swap(&Some(live.clone()), None);
        }
        result
    }

    /// The first open connection with fewer than [`DEPTH`] lookups in
    /// flight, else a new one while a slot is free, else the least busy.
    /// Lookups that share a connection share its writes and PostgreSQL's
    /// wake-ups, so filling one before the next costs less per lookup
    /// than handing each to an idle connection (measured on the ack-rate
    /// bench, BENCHMARKS.md "Plugin lookups fill a connection"); the
    /// depth bounds how many lookups a slow statement holds up, and
    /// beyond it load spreads (one PostgreSQL process runs on one core).
    async fn connection(
        &self,
        timeout_ms: u64,
    ) -> Result<(&Slot, Arc<Live>), tokio_postgres::Error> {
        loop {
            let mut best: Option<(&Slot, Arc<Live>, usize)> = None;
            let mut empty = None;
            for slot in &self.slots {
                match slot.live.load_full() {
                    Some(live) if !live.client.is_closed() => {
                        let load = live.in_flight.load(Ordering::Relaxed);
                        if load < DEPTH {
                            return Ok((slot, live));
                        }
                        if best.as_ref().is_none_or(|b| load < b.2) {
                            best = Some((slot, live, load));
                        }
                    }
                    _ => empty = empty.or(Some(slot)),
                }
            }
            let slot = match (empty, best) {
                (None, Some((slot, live, _))) => return Ok((slot, live)),
                // `new` makes at least one slot.
                (empty, _) => empty.unwrap_or(&self.slots[0]),
            };
            match slot.connecting.try_lock() {
                Ok(connecting) => {
                    return Ok((slot, self.connect(slot, connecting, timeout_ms).await?));
                }
                // Another lookup is opening it: choose again once it is
                // open, rather than pile every lookup of a burst onto it.
                Err(_) => drop(slot.connecting.lock().await),
            }
        }
    }

    /// Opens a session that is read-only by default, with `timeout_ms`
    /// as its `statement_timeout`, holding the slot's `connecting` lock.
    async fn connect(
        &self,
        slot: &Slot,
        _connecting: tokio::sync::MutexGuard<'_, ()>,
        timeout_ms: u64,
    ) -> Result<Arc<Live>, tokio_postgres::Error> {
        if let Some(live) = slot.live.load_full().filter(|l| !l.client.is_closed()) {
            return Ok(live);
        }
        let mut config = self.config.clone();
        let options = format!(
            "{} -c default_transaction_read_only=on -c statement_timeout={timeout_ms}",
            config.get_options().unwrap_or_default()
        );
        config.options(options.trim_start());
        let (client, connection) = config.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::warn!(error = %err, "plugin read connection to PostgreSQL closed");
            }
        });
        let live = Arc::new(Live {
            client,
            timeout_ms,
            submit: Mutex::new(()),
            statements: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
        });
        slot.live.store(Some(live.clone()));
        Ok(live)
    }
}

impl Live {
    /// One lookup's `BEGIN READ ONLY`, statement and `ROLLBACK`, queued
    /// back to back.
    async fn lookup(
        &self,
        sql: &str,
        types: &[Type],
        params: &[&(dyn ToSql + Sync)],
        timeout_ms: u64,
        on_row: &mut impl FnMut(Row) -> bool,
    ) -> Result<(), tokio_postgres::Error> {
        let statement = self.statement(sql, types).await?;
        let begin_sql: std::borrow::Cow<'static, str> = if timeout_ms == self.timeout_ms {
            "BEGIN READ ONLY".into()
        } else {
            format!("BEGIN READ ONLY; SET LOCAL statement_timeout = {timeout_ms}").into()
        };
        let client = &self.client;
        let begin = client.batch_execute(&begin_sql);
        let query = client.query_raw(&statement, params.iter().copied());
        let end = client.batch_execute("ROLLBACK");
        pin_mut!(begin, query, end);
        // First polls queue the requests, in this order, with no other
        // lookup's in between.
        let (begun, rows, ended) = std::future::poll_fn(|cx| {
            let _submit = self.submit.lock().unwrap_or_else(PoisonError::into_inner);
            Poll::Ready((
                begin.as_mut().poll(cx),
                query.as_mut().poll(cx),
                end.as_mut().poll(cx),
            ))
        })
        .await;
        let begun = match begun {
            Poll::Ready(r) => r,
            Poll::Pending => begin.await,
        };
        let rows = match rows {
            Poll::Ready(r) => r,
            Poll::Pending => query.await,
        };
        begun?;
        {
            // Dropped before the ROLLBACK is awaited: unread rows
            // would hold up the connection's replies behind them.
            let stream = rows?;
            pin_mut!(stream);
            while let Some(row) = stream.next().await {
                if !on_row(row?) {
                    break;
                }
            }
        }
        match ended {
            Poll::Ready(r) => r,
            Poll::Pending => end.await,
        }
    }

    fn forget(&self, sql: &str, types: &[Type]) {
        if let Some(prepared) = self.cached().get_mut(sql) {
            prepared.retain(|(t, _)| t != types);
        }
    }

    async fn statement(
        &self,
        sql: &str,
        types: &[Type],
    ) -> Result<Statement, tokio_postgres::Error> {
        let found = self.cached().get(sql).and_then(|prepared| {
            prepared
                .iter()
                .find(|(t, _)| t == types)
                .map(|(_, statement)| statement.clone())
        });
        if let Some(statement) = found {
            return Ok(statement);
        }
        let statement = self.client.prepare_typed(sql, types).await?;
        let mut cache = self.cached();
        if cache.len() >= STATEMENT_CACHE {
            cache.clear();
        }
        cache
            .entry(sql.into())
            .or_default()
            .push((types.to_vec(), statement.clone()));
        Ok(statement)
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, Statements> {
        self.statements
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// PostgreSQL's answer to a prepared statement whose result columns
/// changed since it was prepared.
fn plan_changed(err: &tokio_postgres::Error) -> bool {
    err.as_db_error().is_some_and(|db| {
        *db.code() == tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED
            && db
                .message()
                .contains("cached plan must not change result type")
    })
}

struct InFlight<'a>(&'a Live);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// TLS for `sslmode=prefer|require`, which (as in libpq and sqlx) encrypts
/// without checking the server's certificate. `verify-ca`/`verify-full`
/// URLs are not read by tokio-postgres, so they stay on sqlx, which checks.
#[derive(Clone)]
struct RustlsConnect(Arc<rustls::ClientConfig>);

impl RustlsConnect {
    fn new() -> Result<RustlsConnect, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(Unverified(provider.clone()));
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(RustlsConnect(Arc::new(config)))
    }
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnector;
    type Error = rustls::pki_types::InvalidDnsNameError;

    /// `domain` is empty for a Unix socket, where PostgreSQL answers the
    /// TLS request with "no" (as libpq, `prefer` then goes on in the clear).
    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnector, Self::Error> {
        let name = match domain {
            "" => None,
            name => Some(rustls::pki_types::ServerName::try_from(name.to_owned())?),
        };
        Ok(RustlsConnector {
            config: self.0.clone(),
            name,
        })
    }
}

struct RustlsConnector {
    config: Arc<rustls::ClientConfig>,
    name: Option<rustls::pki_types::ServerName<'static>>,
}

impl<S> TlsConnect<S> for RustlsConnector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = self.name.ok_or_else(|| {
                io::Error::other("TLS needs a server name: a Unix socket has none")
            })?;
            let connector = tokio_rustls::TlsConnector::from(self.config);
            Ok(RustlsStream(connector.connect(name, stream).await?))
        })
    }
}

struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

/// Accepts any certificate, still checking the handshake's signatures.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What tokio-postgres can't read (certificate checks, sqlx's own
    /// parameters) is refused here, so those URLs keep sqlx's reads.
    #[test]
    fn urls_tokio_postgres_cannot_read_stay_on_sqlx() {
        for url in [
            "postgres://u@db/x?sslmode=verify-full",
            "postgres://u@db/x?sslmode=verify-ca",
            "postgres://u@db/x?statement-cache-capacity=10",
        ] {
            assert!(PgReader::new(url, 2).is_err(), "{url}");
        }
        let reader = PgReader::new(
            "postgresql://u:pw@db:5433/x?sslmode=require&options=-c%20search_path%3Ds",
            3,
        )
        .unwrap();
        assert_eq!(reader.slots.len(), 3);
        assert_eq!(reader.config.get_options(), Some("-c search_path=s"));
    }
}
