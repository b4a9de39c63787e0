//! The wasmtime engine every plugin runs on: its configuration (pooling
//! allocator, epoch interruption), the epoch ticker, the linker, and
//! compilation with an on-disk cache of compiled code, whole components
//! and single functions.

use std::borrow::Cow;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{CacheStore, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::{Plugin, PluginPre};
use super::host::HostState;

/// How often the epoch advances. Deadlines are checked at this grain, and
/// a running plugin yields to the tokio scheduler once per tick, so a
/// CPU-bound plugin holds a worker thread for at most this long at a time.
pub(crate) const TICK: Duration = Duration::from_millis(5);

/// The wasmtime this cache format belongs to (pinned in Cargo.toml).
const WASMTIME_VERSION: &str = "48.0.8";

/// Largest `memory_mb` a route may ask for: the pooling allocator reserves
/// each memory slot up front, so its size is fixed when the engine starts.
pub(crate) const MAX_MEMORY_MB: u32 = 1024;

/// Instance slots in the pooling allocator (wasmtime's default count).
/// Every live instance holds one: idle pooled instances and those running.
/// Each slot reserves address space, not memory: 4 GiB of virtual space
/// plus a guard per linear memory (so 32-bit wasm needs no bounds checks),
/// about 4 TiB in all on a 128 TiB address space; only touched pages
/// become resident.
pub(crate) const POOL_INSTANCES: u32 = 1000;

/// Most live instances (running or idle) one route version may hold. On
/// two cores a handful of instances already saturate the CPU; the rest
/// cover events waiting on the database, and on PostgreSQL the calls
/// waiting at once are the lookups that run as one statement (48 against
/// 16: ack-rate over a Unix socket ~24,000 -> ~34,000 events/s,
/// BENCHMARKS.md). Further events queue for an instance rather than fail.
pub const INSTANCES_PER_ROUTE: usize = 48;

/// Routes one engine can serve. Every route version needs at least one
/// pool slot, and during a reload the old and the new version of every
/// route may both hold instances, so half the pool is the hard ceiling.
/// Below it, routes share the pool rather than each getting 16 slots
/// (see [`live_per_route`]): that used to cap a config at 31 routes.
pub(crate) const MAX_ROUTES: usize = POOL_INSTANCES as usize / 2;

/// Idle-instance memory one route version may keep, by the linear memory
/// its instances start with. An idle instance keeps its memory slot (and
/// the pages its guest touched) until reused, so the count that is cheap
/// for a 1 MiB Rust component (48 idle: ~51 MiB) is 48 × 9–12 MiB for a
/// JS or Python runtime. 64 MiB keeps Rust at 48 and bounds JS/Python to
/// 5–7, still more than two cores can keep busy; a burst beyond it pays
/// one instantiation (1–3 ms for JS/Python) per extra event instead of
/// keeping memory nobody uses between bursts.
pub(crate) const IDLE_MEMORY_PER_ROUTE: usize = 64 * 1024 * 1024;

/// Live instances each route version of a config with `routes` routes may
/// hold: an equal share of half the pool (the other half is for the
/// versions a reload replaces), at most [`INSTANCES_PER_ROUTE`], at least
/// one. The shares never add up to more than the pool, so instantiation
/// waits on a route's own semaphore, never fails on an exhausted pool.
pub(crate) fn live_per_route(routes: usize) -> usize {
    (MAX_ROUTES / routes.max(1)).clamp(1, INSTANCES_PER_ROUTE)
}

/// Idle instances a route version keeps once its instances are known to
/// start with `instance_bytes` of linear memory: [`IDLE_MEMORY_PER_ROUTE`]
/// worth, at least one (so steady traffic never instantiates), at most
/// the route's live share.
pub(crate) fn idle_per_route(max_live: usize, instance_bytes: usize) -> usize {
    (IDLE_MEMORY_PER_ROUTE / instance_bytes.max(1)).clamp(1, max_live)
}

/// The shared engine and linker; cheap to clone.
#[derive(Clone)]
pub(crate) struct PluginEngine {
    pub engine: Engine,
    pub linker: Arc<Linker<HostState>>,
    functions: Arc<FunctionCache>,
}

impl PluginEngine {
    /// Builds the engine, starts its epoch ticker and links the host.
    pub(crate) fn new() -> wasmtime::Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_INSTANCES)
            .total_memories(POOL_INSTANCES)
            // A wasip2 Rust component is ~5 core instances (the program and
            // wit-component's shims) with a table or two each.
            .total_core_instances(POOL_INSTANCES * 8)
            .total_tables(POOL_INSTANCES * 4)
            .total_stacks(POOL_INSTANCES)
            .max_core_instances_per_component(16)
            .max_memories_per_component(1)
            .max_tables_per_component(8)
            .max_memory_size(MAX_MEMORY_MB as usize * 1024 * 1024);
        let functions = Arc::new(FunctionCache::default());
        let mut config = Config::new();
        config.enable_incremental_compilation(functions.clone())?;
        config
            .epoch_interruption(true)
            // No WIT `async func`s or streams: without the component-model
            // async machinery a call runs on a plain fiber, which halves
            // the per-call cost (noop plugin 2.06 → 1.30 µs, criterion).
            .concurrency_support(false)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        spawn_ticker(&engine);

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        // wit/dev.wit: only `dev`'s source loaders import it.
        linker
            .instance("otako:gateway/dev-source@0.1.0")?
            .func_wrap("files", |store, (): ()| {
                let state: &HostState = store.data();
                Ok((state
                    .route
                    .dev_files
                    .as_deref()
                    .cloned()
                    .unwrap_or_default(),))
            })?;
        Ok(PluginEngine {
            engine,
            linker: Arc::new(linker),
            functions,
        })
    }

    /// Compiles (or loads from the cache) and links one plugin. Blocking:
    /// call it from `spawn_blocking`.
    pub(crate) fn compile(
        &self,
        bytes: &[u8],
        cache_dir: Option<&Path>,
    ) -> Result<Compiled, String> {
        let hash = content_hash(bytes);
        let started = Instant::now();
        let cache_file = cache_dir.map(|dir| dir.join(self.cache_name(&hash)));
        let cached = cache_file.as_deref().and_then(|f| self.load_cached(f));
        let from_cache = cached.is_some();
        let component = match cached {
            Some(component) => component,
            None => {
                self.functions.use_dir(cache_dir);
                let (lookups, hits) = self.functions.counts();
                let component = Component::new(&self.engine, bytes).map_err(|e| chain(&e))?;
                let (now_lookups, now_hits) = self.functions.counts();
                // Approximate when other plugins compile at the same time.
                tracing::debug!(
                    took = ?started.elapsed(),
                    functions = now_lookups - lookups,
                    reused = now_hits - hits,
                    "plugin compiled"
                );
                if let (Some(dir), Some(file)) = (cache_dir, &cache_file) {
                    store_cached(dir, file, &component);
                }
                component
            }
        };
        let compile_time = started.elapsed();
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| format!("does not link against the gateway's host: {}", chain(&e)))?;
        let pre = PluginPre::new(pre)
            .map_err(|e| format!("does not export the plugin world's handle: {}", chain(&e)))?;
        Ok(Compiled {
            pre,
            hash,
            compile_time,
            from_cache,
            loaded_at_ms: crate::db::now_ms(),
        })
    }

    /// `<sha256>-<wasmtime version>-<engine config hash>.cwasm`: a changed
    /// plugin, wasmtime or engine setting never reuses stale code.
    fn cache_name(&self, hash: &str) -> String {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        format!("{hash}-{WASMTIME_VERSION}-{:016x}.cwasm", hasher.finish())
    }

    fn load_cached(&self, file: &Path) -> Option<Component> {
        if !file.is_file() {
            return None;
        }
        // SAFETY: `deserialize_file` runs the file's machine code, so it
        // must be wasmtime's own output. Only this module writes into the
        // cache folder (atomically, by rename, under a content-hash name),
        // and the folder is as trusted as the gateway's binary and config;
        // wasmtime still checks the header, version and engine settings.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize_file(&self.engine, file) };
        match loaded {
            Ok(component) => Some(component),
            Err(err) => {
                tracing::warn!(file = %file.display(), error = %chain(&err), "ignoring unusable compiled-plugin cache entry");
                None
            }
        }
    }
}

