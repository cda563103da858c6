//! Host memory: owned mappings that memslots point into.
//!
//! A [`HostMemory`] is one `mmap` of the VMM's address space: anonymous,
//! a `memfd` (shareable: its fd can be handed to another process, e.g. a
//! vhost-user backend), or a file at an offset. Options select hugetlbfs
//! pages (`MAP_HUGETLB` / `MFD_HUGETLB`), transparent huge pages
//! (`madvise(MADV_HUGEPAGE)`), pre-faulting (`MAP_POPULATE`) and sharing.
//!
//! The mapping is unmapped when the `HostMemory` is dropped, so it is always
//! held in an `Arc`: the [`GuestMemory`](crate::GuestMemory) registry, every
//! slot backed by it and every vm-memory snapshot hold a reference, and the
//! memory stays mapped until the last of them is gone.
//!
//! Every mapping is readable and writable by the VMM (`PROT_READ |
//! PROT_WRITE`): guest-facing write protection is the slot's
//! `KVM_MEM_READONLY` flag. A read-only file can still back memory with
//! [`Sharing::Private`] (copy-on-write).
//!
//! ## Files cannot shrink under a mapping
//!
//! An access to a page of a file mapping past the file's end raises `SIGBUS`,
//! and [`HostMemory::file`] hands out the `File` (whose `set_len` is safe), as
//! do [`fd`](HostMemory::fd) and vm-memory's `FileOffset`s. So every file a
//! `HostMemory` maps through a safe constructor is sealed with
//! `F_SEAL_SHRINK`: by any fd, in any process, truncation then fails with
//! `EPERM`, for the rest of the file's life.
//!
//! - [`memfd`](HostMemory::memfd) seals the memfd it creates right after
//!   sizing it, with `F_SEAL_SHRINK | F_SEAL_SEAL` (no further seals: a peer
//!   given the fd cannot e.g. `F_SEAL_FUTURE_WRITE` it under the VMM's other
//!   users). It may still grow (harmless).
//! - [`from_file`](HostMemory::from_file) /
//!   [`from_shared_file`](HostMemory::from_shared_file) accept a file that is
//!   sealed against shrinking already or can be now (in practice a memfd
//!   created with `MFD_ALLOW_SEALING`, on tmpfs or hugetlbfs, opened for
//!   writing unless already sealed), add only `F_SEAL_SHRINK`, and refuse
//!   anything else with [`MapError::Unsealable`]: regular files on disk,
//!   tmpfs or hugetlbfs files opened by path, block devices, memfds without
//!   `MFD_ALLOW_SEALING`.
//! - For those, the `unsafe` [`from_file_unsealed`](HostMemory::from_file_unsealed)
//!   / [`from_shared_file_unsealed`](HostMemory::from_shared_file_unsealed)
//!   (and [`GuestMemory::map_file_unsealed`](crate::GuestMemory::map_file_unsealed))
//!   map without sealing, and the caller promises that the file is not
//!   truncated under the mapping.
//!
//! Seals are permanent; a safe constructor's seal stays even if mapping then
//! fails. hugetlbfs pages are also never mapped with `MAP_NORESERVE`
//! ([`MapError::HugeTlbNoReserve`]): a fault finding the pool empty would be
//! a `SIGBUS` too.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memslots::PAGE_SIZE;

/// Where a mapping's pages come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backing {
    /// Anonymous memory (`MAP_ANONYMOUS`).
    Anonymous,
    /// A `memfd_create` file, mapped shared; [`HostMemory::fd`] exposes it.
    Memfd,
    /// A file given by the caller, at an offset.
    File,
}

/// Huge page policy of a mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HugePages {
    /// Base pages, the kernel's default THP policy.
    #[default]
    None,
    /// Transparent huge pages: `madvise(MADV_HUGEPAGE)` after mapping.
    Transparent,
    /// hugetlbfs pages of this size in bytes (a power of two, e.g. 2 MiB or 1 GiB):
    /// `MAP_HUGETLB` for anonymous memory, `MFD_HUGETLB` for a memfd. The
    /// mapping size must be a multiple of it, and the host must have such
    /// pages reserved (`/proc/sys/vm/nr_hugepages`), else mapping fails.
    HugeTlb(u64),
}

