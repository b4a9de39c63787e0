//! The route table: event type → a loaded plugin version with its limits,
//! config and pool of ready instances. A table is immutable and swapped
//! whole, so an event finishes on the version it started with.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use wasmtime::{Store, Trap, UpdateDeadline, WasmBacktrace};

use super::bindings::{self, Plugin};
use super::engine::{Compiled, PluginEngine, idle_per_route};
use super::host::{HostState, RouteCtx, truncate};
use super::sandbox::Captured;
use super::{Audience, Delivery, Event};
use crate::affinity::LocalPool;
use crate::failure::{ErrorCode, Failure, Trace};
use crate::ids::{ChannelId, UserId};

/// Calls one instance serves before it is replaced. Instances are reused
/// because a fresh one costs ~45 µs against ~3 µs for a call; recycling
/// bounds whatever a guest accumulates between events (leaks, caches,
/// fragmentation) at the price of one instantiation per this many events.
const MAX_CALLS_PER_INSTANCE: u32 = 10_000;

/// Longest client-facing event name a plugin may return.
const MAX_EVENT_NAME: usize = 64;

/// Every routed plugin of one config version.
pub(crate) struct RouteTable {
    pub routes: HashMap<String, Arc<Route>>,
}

impl RouteTable {
    pub(crate) fn empty() -> Self {
        RouteTable {
            routes: HashMap::new(),
        }
    }
}

/// One ready instance: its store and the typed export.
struct Instance {
    store: Store<HostState>,
    plugin: Plugin,
    calls: u32,
}

/// One route version: a compiled plugin, its limits and its instances.
pub(crate) struct Route {
    pub compiled: Compiled,
    pub ctx: Arc<RouteCtx>,
    engine: PluginEngine,
    timeout: Duration,
    memory_bytes: usize,
    /// Ready instances, each preferably taken by the worker that ran it
    /// last (its memory is in that core's cache).
    idle: LocalPool<Instance>,
    /// Most ready instances kept: set by [`prewarm`](Self::prewarm) from
    /// the memory a fresh instance starts with (`engine::idle_per_route`).
    max_idle: AtomicUsize,
    /// Bounds live instances (running or idle) to the route's share of the
    /// engine's pooling allocator; events beyond it wait their turn.
    slots: Semaphore,
    max_live: usize,
}

/// How a route version's instance pool was sized, for the load log line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolSize {
    /// Linear memory of a fresh instance, before any event.
    pub instance_bytes: usize,
    pub max_live: usize,
    pub max_idle: usize,
}

