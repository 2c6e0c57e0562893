//! One wasmtime engine for every plugin: Cranelift, the pooling allocator
//! with copy-on-write memory images, and epoch interruption driven by a
//! ticker thread, so a callback that runs past its deadline traps instead of
//! holding a worker. Modules are checked when compiled: they must declare a
//! proxy-wasm ABI version the host speaks and export an allocator.

use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, Module, OptLevel, PoolingAllocationConfig};

use super::abi::AbiVersion;

/// How often the engine's epoch advances: the granularity of callback
/// deadlines. Coarse on purpose: every tick wakes a thread, which costs
/// the process about 20 µs of CPU on the test machines (2% of a core at
/// 1 ms), whether or not any plugin runs.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Why a module cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("sha256 mismatch: the file hashes to {actual}, the configuration says {expected}")]
    Sha256Mismatch { expected: String, actual: String },
    #[error("not a valid WebAssembly module: {0}")]
    Invalid(String),
    #[error(
        "the module declares no proxy-wasm ABI version this host speaks: export one of \
         proxy_abi_version_0_2_1 or proxy_abi_version_0_2_0 (build it with a proxy-wasm SDK)"
    )]
    UnknownAbi,
    #[error("the module exports no `memory`")]
    NoMemory,
    #[error("the module exports neither proxy_on_memory_allocate nor malloc, so the host cannot hand it data")]
    NoAllocator,
}

/// A compiled, checked plugin module.
#[derive(Debug, Clone)]
pub struct PluginModule {
    pub module: Module,
    pub abi: AbiVersion,
    /// Hex SHA-256 of the module's bytes.
    pub sha256: String,
    /// Where the compiled code came from.
    pub origin: Origin,
}

/// Where a compiled module came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Compiled now.
    Compiled,
    /// Compiled earlier by this process.
    Memory,
    /// Read from the on-disk cache.
    Disk,
}

/// The shared engine. Cloning is cheap; the epoch ticker stops when the last
/// clone is dropped.
#[derive(Debug, Clone)]
pub struct WasmEngine {
    engine: Engine,
    /// Modules compiled by this engine, by the hex SHA-256 of their bytes:
    /// a reload that changes a plugin's configuration but not its module
    /// does not compile it again.
    compiled: std::sync::Arc<std::sync::Mutex<Vec<(String, Module)>>>,
}

/// How many compiled modules an engine keeps for reuse.
const COMPILED_KEPT: usize = 64;

impl WasmEngine {
    /// An engine whose pool holds at most `instances` live plugin instances,
    /// each with at most `max_memory` bytes of linear memory.
    pub fn new(instances: u32, max_memory: usize) -> Result<Self, String> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(instances)
            .total_memories(instances)
            .total_tables(instances)
            .max_memories_per_module(1)
            .max_tables_per_module(1)
            .max_memory_size(max_memory);
        let mut cfg = Config::new();
        cfg.epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_init_cow(true)
            .cranelift_opt_level(OptLevel::Speed);
        let engine = Engine::new(&cfg).map_err(|e| format!("{e:?}"))?;
        spawn_ticker(&engine)?;
        Ok(Self {
            engine,
            compiled: std::sync::Arc::default(),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles `wasm` after checking it against `sha256` (hex, when the
    /// configuration gives one), and checks what the host needs of it.
    pub fn compile(&self, wasm: &[u8], sha256: Option<&str>) -> Result<PluginModule, CompileError> {
        self.compile_cached(wasm, sha256, None)
    }

    /// [`WasmEngine::compile`], keeping compiled code in `cache` between
    /// runs (keyed by the module's hash and the engine's compatibility
    /// hash, so another wasmtime or configuration never reads it).
    pub fn compile_cached(
        &self,
        wasm: &[u8],
        sha256: Option<&str>,
        cache: Option<&crate::sys::TrustedDir>,
    ) -> Result<PluginModule, CompileError> {
        let actual = hex_sha256(wasm);
        if let Some(expected) = sha256
            && !expected.eq_ignore_ascii_case(&actual)
        {
            return Err(CompileError::Sha256Mismatch {
                expected: expected.to_owned(),
                actual,
            });
        }
        let (module, origin) = self.compiled(&actual, wasm, cache)?;
        let abi = AbiVersion::declared(module.exports().map(|e| e.name())).ok_or(CompileError::UnknownAbi)?;
        let exported = |name: &str| module.exports().any(|e| e.name() == name);
        if !exported("memory") {
            return Err(CompileError::NoMemory);
        }
        if !exported("proxy_on_memory_allocate") && !exported("malloc") {
            return Err(CompileError::NoAllocator);
        }
        Ok(PluginModule {
            module,
            abi,
            sha256: actual,
            origin,
        })
    }
}

impl WasmEngine {
    /// The module with hash `sha256`: compiled by this process before,
    /// read from `cache`, or compiled now (and stored there).
    fn compiled(
        &self,
        sha256: &str,
        wasm: &[u8],
        cache: Option<&crate::sys::TrustedDir>,
    ) -> Result<(Module, Origin), CompileError> {
        let lock = || self.compiled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, m)) = lock().iter().find(|(h, _)| h == sha256) {
            return Ok((m.clone(), Origin::Memory));
        }
        let name = format!("{sha256}-{}.cwasm", self.compatibility());
        let (module, origin) = match cache.and_then(|c| c.load(&self.engine, &name)) {
            Some(m) => (m, Origin::Disk),
            None => {
                let m = Module::new(&self.engine, wasm).map_err(|e| CompileError::Invalid(format!("{e:#}")))?;
                if let Some(c) = cache {
                    match m.serialize() {
                        Ok(bytes) => {
                            if let Err(e) = c.store(&name, &bytes) {
                                tracing::warn!(error = %e, "cannot keep a compiled plugin module on disk");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "cannot serialise a compiled plugin module")
                        }
                    }
                }
                (m, Origin::Compiled)
            }
        };
        let mut kept = lock();
        if kept.len() >= COMPILED_KEPT {
            kept.remove(0);
        }
        kept.push((sha256.to_owned(), module.clone()));
        Ok((module, origin))
    }

    /// The engine's compatibility hash (wasmtime's version and settings),
    /// in hex: compiled code is reused only by an engine with the same.
    fn compatibility(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        format!("{:016x}", h.finish())
    }
}

/// Hex SHA-256 of `bytes`.
pub fn hex_sha256(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is
/// dropped. Without it no callback deadline would ever pass, so an engine
/// whose ticker cannot start is refused.
fn spawn_ticker(engine: &Engine) -> Result<(), String> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("sluice-wasm-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start the epoch ticker: {e}"))
}

/// The engine every configuration shares (made on first use).
pub fn shared() -> Result<WasmEngine, String> {
    static ENGINE: std::sync::OnceLock<Result<WasmEngine, String>> = std::sync::OnceLock::new();
    ENGINE
        .get_or_init(|| WasmEngine::new(DEFAULT_INSTANCES, DEFAULT_MAX_MEMORY))
        .clone()
}

/// Pool size: instances alive at once across all plugins and workers.
pub const DEFAULT_INSTANCES: u32 = 256;
/// The largest memory the pool reserves for one instance; a plugin's own
/// `max_memory` is enforced below it by the store's limiter.
pub const DEFAULT_MAX_MEMORY: usize = 256 << 20;