/// 2 MiB, the usual x86-64 huge page size.
pub const HUGE_PAGE_2M: u64 = 2 << 20;
/// 1 GiB, the x86-64 gigantic page size.
pub const HUGE_PAGE_1G: u64 = 1 << 30;

/// `MAP_SHARED` or `MAP_PRIVATE`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Sharing {
    /// The backing's natural choice: private for anonymous memory, shared for
    /// a memfd or a file.
    #[default]
    Default,
    /// `MAP_SHARED`: writes reach the file (or are seen by a forked child).
    Shared,
    /// `MAP_PRIVATE`: copy-on-write; writes never reach the file.
    Private,
}

/// How to map host memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MapOptions {
    /// Huge page policy.
    pub huge_pages: HugePages,
    /// `MAP_POPULATE`: fault every page in at mapping time.
    pub populate: bool,
    /// `MAP_NORESERVE`: no swap reservation (anonymous memory and private mappings).
    pub no_reserve: bool,
    /// Shared or private mapping.
    pub sharing: Sharing,
}

impl MapOptions {
    /// Base pages, not populated, the backing's default sharing.
    pub const fn new() -> Self {
        MapOptions { huge_pages: HugePages::None, populate: false, no_reserve: false, sharing: Sharing::Default }
    }
    /// Sets the huge page policy.
    #[must_use]
    pub const fn huge_pages(mut self, huge: HugePages) -> Self {
        self.huge_pages = huge;
        self
    }
    /// Transparent huge pages (`MADV_HUGEPAGE`).
    #[must_use]
    pub const fn thp(self) -> Self {
        self.huge_pages(HugePages::Transparent)
    }
    /// hugetlbfs pages of `page_size` bytes.
    #[must_use]
    pub const fn hugetlb(self, page_size: u64) -> Self {
        self.huge_pages(HugePages::HugeTlb(page_size))
    }
    /// Pre-faults the mapping (`MAP_POPULATE`).
    #[must_use]
    pub const fn populate(mut self, yes: bool) -> Self {
        self.populate = yes;
        self
    }
    /// Skips the swap reservation (`MAP_NORESERVE`).
    #[must_use]
    pub const fn no_reserve(mut self, yes: bool) -> Self {
        self.no_reserve = yes;
        self
    }
    /// Sets shared or private mapping.
    #[must_use]
    pub const fn sharing(mut self, sharing: Sharing) -> Self {
        self.sharing = sharing;
        self
    }
}