impl Route {
    /// The route's per-call time limit.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn new(
        engine: PluginEngine,
        compiled: Compiled,
        ctx: Arc<RouteCtx>,
        timeout: Duration,
        memory_bytes: usize,
        max_live: usize,
    ) -> Self {
        Route {
            compiled,
            ctx,
            engine,
            timeout,
            memory_bytes,
            idle: LocalPool::default(),
            max_idle: AtomicUsize::new(max_live),
            slots: Semaphore::new(max_live),
            max_live,
        }
    }

    /// Creates one instance and parks it, so the first event doesn't pay
    /// for it and a plugin that can't start fails at load, not per event;
    /// its starting memory sizes the idle pool.
    pub(crate) async fn prewarm(&self) -> Result<PoolSize, Failure> {
        let instance = self.instantiate("").await?;
        let instance_bytes = instance.store.data().limits.memory;
        let max_idle = idle_per_route(self.max_live, instance_bytes);
        self.max_idle.store(max_idle, Ordering::Relaxed);
        self.park(instance);
        Ok(PoolSize {
            instance_bytes,
            max_live: self.max_live,
            max_idle,
        })
    }

    /// Runs the plugin for one event. `reuse` is false only in the
    /// benchmark that measures what the pool saves.
    pub(crate) async fn call(
        &self,
        event: &Event<'_>,
        reuse: bool,
    ) -> Result<Vec<Delivery>, Failure> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Failure::new(ErrorCode::Internal, "plugin route is shutting down"))?;
        let popped = if reuse { self.idle.take() } else { None };
        let mut instance = match popped {
            Some(instance) => instance,
            None => {
                // Once per instance the pool grows by (or per call on a
                // fresh-instance benchmark): how tests see the pool fill.
                tracing::debug!(plugin = %self.ctx.plugin, "no idle instance; starting one");
                self.instantiate(event.id).await?
            }
        };
        instance
            .store
            .data_mut()
            .begin_call(event.id, event.arrived, self.timeout);
        instance.store.set_epoch_deadline(1);
        let input = bindings::Event {
            name: event.name.to_owned(),
            id: event.id.to_owned(),
            data: event.data.to_owned(),
        };
        // If this future is dropped mid-call, `instance` is dropped with it:
        // an interrupted instance is never reused.
        let result = instance
            .plugin
            .call_handle(&mut instance.store, &input)
            .await;
        instance.calls += 1;
        let stderr = self.drain_output(&instance.store, event.id);
        match result {
            Ok(Ok(deliveries)) => {
                if reuse {
                    self.park(instance);
                }
                convert(deliveries).map_err(|message| {
                    self.failure(ErrorCode::PluginOutput, message, Vec::new(), None)
                })
            }
            Ok(Err(err)) => {
                if reuse {
                    self.park(instance);
                }
                let code = handler_code(&err.code);
                let message = truncate(&err.message, 1024).to_owned();
                let mut failure = self.failure(code.clone(), message, Vec::new(), None);
                if code == ErrorCode::PluginError {
                    failure.trace.chain.push(format!(
                        "the plugin returned an invalid error code '{}'",
                        truncate(&err.code, 80)
                    ));
                }
                Err(failure)
            }
            Err(err) => Err(self.crashed(&instance.store, &err, stderr)),
        }
    }

    async fn instantiate(&self, event_id: &str) -> Result<Instance, Failure> {
        let state = HostState::new(self.ctx.clone(), self.memory_bytes);
        let mut store = Store::new(&self.engine.engine, state);
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_callback(|mut cx| {
            let call = &mut cx.data_mut().call;
            if Instant::now() >= call.deadline {
                call.timed_out = true;
                Ok(UpdateDeadline::Interrupt)
            } else {
                // Give the tokio worker back once per tick, then go on.
                Ok(UpdateDeadline::Yield(1))
            }
        });
        // Instantiation may run guest initialisers: same limits as a call.
        store
            .data_mut()
            .begin_call(event_id, Instant::now(), self.timeout);
        store.set_epoch_deadline(1);
        match self.start(&mut store).await {
            Ok(plugin) => Ok(Instance {
                store,
                plugin,
                calls: 0,
            }),
            Err(err) => {
                let stderr = self.drain_output(&store, event_id);
                let mut failure = self.crashed(&store, &err, stderr);
                failure.message = format!(
                    "plugin {} could not start: {}",
                    self.ctx.plugin, failure.message
                );
                Err(failure)
            }
        }
    }

    /// Instantiates; a dev loader (wit/dev.wit) also evaluates the
    /// handler's sources, so a broken save fails here, at load.
    async fn start(&self, store: &mut Store<HostState>) -> wasmtime::Result<Plugin> {
        if self.ctx.dev_files.is_none() {
            return self.compiled.pre.instantiate_async(&mut *store).await;
        }
        let instance = self
            .compiled
            .pre
            .instance_pre()
            .instantiate_async(&mut *store)
            .await?;
        let plugin = Plugin::new(&mut *store, &instance)?;
        let load = instance
            .get_typed_func::<(), (Result<(), String>,)>(&mut *store, "load")
            .map_err(|e| e.context("the dev loader exports no `load`"))?;
        let (loaded,) = load.call_async(&mut *store, ()).await?;
        loaded
            .map_err(|reason| wasmtime::format_err!("the saved source does not load: {reason}"))?;
        Ok(plugin)
    }

    /// Returns a healthy instance to the pool unless it is due for
    /// recycling.
    fn park(&self, instance: Instance) {
        // Linear memory never shrinks: an instance that once grew past half
        // its limit is replaced, so one big event can't leave later events
        // failing with PLUGIN_MEMORY that a fresh instance would handle.
        let grown = instance.store.data().limits.memory > self.memory_bytes / 2;
        if grown || instance.calls >= MAX_CALLS_PER_INSTANCE {
            return;
        }
        let max_idle = self.max_idle.load(Ordering::Relaxed);
        if self.idle.give(instance, max_idle).is_err() {
            tracing::debug!(plugin = %self.ctx.plugin, max_idle, "idle pool full; instance dropped");
        }
    }

    /// Forwards what the plugin printed to tracing, as one quoted field
    /// (`plugin_output`, control characters escaped) so a printed newline
    /// can't start a forged gateway log line; returns its stderr for a
    /// failure's trace.
    fn drain_output(&self, store: &Store<HostState>, event_id: &str) -> Captured {
        let state = store.data();
        let stdout = state.stdout.take();
        let stderr = state.stderr.take();
        for (stream, out) in [("stdout", &stdout), ("stderr", &stderr)] {
            if !out.text.is_empty() {
                tracing::info!(
                    plugin = %self.ctx.plugin,
                    event_id,
                    stream,
                    dropped = out.dropped,
                    plugin_output = ?out.text.trim_end(),
                    "plugin output"
                );
            }
        }
        stderr
    }

    /// The failure for a call that ended in a trap or host error.
    fn crashed(
        &self,
        store: &Store<HostState>,
        err: &wasmtime::Error,
        stderr: Captured,
    ) -> Failure {
        let state = store.data();
        let plugin = &self.ctx.plugin;
        let (code, message) = if state.call.timed_out {
            (
                ErrorCode::PluginTimeout,
                format!(
                    "plugin {plugin} ran past its {} ms time limit",
                    self.timeout.as_millis()
                ),
            )
        } else if state.limits.exceeded {
            (
                ErrorCode::PluginMemory,
                format!(
                    "plugin {plugin} needed more than its {} MiB memory limit",
                    self.memory_bytes / (1024 * 1024)
                ),
            )
        } else if let Some(trap) = err.downcast_ref::<Trap>() {
            (
                ErrorCode::PluginTrap,
                format!("plugin {plugin} trapped: {trap}"),
            )
        } else {
            (
                ErrorCode::PluginError,
                format!("plugin {plugin} failed: {}", err.root_cause()),
            )
        };
        let mut chain: Vec<String> = err.chain().map(|c| c.to_string()).collect();
        if !stderr.text.is_empty() {
            chain.push(format!("plugin stderr: {}", stderr.text.trim_end()));
        }
        let backtrace = err
            .downcast_ref::<WasmBacktrace>()
            .map(|bt| bt.to_string())
            .filter(|bt| !bt.is_empty());
        tracing::debug!(plugin = %plugin, code = %code, error = %chain.join(": "), "plugin call failed");
        self.failure(code, message, chain, backtrace)
    }

    fn failure(
        &self,
        code: ErrorCode,
        message: String,
        causes: Vec<String>,
        backtrace: Option<String>,
    ) -> Failure {
        let mut chain = vec![message.clone()];
        chain.extend(causes);
        Failure::new(code, message).with_trace(Trace {
            plugin: Some(self.ctx.plugin.clone()),
            plugin_hash: Some(self.ctx.hash.clone()),
            chain,
            backtrace,
        })
    }
}

