//! Allocator settings of the daemon.
//!
//! glibc's malloc raises its mmap threshold each time a large mmapped block is freed, after
//! which megabyte buffers (NBD write payloads, network receive buffers) come from the heap
//! arenas of whichever thread allocated them and, freed from another thread, stay there:
//! under a 1 MiB write stream a daemon held over a GiB it no longer used (the benches' M1
//! measured 1.2 to 1.4 GiB peak resident size on a 100 GiB device). A fixed threshold just
//! above DRBD's largest request (1 MiB) keeps the receive buffers that grow past it in their
//! own mappings, returned to the system when freed (M1: 90 MiB), while 1 MiB blocks stay
//! cheap heap allocations (a 256 KiB threshold also bounded the memory, but halved T1);
//! the buffers written to disk come from a pool and are not allocated per write.

/// Blocks larger than this are mapped on their own.
pub const MMAP_THRESHOLD: usize = (1 << 20) + (128 << 10);

/// Applies the daemon's allocator settings; call once at start, before threads exist.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes glibc's allocator parameters; it is called before
        // the daemon starts other threads, and the value is in range for M_MMAP_THRESHOLD
        // (at most HEAP_MAX/2, 32 MiB on 64-bit).
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) };
        if ok != 1 {
            eprintln!("drbdd: mallopt(M_MMAP_THRESHOLD) failed; memory use may grow");
        }
    }
}
