//! WebAssembly policy plugins on the proxy-wasm ABI (0.2.1 and 0.2.0), run
//! by wasmtime.
//!
//! - `abi`: what the host decodes from a guest, sans IO (statuses, enums,
//!   header-map pairs, property paths);
//! - `engine`: the shared engine (pooling allocator, epoch deadlines) and
//!   module checks (sha256, ABI marker, allocator);
//! - `wasi`, `host`: the WASI calls and every `env.proxy_*` function;
//! - `state`, `shared`, `properties`: what host functions work on;
//! - `vm`: one instance and the proxy-wasm call order;
//! - `filter`: a plugin as a network filter in a flow's chain;
//! - `load`: a configuration's `plugins:` loaded (and canaried) into a
//!   snapshot.

pub mod abi;
pub mod callout;
pub mod engine;
pub mod filter;
pub mod host;
pub mod load;
pub mod properties;
pub mod shared;
pub mod state;
pub mod vm;
pub mod wasi;

pub use engine::{CompileError, PluginModule, WasmEngine};
pub use filter::{FailurePolicy, Plugin, WasmFilter};
pub use load::{PluginLoadError, PluginSet};
pub use state::PluginLimits;
pub use vm::{PluginCode, Vm, VmError};