/// Writes a cache entry. Failures only cost the next start a compile.
fn store_cached(dir: &Path, file: &Path, component: &Component) {
    let result = component
        .serialize()
        .map_err(|e| chain(&e))
        .and_then(|bytes| write_atomically(file, &bytes));
    if let Err(err) = result {
        tracing::warn!(dir = %dir.display(), error = %err, "cannot cache compiled plugin code");
    }
}

/// Writes `file` through a temporary file and a rename, so a reader never
/// sees half a file.
fn write_atomically(file: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = file.parent().ok_or("no parent folder")?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        file.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("plugin"),
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::write(&tmp, bytes).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, file).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        e.to_string()
    })
}

/// Cranelift's incremental compilation cache, on disk under the
/// compiled-code cache folder: one file per compiled function, named by
/// the hash of the function's IR and the target. A JS or Python component
/// rebuilt around an edited handler is new bytes, so the whole-component
/// cache misses, but its runtime's functions are unchanged (only the
/// snapshot data differs): they come from here instead of cranelift.
///
/// On disk rather than in memory: the version being replaced was usually
/// loaded from the compiled-code cache, so this process never compiled
/// its functions, and the entries must outlive restarts of `dev`. Bounded
/// by [`FUNCTION_CACHE_BYTES`]: past it, the least recently used entries
/// go. A failure to read or write only costs a compile.
#[derive(Debug, Default)]
pub(crate) struct FunctionCache {
    dir: Mutex<Option<FunctionDir>>,
    /// Lookups and hits since the engine started, for the compile log.
    lookups: AtomicU64,
    hits: AtomicU64,
}

