//! Differential test of REGION2 requests with real guest_memfds (issue 13):
//! random creates (bound to one of two guest_memfds of the kernel VM, at
//! random, overlapping and out-of-file offsets), flags changes, moves,
//! deletes and dirty-log calls, on the library (configured from the host)
//! and on the host's kernel: identical verdicts for every operation.
//! Skips (with a clear message) where /dev/kvm or guest_memfd is absent.

use kvm_bindings::{kvm_create_guest_memfd, kvm_userspace_memory_region2};
use kvm_ioctls::{Kvm, VmFd};
use memslots::{UserMemoryRegion2, Vm, KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use memslots_kvm::host_config;
use std::collections::BTreeMap;

const PAGE: u64 = 4096;
const GMEM_SIZE: u64 = 256 * PAGE;
const HVA_BASE: u64 = 0x10_0000_0000;

/// A small xorshift generator (deterministic per seed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

enum Op {
    Set(UserMemoryRegion2),
    Get(u32),
}

fn errno<T>(r: Result<T, vmm_sys_util::errno::Error>) -> i32 {
    r.map_or_else(|e| e.errno(), |_| 0)
}

fn lib_errno<T>(r: Result<T, memslots::Error>) -> i32 {
    r.map_or_else(|e| e.errno().0, |_| 0)
}

/// One random operation over 8 slot ids, a 1 GiB guest range and two
/// guest_memfds of 256 pages.
fn random_op(rng: &mut Rng, gmem: [u32; 2], sizes: &BTreeMap<u32, u64>) -> Op {
    let slot = u32::try_from(rng.below(8)).unwrap();
    if rng.below(8) == 0 {
        return Op::Get(slot);
    }
    let npages = if rng.below(6) == 0 { 0 } else { 1 + rng.below(64) };
    // Reuse the slot's size and host address half of the time, so flags
    // changes and moves (not only refusals) happen.
    let size = match sizes.get(&slot) {
        Some(&s) if rng.below(2) == 0 => s,
        _ => npages * PAGE,
    };
    let gpa = rng.below(256) * 64 * PAGE;
    let hva = HVA_BASE + u64::from(slot) * (1 << 30);
    let mut flags = match rng.below(6) {
        0 => 0,
        1 => KVM_MEM_LOG_DIRTY_PAGES,
        2 => KVM_MEM_READONLY,
        _ => KVM_MEM_GUEST_MEMFD,
    };
    if rng.below(10) == 0 {
        flags |= KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES;
    }
    let fd = gmem[usize::from(rng.below(2) == 0)];
    // Offsets inside the file, overlapping others, at its end, or past it.
    let offset = match rng.below(10) {
        0 => GMEM_SIZE,
        1 => GMEM_SIZE + rng.below(64) * PAGE,
        2 => 1 << 63,
        _ => rng.below(256) * PAGE,
    };
    Op::Set(if flags & KVM_MEM_GUEST_MEMFD != 0 {
        UserMemoryRegion2::with_guest_memfd(slot, flags & !KVM_MEM_GUEST_MEMFD, gpa, size, hva, fd, offset)
    } else {
        UserMemoryRegion2::new(slot, flags, gpa, size, hva)
    })
}

fn kernel_set(vm: &VmFd, r: &UserMemoryRegion2) -> i32 {
    let region = kvm_userspace_memory_region2 {
        slot: r.slot,
        flags: r.flags,
        guest_phys_addr: r.guest_phys_addr,
        memory_size: r.memory_size,
        userspace_addr: r.userspace_addr,
        guest_memfd_offset: r.guest_memfd_offset,
        guest_memfd: r.guest_memfd,
        ..Default::default()
    };
    // SAFETY: this VM never runs a vCPU: the kernel records the host range
    // and never accesses it.
    errno(unsafe { vm.set_user_memory_region2(region) })
}

#[test]
fn region2_with_real_guest_memfds_matches_the_kernel() {
    let Some(config) = host_config() else {
        return eprintln!("SKIP region2_with_real_guest_memfds_matches_the_kernel: /dev/kvm is not available");
    };
    if !config.guest_memfd {
        return eprintln!("SKIP region2_with_real_guest_memfds_matches_the_kernel: no guest_memfd on default VMs");
    }
    let (mut total, mut divergences) = (0, Vec::new());
    let mut coverage: BTreeMap<String, usize> = BTreeMap::new();
    for seed in 0..5u64 {
        let kvm = Kvm::new().unwrap();
        let k = kvm.create_vm().unwrap();
        let lib = Vm::new(config).unwrap();
        let mut gmem = [0u32; 2];
        for g in &mut gmem {
            let fd = k.create_guest_memfd(kvm_create_guest_memfd { size: GMEM_SIZE, ..Default::default() }).unwrap();
            *g = u32::try_from(fd).unwrap();
            lib.declare_guest_memfd(*g, GMEM_SIZE);
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (seed + 1));
        let mut sizes = BTreeMap::new();
        for i in 0..4_000 {
            let op = random_op(&mut rng, gmem, &sizes);
            let (theirs, ours, what) = match &op {
                Op::Set(r) => {
                    let (kt, lt) = (kernel_set(&k, r), lib_errno(lib.set_user_memory_region2(r)));
                    if kt == 0 {
                        if r.memory_size == 0 {
                            sizes.remove(&r.slot);
                        } else {
                            sizes.insert(r.slot, r.memory_size);
                        }
                    }
                    let kind = if r.flags & KVM_MEM_GUEST_MEMFD != 0 { "set gmem" } else { "set" };
                    (kt, lt, kind)
                }
                Op::Get(slot) => {
                    let size = sizes.get(slot).copied().unwrap_or(PAGE);
                    let kt = errno(k.get_dirty_log(*slot, usize::try_from(size).unwrap()));
                    (kt, lib_errno(lib.get_dirty_log_vec(*slot)), "get")
                }
            };
            *coverage.entry(format!("{what} -> {theirs}")).or_default() += 1;
            if theirs != ours {
                let desc = match &op {
                    Op::Set(r) => format!("{r:?}"),
                    Op::Get(s) => format!("GET_DIRTY_LOG {s}"),
                };
                divergences.push(format!("seed {seed} op {i}: {desc}: kernel {theirs}, library {ours}"));
            }
            total += 1;
        }
    }
    eprintln!("coverage (operation -> kernel errno): {coverage:?}");
    assert!(
        divergences.is_empty(),
        "{} divergence(s):\n{}",
        divergences.len(),
        divergences[..divergences.len().min(20)].join("\n")
    );
    assert!(total >= 20_000);
    for needed in ["set gmem -> 0", "set gmem -> 22", "set -> 0", "set -> 22", "set -> 17", "get -> 2", "get -> 0"] {
        assert!(coverage.get(needed).copied().unwrap_or(0) > 0, "never reached {needed:?}: {coverage:?}");
    }
}
