//! A guest written against the raw ABI (no SDK) whose allocator calls back
//! into the host (`proxy_get_property`) while the host is handing it data,
//! the way a confused or hostile module might. The host must refuse the
//! call (the guest traps) rather than re-enter itself: starting this guest
//! with a non-empty configuration fails in `proxy_on_configure`.

use std::ptr::null_mut;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_property(path: *const u8, path_len: usize, ret: *mut *mut u8, ret_len: *mut usize) -> u32;
    fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, ret: *mut *mut u8, ret_len: *mut usize) -> u32;
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let (mut p, mut l) = (null_mut(), 0);
    let path = b"plugin_name";
    // SAFETY: the pointers are this function's own locals.
    unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut p, &mut l) };
    let mut v: Vec<u8> = Vec::with_capacity(size);
    let ptr = v.as_mut_ptr();
    std::mem::forget(v);
    ptr
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(_context: u32, _parent: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root: u32, _size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(_root: u32, size: usize) -> u32 {
    let (mut p, mut l) = (null_mut(), 0);
    // The host hands the configuration over through the allocator above.
    // SAFETY: the pointers are this function's own locals.
    unsafe { proxy_get_buffer_bytes(7, 0, size, &mut p, &mut l) };
    1
}