/// Why host memory could not be mapped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// Size zero, not a multiple of the page size (or of the huge page size),
    /// or larger than the address space.
    #[error("size {size:#x} is not a non-zero multiple of {align:#x}")]
    BadSize {
        /// The requested size.
        size: u64,
        /// The required alignment.
        align: u64,
    },
    /// A file offset not page aligned, or offset + size overflowing.
    #[error("file offset {offset:#x} is not page aligned or offset + size overflows")]
    BadOffset {
        /// The requested offset.
        offset: u64,
    },
    /// A huge page size that is not a power of two of at least a page.
    #[error("huge page size {0:#x} is not a power of two >= 4 KiB")]
    BadHugePageSize(u64),
    /// hugetlbfs pages asked for a file mapping: hugetlbfs files get huge pages
    /// from their file system, not from mmap flags.
    #[error("MAP_HUGETLB applies to anonymous memory and memfds; hugetlbfs files are huge already")]
    HugeTlbOnFile,
    /// A caller-supplied file is not sealed against shrinking and could not
    /// be (`F_ADD_SEALS` with `F_SEAL_SHRINK` failed: `EINVAL` for a file
    /// system without seals, e.g. a regular file on disk; `EPERM` for a memfd
    /// without `MFD_ALLOW_SEALING`, a tmpfs/hugetlbfs file opened by path,
    /// a file already `F_SEAL_SEAL`ed without `F_SEAL_SHRINK`, or an fd not
    /// open for writing). Mapping it safely is impossible: a truncation would
    /// make accesses `SIGBUS`. See [`HostMemory::from_file_unsealed`].
    #[error("file cannot be sealed against shrinking (F_SEAL_SHRINK): {source}")]
    Unsealable {
        /// The `fcntl(F_ADD_SEALS)` error.
        #[source]
        source: io::Error,
    },
    /// hugetlbfs pages (anonymous, a memfd, or a hugetlbfs file) with
    /// `MAP_NORESERVE`: a fault finding the huge page pool empty would raise
    /// `SIGBUS`.
    #[error("hugetlbfs pages need their reservation: MAP_NORESERVE would let a fault SIGBUS")]
    HugeTlbNoReserve,
    /// The memfd name contains a NUL byte.
    #[error("memfd name contains a NUL byte")]
    BadName,
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The failing call (`"mmap"`, `"memfd_create"`, ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn os(op: &'static str) -> MapError {
    MapError::Os { op, source: io::Error::last_os_error() }
}

/// The seals of `file` (`F_GET_SEALS`).
fn seals(file: &File) -> io::Result<i32> {
    // SAFETY: fcntl on an fd `file` keeps open; F_GET_SEALS takes no argument
    // and touches no memory of ours.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Adds `seals` to `file` (`F_ADD_SEALS`).
fn add_seals(file: &File, seals: i32) -> io::Result<()> {
    // SAFETY: fcntl on an fd `file` keeps open; F_ADD_SEALS takes an int and
    // touches no memory of ours.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes sure `file` is sealed against shrinking: already (`F_GET_SEALS`,
/// e.g. a memfd its creator sealed and `F_SEAL_SEAL`ed, or one of ours, or
/// a read-only fd of a sealed memfd), or by adding `F_SEAL_SHRINK` now.
/// Fails with the `F_ADD_SEALS` error (`EINVAL`: the file system has no
/// seals; `EPERM`: `F_SEAL_SEAL`ed without `F_SEAL_SHRINK`, a memfd made
/// without `MFD_ALLOW_SEALING`, or an fd not open for writing).
fn seal_shrink(file: &File) -> io::Result<()> {
    if seals(file).is_ok_and(|s| s & libc::F_SEAL_SHRINK != 0) {
        return Ok(());
    }
    add_seals(file, libc::F_SEAL_SHRINK)
}

/// Whether `file` is on hugetlbfs (`fstatfs`).
fn on_hugetlbfs(file: &File) -> Result<bool, MapError> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `st` is a writable `statfs` the call fills; the fd is open.
    if unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(os("fstatfs"));
    }
    // SAFETY: fstatfs succeeded, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    // `f_type`'s integer type differs between libcs; the magic fits in 32 bits.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::unnecessary_cast)]
    let magic = st.f_type as u32;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::unnecessary_cast)]
    let hugetlbfs = libc::HUGETLBFS_MAGIC as u32;
    Ok(magic == hugetlbfs)
}

/// `MAP_HUGE_SHIFT` and `MFD_HUGE_SHIFT` (both 26 on Linux).
const HUGE_SHIFT: u32 = 26;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One host mapping: `len` bytes at `as_ptr()`, unmapped on drop.
///
/// Accessed concurrently by the VMM and (conceptually) the guest: nothing
/// hands out `&[u8]`/`&mut [u8]` over it. Copies go through raw pointers
/// (`read_at`/`write_at` here, the [`access`](crate::access) layer, or
/// vm-memory's volatile slices).
///
/// No safe operation makes an access through it fault: a file it maps (its
/// own memfd or the caller's) is sealed with `F_SEAL_SHRINK`, so
/// [`file`](Self::file)`.set_len(0)` fails with `EPERM`, and files that
/// cannot be sealed only map through the `unsafe`
/// [`from_file_unsealed`](Self::from_file_unsealed), whose caller promises
/// not to truncate them (see the [module docs](self)).
pub struct HostMemory {
    addr: NonNull<u8>,
    len: usize,
    backing: Backing,
    /// The memfd or the caller's file (shared with vm-memory's `FileOffset`).
    file: Option<Arc<File>>,
    /// Offset of the mapping in `file`.
    file_offset: u64,
    huge_pages: HugePages,
    shared: bool,
    /// Whether `madvise(MADV_HUGEPAGE)` succeeded (THP requested and available).
    thp_advised: bool,
    id: u64,
}

