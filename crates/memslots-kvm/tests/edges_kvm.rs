//! Issue-13 edges compared with this host's kernel: for each, the kernel's
//! answer (a raw kvm-ioctls VM) and the library's (configured from the host
//! by `host_config`) must agree. Skips without /dev/kvm.

use kvm_bindings::{kvm_create_guest_memfd, kvm_enable_cap, kvm_userspace_memory_region2, KVM_MEM_GUEST_MEMFD};
use kvm_ioctls::{Kvm, VmFd};
use memslots::{UserMemoryRegion2, Vm};
use memslots_kvm::{host_config, kvm_available};
use memslots_mem::{HostMemory, MapOptions};

const MIB: u64 = 1 << 20;

fn skip(t: &str) -> bool {
    if kvm_available() {
        return false;
    }
    eprintln!("SKIP {t}: /dev/kvm is not usable on this machine");
    true
}

fn errno<T>(r: Result<T, vmm_sys_util::errno::Error>) -> i32 {
    r.map_or_else(|e| e.errno(), |_| 0)
}

fn lib_errno<T>(r: Result<T, memslots::Error>) -> i32 {
    r.map_or_else(|e| e.errno().0, |_| 0)
}

fn kernel() -> VmFd {
    Kvm::new().unwrap().create_vm().unwrap()
}

fn region2(r: &UserMemoryRegion2) -> kvm_userspace_memory_region2 {
    kvm_userspace_memory_region2 {
        slot: r.slot,
        flags: r.flags,
        guest_phys_addr: r.guest_phys_addr,
        memory_size: r.memory_size,
        userspace_addr: r.userspace_addr,
        guest_memfd_offset: r.guest_memfd_offset,
        guest_memfd: r.guest_memfd,
        ..Default::default()
    }
}

/// Applies `r` to the kernel VM `k` and the library VM `l`; returns both errnos.
fn both(k: &VmFd, l: &Vm, r: &UserMemoryRegion2) -> (i32, i32) {
    // SAFETY: the host range is a live mapping the test holds, and no vCPU
    // of this VM ever runs.
    let ke = errno(unsafe { k.set_user_memory_region2(region2(r)) });
    (ke, lib_errno(l.set_user_memory_region2(r)))
}

#[test]
fn guest_memfd_slots_on_a_default_vm_and_clearing_the_flag() {
    if skip("guest_memfd_slots_on_a_default_vm_and_clearing_the_flag") {
        return;
    }
    let k = kernel();
    let l = Vm::new(host_config().unwrap()).unwrap();
    let shared = HostMemory::anonymous(MIB, &MapOptions::new()).unwrap();
    let gmem = k.create_guest_memfd(kvm_create_guest_memfd { size: 2 * MIB, ..Default::default() });
    let Ok(fd) = gmem else {
        return eprintln!("SKIP: KVM_CREATE_GUEST_MEMFD refused on a default VM here");
    };
    let fd = u32::try_from(fd).unwrap();
    let create = UserMemoryRegion2::with_guest_memfd(0, 0, 0, MIB, shared.addr(), fd, 0);
    assert_eq!(both(&k, &l, &create), (0, 0), "#1: guest_memfd on a default VM");
    let cleared = UserMemoryRegion2::new(0, 0, 0, MIB, shared.addr());
    let (ke, le) = both(&k, &l, &cleared);
    assert_eq!((ke, le), (libc::EINVAL, libc::EINVAL), "#3: clearing GUEST_MEMFD");
    let logging = UserMemoryRegion2::new(0, memslots::KVM_MEM_LOG_DIRTY_PAGES, 0, MIB, shared.addr());
    let (ke, le) = both(&k, &l, &logging);
    assert_eq!(ke, le, "#3: clearing GUEST_MEMFD while enabling dirty logging");
    assert_eq!(
        errno(k.get_dirty_log(0, 1 << 20)),
        lib_errno(l.get_dirty_log_vec(0)),
        "GET on the private slot (ENOENT on both)"
    );
    assert_eq!(KVM_MEM_GUEST_MEMFD, memslots::KVM_MEM_GUEST_MEMFD);
}

fn enable_cap(k: &VmFd, cap: u32, arg: u64) -> i32 {
    let mut c = kvm_enable_cap { cap, ..Default::default() };
    c.args[0] = arg;
    errno(k.enable_cap(&c))
}

