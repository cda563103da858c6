//! The writer's half of an asymmetric fence: Linux's `membarrier(2)` with
//! `MEMBARRIER_CMD_PRIVATE_EXPEDITED`, as liburcu's `urcu-memb` flavour uses
//! it.
//!
//! A read section must order its counter increment before its loads of the
//! shared state, and a grace period its phase flip before its loads of the
//! counters: a store-then-load handshake on each side. Symmetric, each side
//! pays a full fence (on x86 a locked instruction, about 10 ns here). With
//! `membarrier`, a reader whose record is *armed* (`srcu.rs`) uses a plain
//! store and a compiler barrier, and the writer's grace period makes every
//! running thread of the process execute a full barrier instead (an
//! inter-processor interrupt to the CPUs running them; a thread not running
//! passed one when it was switched out). The price moves to the writer:
//! measured on the project's nested host, 0.3 µs per call with no other thread
//! of the process running and about 10 µs while one runs.
//!
//! Used only with the `membarrier` feature on Linux, outside loom and Miri (neither models the
//! system call). [`register`] registers the process once (the kernel requires
//! it before the first expedited call); if the kernel lacks the command, or a
//! seccomp filter refuses it, registration fails and readers stay symmetric.
//! No crate wraps this one system call (`libc` has only its number), hence by
//! hand.

#[cfg(all(feature = "membarrier", target_os = "linux", not(loom), not(miri)))]
mod imp {
    use core::sync::atomic::{AtomicU8, Ordering};

    // From <linux/membarrier.h>.
    const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
    const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

    const UNKNOWN: u8 = 0;
    const REGISTERED: u8 = 1;
    const UNAVAILABLE: u8 = 2;

    /// Process-wide: registration is per address space (`mm`), once.
    static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

    fn membarrier(cmd: libc::c_int) -> libc::c_long {
        // SAFETY: membarrier(2) takes two integers (cmd, flags; cpu_id is
        // unused without MEMBARRIER_CMD_FLAG_CPU) and touches no user memory.
        unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_uint, 0 as libc::c_int) }
    }

    pub(crate) fn register() -> bool {
        match STATE.load(Ordering::Acquire) {
            REGISTERED => return true,
            UNAVAILABLE => return false,
            _ => {}
        }
        let mask = membarrier(MEMBARRIER_CMD_QUERY);
        let wanted = libc::c_long::from(MEMBARRIER_CMD_PRIVATE_EXPEDITED | MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED);
        // Registering twice (two threads racing here) is harmless.
        let ok = mask >= 0 && mask & wanted == wanted && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
        STATE.store(if ok { REGISTERED } else { UNAVAILABLE }, Ordering::Release);
        ok
    }

    pub(crate) fn heavy_barrier() {
        if membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0 {
            // Registered (armed readers exist only after `register` returned
            // true), so the kernel cannot refuse; if something (a seccomp
            // filter installed since) does, armed readers' sections cannot be
            // seen, and freeing what they read would be a use-after-free.
            let err = std::io::Error::last_os_error();
            std::eprintln!("memslots: membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) failed after registration: {err}; aborting (armed read sections cannot be waited for otherwise)");
            std::process::abort();
        }
    }
}

#[cfg(all(feature = "membarrier", target_os = "linux", not(loom), not(miri)))]
pub(crate) use imp::{heavy_barrier, register};

/// Without the system call: never available.
#[cfg(not(all(feature = "membarrier", target_os = "linux", not(loom), not(miri))))]
pub(crate) fn register() -> bool {
    false
}

/// Without the system call no record is ever armed, so no grace period asks
/// for this; under loom a model that enables arming checks only the
/// executions where the writer did not need it (`srcu.rs`).
#[cfg(not(all(feature = "membarrier", target_os = "linux", not(loom), not(miri))))]
pub(crate) fn heavy_barrier() {}