/// A plugin's own error code. The SDK's `BAD_EVENT` and `DB_ERROR` mean
/// what the host's codes of that name mean, so they become those.
fn handler_code(code: &str) -> ErrorCode {
    match ErrorCode::from_handler(code) {
        ErrorCode::Handler(c) if c == "BAD_EVENT" => ErrorCode::BadEvent,
        ErrorCode::Handler(c) if c == "DB_ERROR" => ErrorCode::DbError,
        other => other,
    }
}

/// Checks what a plugin returned and turns it into host deliveries.
pub(crate) fn convert(deliveries: Vec<bindings::Delivery>) -> Result<Vec<Delivery>, String> {
    deliveries
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let valid_name = !d.event.is_empty()
                && d.event.len() <= MAX_EVENT_NAME
                && d.event
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if !valid_name {
                return Err(format!(
                    "delivery {i} has event name '{}', which is not UPPER_SNAKE_CASE of at most {MAX_EVENT_NAME} bytes",
                    truncate(&d.event, 80)
                ));
            }
            if let Err(err) = serde_json::from_str::<&serde_json::value::RawValue>(&d.payload) {
                return Err(format!(
                    "delivery {i} ({}) has a payload that is not JSON: {err}",
                    d.event
                ));
            }
            let audience = match d.audience {
                bindings::Audience::Everyone => Audience::Everyone,
                bindings::Audience::Channel(id) => Audience::Channel(
                    id.parse::<ChannelId>().map_err(|_| {
                        format!(
                            "delivery names channel '{}' which is not an id",
                            truncate(&id, 80)
                        )
                    })?,
                ),
                bindings::Audience::Users(ids) => {
                    // Distinct, first mention kept: a user named twice
                    // still gets the frame once per session.
                    let mut seen = HashSet::with_capacity(ids.len());
                    let mut users = Vec::with_capacity(ids.len());
                    for id in &ids {
                        let user = id.parse::<UserId>().map_err(|_| {
                            format!(
                                "delivery names user '{}' which is not an id",
                                truncate(id, 80)
                            )
                        })?;
                        if seen.insert(user) {
                            users.push(user);
                        }
                    }
                    Audience::Users(users)
                }
            };
            Ok(Delivery {
                event: d.event,
                payload: d.payload,
                audience,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_users(ids: &[&str]) -> Result<Vec<Delivery>, String> {
        convert(vec![bindings::Delivery {
            event: "MESSAGE_CREATE".into(),
            payload: "{}".into(),
            audience: bindings::Audience::Users(ids.iter().map(|s| s.to_string()).collect()),
        }])
    }

    #[test]
    fn a_user_named_twice_is_one_recipient() {
        let out = to_users(&["3", "1", "3", "2", "1"]).unwrap();
        let users: Vec<u64> = match &out[0].audience {
            Audience::Users(users) => users.iter().map(|u| u.get()).collect(),
            other => panic!("{other:?}"),
        };
        assert_eq!(users, [3, 1, 2]);
    }

    #[test]
    fn a_user_that_is_not_an_id_is_refused() {
        let err = to_users(&["1", "bob"]).unwrap_err();
        assert!(err.contains("'bob' which is not an id"), "{err}");
    }
}
