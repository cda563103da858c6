//! Issue 10 #6: files under a mapping cannot be truncated (which would make
//! the bounds-checked API raise SIGBUS); unsealable files are refused by the
//! safe constructors and need the `unsafe` ones.

// Tests run on 64-bit Linux: guest sizes fit in usize.
#![allow(clippy::cast_possible_truncation)]

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;

use memslots::Config;
use memslots_mem::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use memslots_mem::{Error, GuestMemory, HostMemory, MapError, MapOptions, Sharing, HUGE_PAGE_2M};

const PG: u64 = 4096;

/// A memfd of `size` bytes created with `flags` (plus `MFD_CLOEXEC`).
fn memfd(flags: libc::c_uint, size: u64) -> std::io::Result<File> {
    // SAFETY: a valid NUL-terminated name; no other memory effects.
    let fd = unsafe { libc::memfd_create(c"sealing-test".as_ptr(), flags | libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size)?;
    Ok(f)
}

fn seals(f: &File) -> i32 {
    // SAFETY: F_GET_SEALS on an open fd; no memory effects.
    let s = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) };
    assert!(s >= 0, "F_GET_SEALS: {}", std::io::Error::last_os_error());
    s
}

fn add_seals(f: &File, seals: i32) -> std::io::Result<()> {
    // SAFETY: F_ADD_SEALS on an open fd; no memory effects.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn assert_eperm(r: std::io::Result<()>) {
    let e = r.expect_err("truncation must be refused");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
}

fn unsealable(r: Result<HostMemory, MapError>) -> bool {
    matches!(r, Err(MapError::Unsealable { .. }))
}

/// The reproducer: truncate the memfd behind guest RAM through
/// `HostMemory::file`, then read through the bounds-checked API.
#[test]
fn library_memfd_cannot_shrink_and_reads_still_work() {
    let mem = GuestMemory::new(Config::default()).unwrap();
    let host = mem.map_memfd("ram", 4 * PG, &MapOptions::new()).unwrap();
    mem.set_region(0, 0, 0, &host, 0, 4 * PG).unwrap();
    mem.write(0, 3 * PG + 8, b"still here").unwrap();

    let file = host.file().unwrap();
    assert_eperm(file.set_len(0));
    assert_eperm(file.set_len(PG));
    // Through a duplicate of the exposed fd (as sent to a vhost-user backend).
    let dup = File::from(host.fd().unwrap().try_clone_to_owned().unwrap());
    assert_eperm(dup.set_len(0));
    // Through vm-memory's FileOffset.
    let snap = mem.snapshot(0);
    let region = snap.find_region(memslots_mem::vm_memory::GuestAddress(0)).unwrap();
    assert_eperm(region.file_offset().unwrap().file().set_len(0));
    // Growing is harmless and allowed.
    file.set_len(8 * PG).unwrap();

    let mut buf = [0u8; 10];
    mem.read(0, 3 * PG + 8, &mut buf).unwrap();
    assert_eq!(&buf, b"still here");
    assert_eq!(mem.read_obj::<u64>(0, 3 * PG + 8).unwrap().to_le_bytes(), *b"still he");

    // The library's memfd is F_SEAL_SEAL'ed too: no peer can add e.g.
    // F_SEAL_FUTURE_WRITE, which would break its other users' writes/mmaps.
    assert_eq!(seals(file) & (libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL), libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL);
    assert_eperm(add_seals(file, libc::F_SEAL_FUTURE_WRITE));
}

