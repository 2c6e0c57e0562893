//! WebAssembly policy plugins on the proxy-wasm ABI. This part holds what
//! the host reads from a guest before it acts on it (`abi`); the engine,
//! the host functions and the filter that runs a plugin in a flow's chain
//! build on it.

pub mod abi;