#[test]
fn dirty_ring_enable_and_reset_rules() {
    if skip("dirty_ring_enable_and_reset_rules") {
        return;
    }
    let ring = kvm_bindings::KVM_CAP_DIRTY_LOG_RING;
    let with_bitmap = kvm_bindings::KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP;
    let config = host_config().unwrap();
    // #5: reset without rings.
    let (k, l) = (kernel(), Vm::new(config).unwrap());
    assert_eq!(errno(memslots_kvm::sys::reset_dirty_rings(&k)), libc::EINVAL);
    assert_eq!(lib_errno(l.reset_dirty_rings()), libc::EINVAL, "#5");
    // #6: the size is a u32.
    for size in [1u64 << 32, (1 << 32) + 4096, 4096, 8192, 16384, 3 * 4096, 1 << 21] {
        let (k, l) = (kernel(), Vm::new(config).unwrap());
        assert_eq!(enable_cap(&k, ring, size), lib_errno(l.enable_dirty_log_ring(size)), "#6: ring of {size:#x} bytes");
    }
    // #4: ring-with-bitmap after rings (x86: not offered).
    let (k, l) = (kernel(), Vm::new(config).unwrap());
    assert_eq!(enable_cap(&k, ring, 4096), 0);
    l.enable_dirty_log_ring(4096).unwrap();
    assert_eq!(enable_cap(&k, with_bitmap, 0), lib_errno(l.enable_dirty_log_ring_with_bitmap()), "#4");
    // Reset with rings and no vCPU: both answer 0.
    assert_eq!(errno(memslots_kvm::sys::reset_dirty_rings(&k)), lib_errno(l.reset_dirty_rings()));
}

#[test]
fn guest_memfd_binding_refusals_match_the_kernel() {
    if skip("guest_memfd_binding_refusals_match_the_kernel") {
        return;
    }
    let k = kernel();
    let l = Vm::new(host_config().unwrap()).unwrap();
    let shared = HostMemory::anonymous(8 * MIB, &MapOptions::new()).unwrap();
    let Ok(fd) = k.create_guest_memfd(kvm_create_guest_memfd { size: 4 * MIB, ..Default::default() }) else {
        return eprintln!("SKIP: KVM_CREATE_GUEST_MEMFD refused on a default VM here");
    };
    let fd = u32::try_from(fd).unwrap();
    l.declare_guest_memfd(fd, 4 * MIB); // what a backend learns with fstat
    let r = |slot: u32, off: u64| {
        UserMemoryRegion2::with_guest_memfd(
            slot,
            0,
            u64::from(slot) * MIB,
            MIB,
            shared.addr() + u64::from(slot) * MIB,
            fd,
            off,
        )
    };
    assert_eq!(both(&k, &l, &r(0, 0)), (0, 0));
    assert_eq!(both(&k, &l, &r(1, MIB / 2)), (libc::EINVAL, libc::EINVAL), "#2: overlapping binding");
    assert_eq!(both(&k, &l, &r(1, 3 * MIB + 4096)), (libc::EINVAL, libc::EINVAL), "#2: past the file's end");
    assert_eq!(both(&k, &l, &r(1, 1 << 63)), (libc::EINVAL, libc::EINVAL), "#2: negative offset");
    assert_eq!(both(&k, &l, &r(1, MIB)), (0, 0));
    assert_eq!(both(&k, &l, &UserMemoryRegion2::new(0, 0, 0, 0, 0)), (0, 0), "delete unbinds");
    assert_eq!(both(&k, &l, &r(2, 0)), (0, 0), "the range is free again");
}

#[test]
fn user_address_limit_matches_the_kernel() {
    if skip("user_address_limit_matches_the_kernel") {
        return;
    }
    let limit = host_config().unwrap().user_addr_limit;
    let (k, l) = (kernel(), Vm::new(host_config().unwrap()).unwrap());
    // #10: the last page below the limit is fine, the page at it is not.
    let below = UserMemoryRegion2::new(0, 0, 0, 0x1000, limit - 0x1000);
    assert_eq!(both(&k, &l, &below), (0, 0));
    let at = UserMemoryRegion2::new(1, 0, 0x1000, 0x1000, limit);
    let (ke, le) = both(&k, &l, &at);
    assert_eq!(ke, le, "#10: a slot at the probed limit {limit:#x}");
    assert_eq!(le, libc::EINVAL);
}