// SAFETY: `HostMemory` owns its mapping; the raw pointer is only a handle to
// it, valid from any thread until drop. The memory is shared mutable state by
// design (guest RAM); all accesses the crate makes are raw-pointer copies,
// volatile or atomic operations, never Rust references.
unsafe impl Send for HostMemory {}
// SAFETY: as for `Send`: `&HostMemory` gives no references into the memory.
unsafe impl Sync for HostMemory {}

impl std::fmt::Debug for HostMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostMemory")
            .field("id", &self.id)
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &format_args!("{:#x}", self.len))
            .field("backing", &self.backing)
            .field("huge_pages", &self.huge_pages)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

fn check_size(size: u64, huge: HugePages) -> Result<usize, MapError> {
    let align = match huge {
        HugePages::HugeTlb(p) => {
            if !p.is_power_of_two() || p < PAGE_SIZE {
                return Err(MapError::BadHugePageSize(p));
            }
            p
        }
        _ => PAGE_SIZE,
    };
    let ok = size != 0 && size.is_multiple_of(align) && isize::try_from(size).is_ok();
    match usize::try_from(size) {
        Ok(len) if ok => Ok(len),
        _ => Err(MapError::BadSize { size, align }),
    }
}

/// hugetlbfs pages must keep their reservation (see [`MapError::HugeTlbNoReserve`]).
fn check_reserve(opts: &MapOptions) -> Result<(), MapError> {
    if opts.no_reserve && matches!(opts.huge_pages, HugePages::HugeTlb(_)) {
        return Err(MapError::HugeTlbNoReserve);
    }
    Ok(())
}

/// `MAP_HUGE_*` / `MFD_HUGE_*` encoding of a page size: log2 << 26.
fn huge_size_flag(page: u64) -> u32 {
    page.trailing_zeros() << HUGE_SHIFT
}

impl HostMemory {
    /// Maps `size` bytes of anonymous memory (private unless
    /// [`Sharing::Shared`]). With [`HugePages::HugeTlb`], `MAP_HUGETLB` with
    /// the page size encoded.
    pub fn anonymous(size: u64, opts: &MapOptions) -> Result<Self, MapError> {
        let len = check_size(size, opts.huge_pages)?;
        check_reserve(opts)?;
        let shared = opts.sharing == Sharing::Shared;
        let mut flags = libc::MAP_ANONYMOUS | if shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
        if let HugePages::HugeTlb(p) = opts.huge_pages {
            flags |= libc::MAP_HUGETLB | i32::from_ne_bytes(huge_size_flag(p).to_ne_bytes());
        }
        Self::map(len, flags, None, 0, opts, Backing::Anonymous, shared)
    }

