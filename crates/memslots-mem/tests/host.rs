//! Host mappings: anonymous, memfd (shareable fd), file-backed, hugetlbfs, THP.

// Tests run on 64-bit Linux: guest sizes fit in usize.
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;

use memslots::Config;
use memslots_mem::{Backing, GuestMemory, HostMemory, HugePages, MapError, MapOptions, Sharing, HUGE_PAGE_2M};

const PG: u64 = 4096;

/// A memfd created with `MFD_ALLOW_SEALING`, `size` bytes long.
fn sealable_memfd(size: u64) -> std::fs::File {
    // SAFETY: a valid NUL-terminated name; no other memory effects.
    let fd = unsafe { libc::memfd_create(c"host-test".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

#[test]
fn anonymous_mapping_is_zeroed_and_bounded() {
    let m = HostMemory::anonymous(3 * PG, &MapOptions::new().populate(true)).unwrap();
    assert_eq!(m.len(), 3 * PG as usize);
    assert_eq!(m.addr() % PG, 0);
    assert_eq!(m.backing(), Backing::Anonymous);
    assert!(m.fd().is_none());
    let mut buf = vec![1u8; m.len()];
    m.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    m.write_at(3 * PG as usize - 2, &[7, 8]).unwrap();
    assert!(m.write_at(3 * PG as usize - 1, &[7, 8]).is_none(), "past the end");
    assert!(m.read_at(usize::MAX, &mut [0u8; 1]).is_none());
    assert!(m.fill(0, usize::MAX, 0).is_none());
    assert!(m.contains(m.addr(), 3 * PG));
    assert!(!m.contains(m.addr(), 3 * PG + 1));
    assert!(!m.contains(m.addr() - 1, 1));
    assert!(!m.contains(u64::MAX, 2));
}

#[test]
fn bad_sizes_and_offsets() {
    assert!(matches!(HostMemory::anonymous(0, &MapOptions::new()), Err(MapError::BadSize { .. })));
    assert!(matches!(HostMemory::anonymous(100, &MapOptions::new()), Err(MapError::BadSize { .. })));
    assert!(matches!(HostMemory::anonymous(!0xfff, &MapOptions::new()), Err(MapError::BadSize { .. })));
    let huge = MapOptions::new().hugetlb(HUGE_PAGE_2M);
    assert!(matches!(HostMemory::anonymous(PG, &huge), Err(MapError::BadSize { .. })));
    assert!(matches!(HostMemory::anonymous(PG, &MapOptions::new().hugetlb(3000)), Err(MapError::BadHugePageSize(_))));
    assert!(matches!(HostMemory::memfd("a\0b", PG, &MapOptions::new()), Err(MapError::BadName)));
    let f = sealable_memfd(4 * PG);
    let f2 = f.try_clone().unwrap();
    assert!(matches!(HostMemory::from_file(f, 100, PG, &MapOptions::new()), Err(MapError::BadOffset { .. })));
    // A mapping past the end of the file would SIGBUS: refused.
    assert!(matches!(HostMemory::from_file(f2, 2 * PG, 4 * PG, &MapOptions::new()), Err(MapError::Os { .. })));
}

#[test]
fn memfd_exposes_a_shareable_fd() {
    let mem = GuestMemory::new(Config::default()).unwrap();
    let m = mem.map_memfd("guest-ram", 4 * PG, &MapOptions::new()).unwrap();
    assert_eq!(m.backing(), Backing::Memfd);
    assert!(m.is_shared());
    assert_eq!(m.file_offset(), 0);
    mem.set_region(0, 0, 0x10_0000, &m, 0, 4 * PG).unwrap();
    mem.write(0, 0x10_0000 + PG + 3, b"vhost-user sees this").unwrap();
    // Another user of the fd (a vhost-user backend would mmap it) sees the bytes.
    let fd = m.fd().unwrap().try_clone_to_owned().unwrap();
    let mut file = std::fs::File::from(fd);
    file.seek(SeekFrom::Start(PG + 3)).unwrap();
    let mut buf = [0u8; 20];
    file.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"vhost-user sees this");
    // And writes through the fd are seen by the guest.
    file.seek(SeekFrom::Start(2 * PG)).unwrap();
    file.write_all(b"from the backend").unwrap();
    let mut got = [0u8; 16];
    mem.read(0, 0x10_0000 + 2 * PG, &mut got).unwrap();
    assert_eq!(&got, b"from the backend");
    assert!(m.fd().unwrap().as_raw_fd() >= 0);
}

#[test]
fn file_backed_shared_and_private() {
    let mem = GuestMemory::new(Config::default()).unwrap();
    // A caller's memfd (the safe constructor needs a sealable file; disk
    // files take the unsafe one, see tests/sealing.rs).
    let mut f = sealable_memfd(0);
    f.write_all(&vec![0x5au8; 8 * PG as usize]).unwrap();
    let shared = mem.map_file(f.try_clone().unwrap(), 2 * PG, 4 * PG, &MapOptions::new()).unwrap();
    assert_eq!(shared.backing(), Backing::File);
    assert_eq!(shared.file_offset(), 2 * PG);
    mem.set_region(0, 0, 0, &shared, 0, 4 * PG).unwrap();
    assert_eq!(mem.read_obj::<u32>(0, 0x10).unwrap(), 0x5a5a_5a5a);
    mem.write_obj(0, 0x10, 0x0102_0304u32).unwrap();
    // Shared: the write reached the file at offset 2 pages + 0x10.
    let mut buf = [0u8; 4];
    f.seek(SeekFrom::Start(2 * PG + 0x10)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(u32::from_le_bytes(buf), 0x0102_0304);

    // Private: copy-on-write, the file is untouched.
    let private =
        mem.map_file(f.try_clone().unwrap(), 0, 2 * PG, &MapOptions::new().sharing(Sharing::Private)).unwrap();
    assert!(!private.is_shared());
    mem.set_region(1, 0, 0x10_0000, &private, 0, 2 * PG).unwrap();
    mem.write_obj(0, 0x10_0000, 0xffu8).unwrap();
    assert_eq!(mem.read_obj::<u8>(0, 0x10_0000).unwrap(), 0xff);
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut b = [0u8; 1];
    f.read_exact(&mut b).unwrap();
    assert_eq!(b[0], 0x5a);
}

#[test]
fn transparent_huge_pages() {
    let m = HostMemory::anonymous(4 * HUGE_PAGE_2M, &MapOptions::new().thp()).unwrap();
    assert_eq!(m.huge_pages(), HugePages::Transparent);
    // madvise succeeds where THP is built in; either way the memory works.
    let thp_built_in = std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists();
    if thp_built_in {
        assert!(m.thp_advised());
    }
    m.write_at(HUGE_PAGE_2M as usize + 5, &[1, 2, 3]).unwrap();
    let mut b = [0u8; 3];
    m.read_at(HUGE_PAGE_2M as usize + 5, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3]);
}

/// hugetlbfs needs reserved huge pages (`/proc/sys/vm/nr_hugepages`); where
/// there are none, mapping fails cleanly with ENOMEM (anonymous) or at
/// ftruncate/mmap (memfd), and the test checks just that.
#[test]
fn hugetlbfs_pages_or_a_clean_error() {
    let free: u64 = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let opts = MapOptions::new().hugetlb(HUGE_PAGE_2M);
    let anon = HostMemory::anonymous(HUGE_PAGE_2M, &opts);
    let memfd = HostMemory::memfd("huge", HUGE_PAGE_2M, &opts);
    if free >= 2 {
        for m in [anon.unwrap(), memfd.unwrap()] {
            assert!(m.is_hugetlb());
            assert_eq!(m.addr() % HUGE_PAGE_2M, 0);
            m.write_at(HUGE_PAGE_2M as usize - 1, &[9]).unwrap();
        }
    } else {
        eprintln!("no free 2 MiB huge pages: checking the failure path only");
        assert!(matches!(anon, Err(MapError::Os { .. })), "{anon:?}");
        // A hugetlb memfd can be created without reserved pages; mapping or faulting needs them.
        if let Ok(m) = memfd {
            assert!(m.is_hugetlb());
        }
    }
}