/// The same sequence in a child process, ignoring the truncation's result:
/// the child must not die (on the unsealed code it died of SIGBUS).
#[test]
fn truncate_then_read_does_not_sigbus() {
    const CHILD: &str = "MEMSLOTS_MEM_SEALING_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let mem = GuestMemory::new(Config::default()).unwrap();
        let host = mem.map_memfd("ram", 4 * PG, &MapOptions::new()).unwrap();
        mem.set_region(0, 0, 0, &host, 0, 4 * PG).unwrap();
        mem.write(0, PG, b"bytes").unwrap();
        let _ = host.file().unwrap().set_len(0);
        let mut buf = [0u8; 5];
        mem.read(0, PG, &mut buf).unwrap();
        assert_eq!(&buf, b"bytes");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "truncate_then_read_does_not_sigbus", "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    assert_eq!(out.status.signal(), None, "child killed by a signal (SIGBUS is {})", libc::SIGBUS);
    assert!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A caller's memfd made with MFD_ALLOW_SEALING is sealed (F_SEAL_SHRINK
/// only: the caller keeps control of its other seals) and then cannot shrink.
#[test]
fn caller_memfd_is_sealed_by_the_safe_constructor() {
    let f = memfd(libc::MFD_ALLOW_SEALING, 4 * PG).unwrap();
    let mine = f.try_clone().unwrap();
    let mem = GuestMemory::new(Config::default()).unwrap();
    let host = mem.map_file(f, PG, 2 * PG, &MapOptions::new()).unwrap();
    mem.set_region(0, 0, 0, &host, 0, 2 * PG).unwrap();
    mem.write(0, PG - 2, b"abcd").unwrap();
    assert_eq!(seals(&mine), libc::F_SEAL_SHRINK);
    assert_eperm(mine.set_len(0));
    assert_eperm(mine.set_len(2 * PG)); // would cut the mapped range
    let mut buf = [0u8; 4];
    mem.read(0, PG - 2, &mut buf).unwrap();
    assert_eq!(&buf, b"abcd");
    // The caller may still add its own seals.
    add_seals(&mine, libc::F_SEAL_GROW | libc::F_SEAL_SEAL).unwrap();
    // The shared mapping wrote through to the file.
    let mut rd = mine.try_clone().unwrap();
    rd.seek(SeekFrom::Start(2 * PG - 2)).unwrap();
    rd.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"abcd");
}

/// Files sealed already are accepted as they are: the library's own memfd
/// mapped a second time, a Firecracker-style memfd (SHRINK | GROW | SEAL),
/// and a read-only fd of a sealed memfd (which could not add seals itself).
#[test]
fn already_sealed_files_are_accepted() {
    let own = HostMemory::memfd("ram", 4 * PG, &MapOptions::new()).unwrap();
    let again = HostMemory::from_shared_file(Arc::clone(own.file().unwrap()), 2 * PG, 2 * PG, &MapOptions::new());
    let again = again.unwrap();
    own.write_at(2 * PG as usize, b"same pages").unwrap();
    let mut buf = [0u8; 10];
    again.read_at(0, &mut buf).unwrap();
    assert_eq!(&buf, b"same pages");

    let fc = memfd(libc::MFD_ALLOW_SEALING, 2 * PG).unwrap();
    add_seals(&fc, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL).unwrap();
    HostMemory::from_file(fc.try_clone().unwrap(), 0, 2 * PG, &MapOptions::new()).unwrap();

    let ro = File::open(format!("/proc/self/fd/{}", fc.as_raw_fd())).unwrap();
    HostMemory::from_file(ro, 0, 2 * PG, &MapOptions::new().sharing(Sharing::Private)).unwrap();
}