    /// Creates a memfd named `name` of `size` bytes and maps it shared (or
    /// private with [`Sharing::Private`]). With [`HugePages::HugeTlb`] the
    /// memfd is created with `MFD_HUGETLB` and the page size. The fd is
    /// close-on-exec; [`fd`](Self::fd) exposes it (e.g. to send to a
    /// vhost-user backend, which maps it at [`file_offset`](Self::file_offset)).
    /// The memfd is sealed with `F_SEAL_SHRINK | F_SEAL_SEAL` once sized, so
    /// nobody holding the fd can truncate it under the mapping, nor add other
    /// seals (see the [module docs](self)). It can still grow. To choose the
    /// seals (e.g. add `F_SEAL_GROW`), create the memfd yourself with
    /// `MFD_ALLOW_SEALING` and map it with [`from_file`](Self::from_file).
    pub fn memfd(name: &str, size: u64, opts: &MapOptions) -> Result<Self, MapError> {
        let len = check_size(size, opts.huge_pages)?;
        check_reserve(opts)?;
        let cname = std::ffi::CString::new(name).map_err(|_| MapError::BadName)?;
        let mut mfd_flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        if let HugePages::HugeTlb(p) = opts.huge_pages {
            // hugetlbfs memfds support sealing since Linux 4.16.
            mfd_flags |= libc::MFD_HUGETLB | huge_size_flag(p);
        }
        // SAFETY: `cname` is a valid NUL-terminated string; the call has no
        // other memory effects.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), mfd_flags) };
        if raw < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: `raw` is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = File::from(fd);
        file.set_len(size).map_err(|source| MapError::Os { op: "ftruncate", source })?;
        // Sized: no one may shrink it now, nor change its seals (so no peer
        // given the fd can seal it against the writes its other users make).
        add_seals(&file, libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL)
            .map_err(|source| MapError::Os { op: "fcntl(F_ADD_SEALS)", source })?;
        let shared = opts.sharing != Sharing::Private;
        let flags = if shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
        Self::map(len, flags, Some(Arc::new(file)), 0, opts, Backing::Memfd, shared)
    }

    /// Maps `size` bytes of `file` from `offset` (page aligned), shared unless
    /// [`Sharing::Private`]. A shared mapping needs the file opened read-write.
    ///
    /// The file must be sealed against shrinking, or sealable: this adds
    /// `F_SEAL_SHRINK` (permanently, even if mapping then fails), so it can
    /// never again be truncated under the mapping. Anything else (a regular
    /// file on disk, a memfd created without `MFD_ALLOW_SEALING`, a file on a
    /// hugetlbfs mount) is refused with [`MapError::Unsealable`]; see
    /// [`from_file_unsealed`](Self::from_file_unsealed) and the
    /// [module docs](self). The file must be at least `offset + size` bytes
    /// long (checked with `fstat` after sealing).
    ///
    /// The file is consumed even when refused: to fall back to the unsealed
    /// constructor, use [`from_shared_file`](Self::from_shared_file) and keep
    /// a clone of the `Arc`.
    pub fn from_file(file: File, offset: u64, size: u64, opts: &MapOptions) -> Result<Self, MapError> {
        Self::from_shared_file(Arc::new(file), offset, size, opts)
    }

    /// [`from_file`](Self::from_file) with a file already shared (e.g. one file backing several mappings).
    pub fn from_shared_file(file: Arc<File>, offset: u64, size: u64, opts: &MapOptions) -> Result<Self, MapError> {
        let len = Self::check_file_args(offset, size, opts)?;
        seal_shrink(&file).map_err(|source| MapError::Unsealable { source })?;
        // SAFETY: the file is sealed against shrinking, by any fd in any
        // process, for the rest of its life: it stays `offset + size` long
        // (checked in `map_file`) while mapped.
        unsafe { Self::map_file(file, offset, size, len, opts) }
    }

