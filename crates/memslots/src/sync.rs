//! The synchronisation primitives the crate uses, behind one small shim so that
//! `loom` can replace them (`RUSTFLAGS="--cfg loom"`), as crossbeam does.
//!
//! Outside loom: `core` atomics, a `core::cell::UnsafeCell` wrapper with loom's
//! closure-based API, and a writer mutex (std's with `std`, `spin`'s without).

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;
#[cfg(loom)]
#[allow(unused_imports)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use alloc::sync::Arc;
#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use core::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

#[cfg(all(not(loom), feature = "std"))]
pub(crate) use std::sync::{Mutex, MutexGuard};

/// `spin::Mutex` with std's `lock() -> LockResult` shape, for `no_std` builds.
#[cfg(all(not(loom), not(feature = "std")))]
pub(crate) struct Mutex<T>(spin::Mutex<T>);

#[cfg(all(not(loom), not(feature = "std")))]
pub(crate) type MutexGuard<'a, T> = spin::MutexGuard<'a, T>;

#[cfg(all(not(loom), not(feature = "std")))]
impl<T> Mutex<T> {
    pub(crate) const fn new(value: T) -> Self {
        Mutex(spin::Mutex::new(value))
    }
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, T>, core::convert::Infallible> {
        Ok(self.0.lock())
    }
}

/// Locks `m`, ignoring poisoning: every writer path restores the memslot state
/// before it can panic-unwind (only internal invariant violations panic), so the
/// protected data is consistent even if a previous holder panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    #[cfg(all(not(loom), feature = "std"))]
    {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    #[cfg(any(loom, not(feature = "std")))]
    {
        #[allow(clippy::unwrap_used)]
        m.lock().unwrap()
    }
}

/// The reader's store-then-load handshake (increment a counter, then load the
/// phase) relies on the single total order of `SeqCst` accesses, which the C++
/// model guarantees and x86's locked RMW provides. Loom models `SeqCst`
/// accesses only as `AcqRel` (its README: "causing Loom to generate false
/// alarms") but does model `fence(SeqCst)`, so under loom the same handshake
/// is expressed with a fence. In normal builds this is a no-op.
#[inline(always)]
pub(crate) fn loom_seqcst_fence() {
    #[cfg(loom)]
    fence(Ordering::SeqCst);
}

/// What a waiting writer does between two polls of the reader counters.
pub(crate) fn backoff(spins: &mut u32) {
    #[cfg(loom)]
    {
        let _ = spins;
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    {
        *spins = spins.saturating_add(1);
        if *spins < 64 {
            core::hint::spin_loop();
        } else {
            #[cfg(feature = "std")]
            std::thread::yield_now();
            #[cfg(not(feature = "std"))]
            core::hint::spin_loop();
        }
    }
}

/// `core::cell::UnsafeCell` with loom's `with`/`with_mut` API.
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        UnsafeCell(core::cell::UnsafeCell::new(value))
    }
    /// Runs `f` with a shared pointer to the contents.
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }
    /// Runs `f` with an exclusive pointer to the contents.
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
    /// Raw pointer, for borrows that must outlive a closure (read guards).
    pub(crate) fn get(&self) -> *mut T {
        self.0.get()
    }
}
