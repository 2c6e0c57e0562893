//! A guest written against the raw ABI (no SDK) that does nothing: every
//! callback a flow reaches returns at once with "continue" (or "done").
//! It is the least a plugin can be, so a flow through it costs what the
//! host and wasmtime cost per guest entry, with no guest work on top. The
//! benchmarks run it beside the test guest to tell the two costs apart.

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut v: Vec<u8> = Vec::with_capacity(size);
    let ptr = v.as_mut_ptr();
    std::mem::forget(v);
    ptr
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root: u32, _size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(_root: u32, _size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(_context: u32, _parent: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_new_connection(_context: u32) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_downstream_data(_context: u32, _size: usize, _end: u32) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_upstream_data(_context: u32, _size: usize, _end: u32) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_downstream_connection_close(_context: u32, _peer: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_upstream_connection_close(_context: u32, _peer: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_done(_context: u32) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_log(_context: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_delete(_context: u32) {}