    /// [`from_file`](Self::from_file) without the seal, for files that
    /// cannot be sealed (regular files on disk, files on a hugetlbfs mount,
    /// block devices, memfds without `MFD_ALLOW_SEALING`). The length is
    /// still checked (`fstat`) for regular files, and hugetlbfs files are
    /// still refused `MAP_NORESERVE`.
    ///
    /// # Safety
    /// For as long as the returned mapping exists (it lives while any `Arc`
    /// of it does: the [`GuestMemory`](crate::GuestMemory) registry, slots,
    /// vm-memory snapshots — possibly longer than the caller's own handle),
    /// no access to `[offset, offset + size)` of the file through the mapping
    /// may fault: the file must not be truncated below `offset + size` bytes
    /// (by this process, e.g. through [`file`](Self::file), or through any
    /// other fd, or by any other process), and for a shared mapping of a
    /// sparse file the file system must not run out of space for the range
    /// (allocate it first, e.g. with `fallocate`). Otherwise accesses through
    /// the safe API raise `SIGBUS`.
    pub unsafe fn from_file_unsealed(file: File, offset: u64, size: u64, opts: &MapOptions) -> Result<Self, MapError> {
        // SAFETY: the caller's contract is this function's.
        unsafe { Self::from_shared_file_unsealed(Arc::new(file), offset, size, opts) }
    }

    /// [`from_file_unsealed`](Self::from_file_unsealed) with a file already shared.
    ///
    /// # Safety
    /// As [`from_file_unsealed`](Self::from_file_unsealed).
    pub unsafe fn from_shared_file_unsealed(
        file: Arc<File>,
        offset: u64,
        size: u64,
        opts: &MapOptions,
    ) -> Result<Self, MapError> {
        let len = Self::check_file_args(offset, size, opts)?;
        // SAFETY: the caller keeps the file long enough (this function's contract).
        unsafe { Self::map_file(file, offset, size, len, opts) }
    }

    fn check_file_args(offset: u64, size: u64, opts: &MapOptions) -> Result<usize, MapError> {
        if matches!(opts.huge_pages, HugePages::HugeTlb(_)) {
            return Err(MapError::HugeTlbOnFile);
        }
        let len = check_size(size, opts.huge_pages)?;
        if !offset.is_multiple_of(PAGE_SIZE) || offset.checked_add(size).is_none_or(|e| i64::try_from(e).is_err()) {
            return Err(MapError::BadOffset { offset });
        }
        Ok(len)
    }

