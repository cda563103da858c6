//! The KVM backend: random operations through a library VM mirrored into a
//! kernel VM. The library validates first, so the kernel must accept every
//! request the library accepts (zero refusals); afterwards every slot the
//! library holds is probed in the kernel.

use memslots::trace::{Generator, Verdict};
use memslots::Errno;
use memslots_kvm::{new_kvm_vm, KernelVm};

#[test]
fn backend_mirrors_every_change_without_divergence() {
    if !memslots_kvm::kvm_available() {
        eprintln!("SKIP backend_mirrors_every_change_without_divergence: /dev/kvm is not available");
        return;
    }
    let mut total = 0;
    for seed in 0..4u64 {
        // Unrestricted: no vCPU can be created, so fake host ranges are harmless.
        let vm = new_kvm_vm().expect("kernel VM");
        let config = *vm.config();
        // A reference kernel VM fed the raw requests: the backend's verdicts
        // must equal what the kernel alone says.
        let mut reference = KernelVm::new().expect("kernel VM");
        let mut gen = Generator::new(0xbac_0000 + seed, config.nr_address_spaces, config.user_slots);
        let mut divergences = Vec::new();
        for i in 0..6_000 {
            let op = gen.next_op();
            let ours = memslots::trace::apply(&vm, &op);
            let kernel = reference.apply(&op);
            if ours != kernel {
                divergences.push(format!("seed {seed} op {i} `{op}`: backend {ours}, kernel {kernel}"));
            }
            total += 1;
        }
        assert!(divergences.is_empty(), "{}", divergences.join("\n"));
        assert_eq!(vm.hooks().refusals(), 0, "the kernel refused requests the library had validated");
        // Probe: each slot the library holds is in the backend's kernel VM
        // identically (an identical request is a no-op), and absent ids are absent.
        // SAFETY: only used below for no-op or failing slot requests; no vCPU
        // is created on it.
        let kernel_vm = unsafe { vm.hooks().vm_fd() };
        let g = vm.read();
        for as_id in 0..config.nr_address_spaces {
            for id in 0..16u16 {
                let slot = (u32::from(as_id) << 16) | u32::from(id);
                let (region, want) = match g.id_to_memslot(as_id, id) {
                    Some(s) => (
                        kvm_bindings::kvm_userspace_memory_region {
                            slot,
                            flags: s.flags,
                            guest_phys_addr: s.base_gfn << 12,
                            memory_size: s.npages << 12,
                            userspace_addr: s.userspace_addr,
                        },
                        Verdict::Ok,
                    ),
                    None => (
                        kvm_bindings::kvm_userspace_memory_region { slot, ..Default::default() },
                        Verdict::Err(Errno::EINVAL),
                    ),
                };
                // SAFETY: a no-op or a failing delete; no vCPU exists.
                let got = match unsafe { kernel_vm.set_user_memory_region(region) } {
                    Ok(()) => Verdict::Ok,
                    Err(e) => Verdict::Err(Errno(e.errno())),
                };
                assert_eq!(got, want, "seed {seed}: kernel state of slot {slot:#x} differs from the library's");
            }
        }
    }
    assert!(total >= 20_000);
    eprintln!("{total} operations through the KVM backend, 0 divergences, 0 kernel refusals");
}

#[test]
fn kernel_refusal_rolls_back_and_returns_the_kernels_errno() {
    if !memslots_kvm::kvm_available() {
        eprintln!("SKIP kernel_refusal_rolls_back_and_returns_the_kernels_errno: /dev/kvm is not available");
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let fd = kvm.create_vm().unwrap();
    // The library believes any gfn is mappable; the kernel does not.
    let mut config = memslots_kvm::host_config().unwrap().with_address_spaces(1);
    config.max_gfn = u64::MAX >> 12;
    // SAFETY: no vCPU is created; the kernel never touches the host ranges.
    let vm = unsafe { memslots_kvm::backend::with_config(fd, config) }.unwrap();
    let ok = memslots::UserMemoryRegion::new(1, 0, 0x10_0000, 0x2000, 0x1000_0000);
    vm.set_user_memory_region(&ok).unwrap();
    let gen = vm.generation(0);
    // CREATE beyond the kernel's max gfn: refused in prepare, nothing published.
    let far = memslots::UserMemoryRegion::new(2, 0, 1 << 60, 0x1000, 0x2000_0000);
    assert_eq!(vm.set_user_memory_region(&far).unwrap_err().errno(), Errno::EINVAL);
    assert!(vm.read().id_to_memslot(0, 2).is_none());
    assert_eq!(vm.generation(0), gen, "a refused CREATE publishes nothing");
    // MOVE beyond it: the INVALID copy was published, then the old slot reinstalled.
    let mv = memslots::UserMemoryRegion::new(1, 0, 1 << 60, 0x2000, 0x1000_0000);
    assert_eq!(vm.set_user_memory_region(&mv).unwrap_err().errno(), Errno::EINVAL);
    let g = vm.read();
    let s = g.id_to_memslot(0, 1).expect("old slot reinstalled");
    assert_eq!((s.base_gfn, s.npages, s.is_invalid()), (0x100, 2, false));
    assert_eq!(g.gfn_to_hva(0, 0x101), Ok(0x1000_1000));
    drop(g);
    assert_eq!(vm.hooks().refusals(), 2);
    // The kernel still has the slot where it was: an identical request is a no-op.
    vm.set_user_memory_region(&memslots::UserMemoryRegion::new(1, 1, 0x10_0000, 0x2000, 0x1000_0000)).unwrap();
}

#[test]
fn host_capabilities_are_read() {
    let Some(caps) = memslots_kvm::host_caps() else {
        eprintln!("SKIP host_capabilities_are_read: /dev/kvm is not available");
        return;
    };
    eprintln!("{caps:?}");
    let config = memslots_kvm::host_config().unwrap();
    assert_eq!(u32::from(config.user_slots), caps.nr_memslots);
    assert_eq!(u32::from(config.nr_address_spaces), caps.address_spaces);
    assert_eq!(config.readonly_mem, caps.readonly_mem);
    assert!(caps.nr_memslots > 0);
}