/// Files that cannot be sealed are refused with a typed error.
#[test]
fn unsealable_files_are_refused_by_the_safe_constructors() {
    let opts = MapOptions::new();
    // A regular file on disk (the target dir is not tmpfs here, /tmp may be).
    for f in [tempfile::tempfile_in(env!("CARGO_TARGET_TMPDIR")).unwrap(), tempfile::tempfile().unwrap()] {
        f.set_len(4 * PG).unwrap();
        assert!(unsealable(HostMemory::from_file(f.try_clone().unwrap(), 0, 4 * PG, &opts)));
        assert!(unsealable(HostMemory::from_shared_file(Arc::new(f.try_clone().unwrap()), 0, PG, &opts)));
        // And the file can still be truncated by its owner: nothing was mapped.
        f.set_len(0).unwrap();
    }
    // A memfd without MFD_ALLOW_SEALING (born F_SEAL_SEAL'ed).
    let f = memfd(0, 4 * PG).unwrap();
    let err = HostMemory::from_file(f, 0, 4 * PG, &opts).unwrap_err();
    match &err {
        MapError::Unsealable { source } => assert_eq!(source.raw_os_error(), Some(libc::EPERM)),
        e => panic!("{e:?}"),
    }
    assert!(err.to_string().contains("F_SEAL_SHRINK"), "{err}");
    // A sealable memfd opened read-only: F_ADD_SEALS needs a writable fd.
    let w = memfd(libc::MFD_ALLOW_SEALING, 4 * PG).unwrap();
    let ro = File::open(format!("/proc/self/fd/{}", w.as_raw_fd())).unwrap();
    assert!(unsealable(HostMemory::from_file(ro, 0, 4 * PG, &opts.sharing(Sharing::Private))));
    // A sealed memfd whose creator locked the seals without SHRINK.
    add_seals(&w, libc::F_SEAL_SEAL).unwrap();
    assert!(unsealable(HostMemory::from_file(w, 0, 4 * PG, &opts)));
    // Through GuestMemory.
    let mem = GuestMemory::new(Config::default()).unwrap();
    let f = tempfile::tempfile_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    f.set_len(PG).unwrap();
    assert!(matches!(mem.map_file(f, 0, PG, &opts), Err(Error::Map(MapError::Unsealable { .. }))));
    assert!(mem.mappings().is_empty());
}

/// The unsafe constructor maps an unsealable file; its contract is the caller's.
#[test]
fn unsealed_constructor_maps_a_disk_file() {
    let f = tempfile::tempfile_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    f.set_len(4 * PG).unwrap();
    let mem = GuestMemory::new(Config::default()).unwrap();
    // SAFETY: the only handle to `f` moves into the mapping and the test
    // never truncates it; the file is sparse, but writing one page of it
    // cannot exhaust the file system.
    let host = unsafe { mem.map_file_unsealed(f, 0, 4 * PG, &MapOptions::new()) }.unwrap();
    mem.set_region(0, 0, 0, &host, 0, 4 * PG).unwrap();
    mem.write(0, 3 * PG, b"disk").unwrap();
    let mut buf = [0u8; 4];
    mem.read(0, 3 * PG, &mut buf).unwrap();
    assert_eq!(&buf, b"disk");
    // Still length-checked.
    let short = tempfile::tempfile_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    short.set_len(PG).unwrap();
    // SAFETY: refused before mapping.
    let r = unsafe { HostMemory::from_file_unsealed(short, 0, 2 * PG, &MapOptions::new()) };
    assert!(matches!(r, Err(MapError::Os { source, .. }) if source.kind() == ErrorKind::UnexpectedEof));
}

/// hugetlbfs pages never get MAP_NORESERVE (a fault with the pool empty is a
/// SIGBUS): anonymous, library memfd, and a caller's hugetlb memfd.
#[test]
fn hugetlb_without_reservation_is_refused() {
    let opts = MapOptions::new().hugetlb(HUGE_PAGE_2M).no_reserve(true);
    assert!(matches!(HostMemory::anonymous(HUGE_PAGE_2M, &opts), Err(MapError::HugeTlbNoReserve)));
    assert!(matches!(HostMemory::memfd("huge", HUGE_PAGE_2M, &opts), Err(MapError::HugeTlbNoReserve)));
    match memfd(libc::MFD_HUGETLB | libc::MFD_ALLOW_SEALING, HUGE_PAGE_2M) {
        Ok(f) => {
            let r = HostMemory::from_file(f, 0, HUGE_PAGE_2M, &MapOptions::new().no_reserve(true));
            assert!(matches!(r, Err(MapError::HugeTlbNoReserve)), "{r:?}");
        }
        Err(e) => eprintln!("no hugetlb memfd here ({e}): caller-file case skipped"),
    }
}