    /// Maps a file whose arguments `check_file_args` accepted.
    ///
    /// # Safety
    /// The file stays at least `offset + size` bytes long while the mapping exists.
    unsafe fn map_file(
        file: Arc<File>,
        offset: u64,
        size: u64,
        len: usize,
        opts: &MapOptions,
    ) -> Result<Self, MapError> {
        let meta = file.metadata().map_err(|source| MapError::Os { op: "fstat", source })?;
        // offset + size does not overflow: checked by `check_file_args`.
        if meta.is_file() && meta.len() < offset + size {
            return Err(MapError::Os {
                op: "mmap",
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("file is {:#x} bytes, mapping needs {:#x}", meta.len(), offset + size),
                ),
            });
        }
        // A hugetlbfs file (a hugetlb memfd, or a file on a hugetlbfs mount)
        // mapped without its reservation faults SIGBUS once the pool is empty.
        if opts.no_reserve && on_hugetlbfs(&file)? {
            return Err(MapError::HugeTlbNoReserve);
        }
        let shared = opts.sharing != Sharing::Private;
        let flags = if shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
        Self::map(len, flags, Some(file), offset, opts, Backing::File, shared)
    }

    fn map(
        len: usize,
        mut flags: i32,
        file: Option<Arc<File>>,
        offset: u64,
        opts: &MapOptions,
        backing: Backing,
        shared: bool,
    ) -> Result<Self, MapError> {
        if opts.populate {
            flags |= libc::MAP_POPULATE;
        }
        if opts.no_reserve {
            flags |= libc::MAP_NORESERVE;
        }
        let fd = file.as_ref().map_or(-1, |f| f.as_raw_fd());
        let off = libc::off_t::try_from(offset).map_err(|_| MapError::BadOffset { offset })?;
        // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED): it
        // cannot alias any existing Rust object. `fd` is open (owned by `file`)
        // or -1 for anonymous memory.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, off) };
        if p == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        let addr = NonNull::new(p.cast::<u8>()).ok_or_else(|| os("mmap"))?;
        let mut thp_advised = false;
        if opts.huge_pages == HugePages::Transparent {
            // SAFETY: the range is exactly our fresh mapping. Failure (THP not
            // compiled in, or a file mapping without THP support) only leaves
            // the default policy.
            thp_advised = unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) } == 0;
        }
        Ok(HostMemory {
            addr,
            len,
            backing,
            file,
            file_offset: offset,
            huge_pages: opts.huge_pages,
            shared,
            thp_advised,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// First byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// Host virtual address of the first byte (the `userspace_addr` of a slot
    /// mapping the start of this memory).
    pub fn addr(&self) -> u64 {
        self.addr.as_ptr() as u64
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Size in bytes, as a `u64`.
    pub fn size(&self) -> u64 {
        self.len as u64
    }

    /// Always false: mappings are never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `[hva, hva + len)` lies inside this mapping.
    pub fn contains(&self, hva: u64, len: u64) -> bool {
        hva >= self.addr() && hva.checked_add(len).is_some_and(|end| end <= self.addr() + self.size())
    }

    /// Where the pages come from.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The memfd or file, for sharing the memory with another process.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.file.as_deref().map(AsFd::as_fd)
    }

    /// The memfd or file, shared. Sealed against shrinking unless it came
    /// through [`from_file_unsealed`](Self::from_file_unsealed) (then the
    /// caller promised not to truncate it): `set_len` to a smaller size fails
    /// with `EPERM` (growing it is allowed and harmless).
    pub fn file(&self) -> Option<&Arc<File>> {
        self.file.as_ref()
    }

    /// Offset of the mapping's first byte in [`fd`](Self::fd) (0 for a memfd).
    pub fn file_offset(&self) -> u64 {
        self.file_offset
    }

    /// The huge page policy asked for.
    pub fn huge_pages(&self) -> HugePages {
        self.huge_pages
    }

    /// Whether the pages are hugetlbfs pages.
    pub fn is_hugetlb(&self) -> bool {
        matches!(self.huge_pages, HugePages::HugeTlb(_))
    }

    /// Whether THP was requested and `madvise(MADV_HUGEPAGE)` succeeded.
    pub fn thp_advised(&self) -> bool {
        self.thp_advised
    }

    /// Whether the mapping is `MAP_SHARED`.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// A process-unique id, for diagnostics.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The pointer to `[offset, offset + len)`, if inside the mapping.
    #[inline]
    pub(crate) fn ptr_at(&self, offset: usize, len: usize) -> Option<*mut u8> {
        if offset <= self.len && len <= self.len - offset {
            // SAFETY: offset <= len of the mapping, so the result is inside it
            // or one past its end.
            Some(unsafe { self.addr.as_ptr().add(offset) })
        } else {
            None
        }
    }

    /// Copies `buf.len()` bytes at byte `offset` of the mapping into `buf`.
    /// Returns `None` (copying nothing) if the range is not inside the mapping.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Option<()> {
        let p = self.ptr_at(offset, buf.len())?;
        // SAFETY: `[p, p + buf.len())` is inside our live mapping (checked by
        // `ptr_at`), readable; `buf` is a distinct Rust allocation, so the
        // ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Some(())
    }

    /// Copies `buf` to byte `offset` of the mapping. Returns `None` (copying
    /// nothing) if the range is not inside the mapping. Host-side: marks
    /// nothing dirty.
    pub fn write_at(&self, offset: usize, buf: &[u8]) -> Option<()> {
        let p = self.ptr_at(offset, buf.len())?;
        // SAFETY: `[p, p + buf.len())` is inside our live, writable mapping;
        // `buf` cannot overlap it (no Rust reference into the mapping exists).
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), p, buf.len()) };
        Some(())
    }

    /// Gives the host pages of `[offset, offset + len)` back (a balloon's
    /// discard): in a shared mapping of the library's own memfd a hole is
    /// punched in it, so the pages are freed, not only unmapped (a caller's
    /// file is left as it is: its pages are only dropped from the mapping and
    /// read back from the file); and the range is dropped from this
    /// mapping (`MADV_DONTNEED`; `MADV_REMOVE` for shared anonymous
    /// memory). The range reads as zeros afterwards, except in a private
    /// mapping of a file that has data there (it reads the file). The
    /// mapping stays mapped and valid, so this is safe while the guest and
    /// other threads access it. `offset` and `len` must be page aligned and
    /// inside the mapping (`InvalidInput`); hugetlb mappings are refused
    /// (`Unsupported`: a hole punched in one may leave later faults without
    /// a huge page, a `SIGBUS`).
    pub fn discard(&self, offset: usize, len: usize) -> io::Result<()> {
        let page = usize::try_from(memslots::PAGE_SIZE).unwrap_or(4096);
        if !offset.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "discard range must be page aligned"));
        }
        let p = self
            .ptr_at(offset, len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "discard range is not inside the mapping"))?;
        if self.is_hugetlb() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "discard of hugetlb memory"));
        }
        if len == 0 {
            return Ok(());
        }
        // Punch a hole only in our own memfd (shmem): in a caller's file it
        // would make a fully allocated file sparse (writes could then fail
        // for space, a SIGBUS), and on hugetlbfs it drops the reservation
        // (a later fault without a free huge page is a SIGBUS).
        let own_shmem = self.backing == Backing::Memfd && self.shared;
        if let Some(f) = self.file.as_ref().filter(|_| own_shmem) {
            if on_hugetlbfs(f).unwrap_or(true) {
                return Err(io::Error::new(io::ErrorKind::Unsupported, "discard of hugetlb memory"));
            }
            let start = self.file_offset + offset as u64;
            let (start, n) = (i64::try_from(start), i64::try_from(len));
            let (Ok(start), Ok(n)) = (start, n) else {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "discard range overflows a file offset"));
            };
            // SAFETY: fallocate on a file we hold; punching a hole keeps the
            // size (no seal is broken) and the mapping stays valid.
            let r = unsafe {
                libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, start, n)
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let advice = if self.file.is_none() && self.shared { libc::MADV_REMOVE } else { libc::MADV_DONTNEED };
        // SAFETY: `[p, p + len)` is inside our live mapping (checked by
        // `ptr_at`); dropping its pages keeps it mapped (later accesses fault
        // in zero pages or the file's), and no Rust reference covers it.
        let r = unsafe { libc::madvise(p.cast(), len, advice) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// For each page of `[offset, offset + len)` (page aligned, inside the
    /// mapping), whether it is resident (`mincore`): a page that is not was
    /// never written (or was discarded) and reads as zero in an anonymous
    /// or memfd mapping. A migration's first round or a snapshot sends only
    /// these.
    pub fn resident_pages(&self, offset: usize, len: usize) -> io::Result<Vec<bool>> {
        let page = usize::try_from(memslots::PAGE_SIZE).unwrap_or(4096);
        if !offset.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "range must be page aligned"));
        }
        let p = self
            .ptr_at(offset, len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range is not inside the mapping"))?;
        let mut vec = vec![0u8; len / page];
        if len == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: `[p, p + len)` is inside our live mapping (checked by
        // `ptr_at`) and page aligned; `vec` has one byte per page.
        let r = unsafe { libc::mincore(p.cast(), len, vec.as_mut_ptr()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
    }

    /// Fills `[offset, offset + len)` with `byte`; `None` if out of bounds.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Option<()> {
        let p = self.ptr_at(offset, len)?;
        // SAFETY: inside our live, writable mapping (checked by `ptr_at`).
        unsafe { std::ptr::write_bytes(p, byte, len) };
        Some(())
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        // SAFETY: we own the mapping `[addr, addr + len)` (hugetlb sizes are
        // multiples of the huge page size, as munmap requires). Nothing can
        // use it any more: every user holds an `Arc<HostMemory>`.
        let r = unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
        debug_assert_eq!(r, 0, "munmap failed: {}", io::Error::last_os_error());
    }
}
