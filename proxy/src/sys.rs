//! The one module allowed to call into the OS unsafely: syscalls that have
//! no safe wrapper in std or tokio. Every `unsafe` block states why it is
//! sound; everything else in the crate is `unsafe`-free.
#![allow(unsafe_code)]

/// Asks the kernel to back `buf` with transparent huge pages.
///
/// The policy indexes are tens of megabytes read at random; with 4 KiB
/// pages nearly every lookup also misses the TLB. This is advice only:
/// failure (or a kernel with THP off) changes speed, never behaviour.
pub fn advise_hugepages<T>(buf: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_ptr() as usize;
        let len = std::mem::size_of_val(buf);
        // madvise wants page-aligned ranges; keep to whole huge pages
        // inside the buffer.
        let aligned = start.next_multiple_of(HUGE);
        let end = (start + len) & !(HUGE - 1);
        if end > aligned {
            // SAFETY: [aligned, end) lies inside `buf`, which is a live
            // allocation for the duration of the call; MADV_HUGEPAGE only
            // changes how the kernel backs those pages, not their contents
            // or validity, so no Rust invariant depends on the outcome.
            let _ = unsafe { libc::madvise(aligned as *mut libc::c_void, end - aligned, libc::MADV_HUGEPAGE) };
        }
    }
}