/// Largest size of the function cache folder.
pub(crate) const FUNCTION_CACHE_BYTES: u64 = 512 * 1024 * 1024;

#[derive(Debug)]
struct FunctionDir {
    path: PathBuf,
    /// Size of the entries, as counted at first use plus those written.
    bytes: u64,
    /// Whether a failed write was logged (once per folder, not per function).
    warned: bool,
}

impl FunctionCache {
    /// Caches under `cache_dir` (the compiled-code cache folder, which a
    /// reload may change), or nowhere.
    fn use_dir(&self, cache_dir: Option<&Path>) {
        let path = cache_dir.map(|dir| dir.join(format!("functions-{WASMTIME_VERSION}")));
        let mut dir = lock(&self.dir);
        if dir.as_ref().map(|d| &d.path) != path.as_ref() {
            *dir = path.map(|path| FunctionDir {
                bytes: entries(&path).iter().map(|e| e.1).sum(),
                path,
                warned: false,
            });
        }
    }

    fn file(&self, key: &[u8]) -> Option<PathBuf> {
        let name = hex(key);
        let dir = lock(&self.dir).as_ref()?.path.join(name.get(..2)?);
        Some(dir.join(name.get(2..)?))
    }

    /// (lookups, hits) so far.
    fn counts(&self) -> (u64, u64) {
        (
            self.lookups.load(Ordering::Relaxed),
            self.hits.load(Ordering::Relaxed),
        )
    }
}

impl CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let file = self.file(key)?;
        let mut opened = std::fs::File::options()
            .read(true)
            .write(true)
            .open(file)
            .ok()?;
        let mut bytes = Vec::new();
        opened.read_to_end(&mut bytes).ok()?;
        // The timestamp is the entry's last use, for the eviction order.
        let _ = opened.set_modified(SystemTime::now());
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(Cow::Owned(bytes))
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let Some(file) = self.file(key) else {
            return false;
        };
        let len = value.len() as u64;
        let written = write_atomically(&file, &value);
        let mut dir = lock(&self.dir);
        let Some(dir) = dir.as_mut() else {
            return false;
        };
        if let Err(err) = written {
            if !dir.warned {
                dir.warned = true;
                tracing::warn!(dir = %dir.path.display(), error = %err, "cannot cache compiled functions; reloads of big plugins compile in full");
            }
            return false;
        }
        dir.bytes += len;
        if dir.bytes > FUNCTION_CACHE_BYTES {
            dir.bytes = evict(&dir.path, FUNCTION_CACHE_BYTES / 4 * 3);
        }
        true
    }
}

/// Locks a std mutex whose data stays valid if a holder panicked.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The function cache's entries: (file, size, last use).
fn entries(dir: &Path) -> Vec<(PathBuf, u64, SystemTime)> {
    let files = |dir: &Path| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect::<Vec<_>>()
    };
    files(dir)
        .iter()
        .flat_map(|shard| files(shard))
        .filter_map(|file| {
            let meta = std::fs::metadata(&file).ok()?;
            let used = meta.modified().ok()?;
            meta.is_file().then_some((file, meta.len(), used))
        })
        .collect()
}

/// Removes the least recently used entries until at most `keep` bytes
/// are left; returns the bytes left.
fn evict(dir: &Path, keep: u64) -> u64 {
    let mut entries = entries(dir);
    entries.sort_by_key(|e| std::cmp::Reverse(e.2));
    let mut left = 0;
    for (file, len, _) in entries {
        if left + len <= keep {
            left += len;
        } else {
            let _ = std::fs::remove_file(file);
        }
    }
    tracing::debug!(dir = %dir.display(), bytes = left, "function cache evicted its oldest entries");
    left
}

