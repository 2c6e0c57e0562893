//! The host, for speed: CPU time per thread and batch scheduling (for
//! benchmarks), transparent huge pages and prefetch hints (for the policy
//! indexes). None of these changes behaviour, only cost.

use std::io;

/// User and system CPU time consumed so far by the calling thread
/// (`getrusage(RUSAGE_THREAD)`): how benchmarks charge CPU to the proxy
/// thread alone when client and origin run in the same process.
#[cfg(target_os = "linux")]
pub fn thread_cpu_time() -> io::Result<std::time::Duration> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a writable, properly sized and aligned `rusage`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised plain old data that getrusage filled in.
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| {
        std::time::Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_usec).unwrap_or(0).saturating_mul(1000),
        )
    };
    Ok(tv(usage.ru_utime) + tv(usage.ru_stime))
}

/// Puts the calling thread under `SCHED_BATCH`: same CPU share, but its
/// wake-ups never preempt a running thread.
#[cfg(target_os = "linux")]
pub fn set_batch_scheduling() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread; `param` is a valid sched_param
    // that the call only reads.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &raw const param) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

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

/// Hints the CPU to start loading the cache line holding `*p`.
///
/// The policy's name lookup computes every probe's slot first and prefetches
/// them all, so their cache misses overlap instead of queueing one after
/// another. A hint only: it reads nothing into the program and cannot fault.
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` never dereferences its argument in a way the
    // program can observe: it is a cache hint that is dropped for invalid
    // addresses and cannot fault, so any pointer value is sound.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