/// Advances the epoch every [`TICK`] on a thread of its own: a tokio task
/// could starve behind the very plugins it must interrupt when they occupy
/// every worker. It stops once the engine is dropped.
fn spawn_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("otako-epoch".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        });
    if let Err(err) = spawned {
        // Without a ticker no plugin would ever time out: say so loudly.
        tracing::error!(error = %err, "cannot start the plugin epoch ticker; plugin timeouts will not fire");
    }
}

/// A plugin compiled and linked, ready to instantiate.
#[derive(Clone)]
pub(crate) struct Compiled {
    pub pre: PluginPre<HostState>,
    /// Full hex SHA-256 of the `.wasm` file.
    pub hash: String,
    pub compile_time: Duration,
    pub from_cache: bool,
    /// When this version was loaded (unix ms), for the operator page.
    pub loaded_at_ms: i64,
}

/// The error and its causes, outermost first, on one line.
pub(crate) fn chain(err: &wasmtime::Error) -> String {
    err.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// Hex SHA-256 of a plugin file: its version, and its cache key.
pub(crate) fn content_hash(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Where compiled code is cached, if the folder can be used at all.
pub(crate) fn cache_dir(dir: &Path) -> Option<PathBuf> {
    match std::fs::create_dir_all(dir) {
        Ok(()) => Some(dir.to_path_buf()),
        Err(err) => {
            tracing::warn!(dir = %dir.display(), error = %err, "plugin cache folder unusable; compiling on every start");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn routes_share_the_pool_instead_of_being_capped_at_31() {
        assert_eq!(live_per_route(3), INSTANCES_PER_ROUTE);
        assert_eq!(live_per_route(40), 12);
        assert_eq!(live_per_route(MAX_ROUTES), 1);
        // Two versions of every route fit the pool at any route count.
        for routes in [1, 31, 32, 40, 100, 333, MAX_ROUTES] {
            assert!(2 * routes * live_per_route(routes) <= POOL_INSTANCES as usize);
        }
    }

    #[test]
    fn the_function_cache_round_trips_and_evicts_the_least_recently_used() {
        let root = tempfile::tempdir().unwrap();
        let cache = FunctionCache::default();
        assert!(
            !cache.insert(b"k0", vec![0; 8]),
            "no folder: nothing cached"
        );
        cache.use_dir(Some(root.path()));
        assert!(cache.get(b"k1").is_none());
        for (key, byte) in [(b"k1", 0u8), (b"k2", 1), (b"k3", 2)] {
            assert!(cache.insert(key, vec![byte; 100]));
        }
        assert_eq!(cache.get(b"k2").as_deref(), Some(&[1u8; 100][..]));
        assert_eq!(cache.counts(), (2, 1));
        // Used: k2 just now, then k3, k1 longest ago.
        let age = |key: &[u8], secs| {
            let file = std::fs::File::options()
                .write(true)
                .open(cache.file(key).unwrap())
                .unwrap();
            file.set_modified(SystemTime::now() - Duration::from_secs(secs))
                .unwrap();
        };
        age(b"k1", 20);
        age(b"k3", 10);
        let dir = root.path().join(format!("functions-{WASMTIME_VERSION}"));
        assert_eq!(evict(&dir, 250), 200);
        assert!(cache.get(b"k1").is_none());
        assert!(cache.get(b"k2").is_some() && cache.get(b"k3").is_some());
        // A folder that can't be written: a miss, not an error.
        let blocked = root.path().join("blocked");
        std::fs::write(&blocked, b"a file, not a folder").unwrap();
        cache.use_dir(Some(&blocked));
        assert!(!cache.insert(b"k4", vec![4; 8]));
        assert!(cache.get(b"k4").is_none());
    }

    #[test]
    fn big_components_keep_fewer_idle_instances() {
        // Initial linear memory of the MESSAGE_CREATE handlers (BENCHMARKS).
        assert_eq!(idle_per_route(16, 17 * 64 * 1024), 16); // Rust
        assert_eq!(idle_per_route(16, 145 * 64 * 1024), 7); // JavaScript
        assert_eq!(idle_per_route(16, 199 * 64 * 1024), 5); // Python
        assert_eq!(idle_per_route(16, 900 * MIB), 1);
        assert_eq!(idle_per_route(3, MIB), 3);
    }
}
