//! KVM 6.18 at the edges (issue 13): rules the kernel enforces that the
//! library follows. Each was confirmed against this host's /dev/kvm where
//! the host can exercise it (`crates/memslots-kvm/tests/edges_kvm.rs`).

use memslots::{Config, Errno, UserMemoryRegion2, Vm, KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES};

const MIB: u64 = 1 << 20;

#[test]
fn guest_memfd_accepted_on_default_vms_when_the_host_says_so() {
    let r = UserMemoryRegion2::with_guest_memfd(0, 0, 0, MIB, 0x10_0000_0000, 7, 0);
    let plain = Vm::new(Config::default()).unwrap();
    assert_eq!(plain.set_user_memory_region2(&r).unwrap_err().errno(), Errno::EINVAL);
    let gmem = Vm::new(Config::default().with_guest_memfd(true)).unwrap();
    gmem.set_user_memory_region2(&r).unwrap();
}

#[test]
fn guest_memfd_cannot_be_cleared_from_a_slot() {
    let vm = Vm::new(Config::default().with_guest_memfd(true)).unwrap();
    vm.set_user_memory_region2(&UserMemoryRegion2::with_guest_memfd(0, 0, 0, MIB, 0x10_0000_0000, 7, 0)).unwrap();
    // Same slot, same size and address, GUEST_MEMFD dropped: the kernel
    // refuses `(flags ^ old) & (READONLY | GUEST_MEMFD)`.
    for flags in [0, KVM_MEM_LOG_DIRTY_PAGES] {
        let r = UserMemoryRegion2::new(0, flags, 0, MIB, 0x10_0000_0000);
        assert_eq!(vm.set_user_memory_region2(&r).unwrap_err().errno(), Errno::EINVAL, "flags {flags:#x}");
    }
    let d = vm.id_to_slot_desc(0, 0).unwrap();
    assert_eq!(d.flags & KVM_MEM_GUEST_MEMFD, KVM_MEM_GUEST_MEMFD, "still private");
    // And so dirty logging stays refused: GET is ENOENT.
    assert_eq!(vm.get_dirty_log_vec(0).unwrap_err().errno(), Errno::ENOENT);
}

#[test]
fn private_memory_vms_have_one_address_space() {
    let c = Config::default().with_private_mem(true);
    assert_eq!(c.nr_address_spaces, 1);
    let vm = Vm::new(c).unwrap();
    assert_eq!(vm.nr_address_spaces(), 1);
    let mut two = c;
    two.nr_address_spaces = 2;
    assert!(Vm::new(two).is_err(), "two address spaces with private memory is not a KVM configuration");
}

/// Records, at each `memslots_updated`, the generation passed and the one
/// the VM shows at that moment.
#[derive(Debug, Default)]
struct GenProbe {
    vm: std::sync::OnceLock<&'static Vm<GenProbe>>,
    seen: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl memslots::ArchHooks for GenProbe {
    type SlotData = ();
    fn memslots_updated(&self, as_id: u16, generation: u64) {
        let now = self.vm.get().map_or(0, |vm| vm.generation(as_id).unwrap());
        self.seen.lock().unwrap().push((generation, now));
    }
}

#[test]
fn memslots_updated_runs_before_the_new_generation_is_stored() {
    let vm: &'static Vm<GenProbe> =
        Box::leak(Box::new(Vm::with_hooks(Config::default(), GenProbe::default()).unwrap()));
    vm.hooks().vm.set(vm).unwrap();
    vm.set_user_memory_region(&memslots::UserMemoryRegion::new(0, 0, 0, MIB, 0x10_0000_0000)).unwrap();
    let seen = vm.hooks().seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    for (passed, shown) in seen {
        assert_ne!(shown & memslots::GEN_UPDATE_IN_PROGRESS, 0, "the update is still in progress for readers");
        assert_ne!(passed, shown & !memslots::GEN_UPDATE_IN_PROGRESS, "the new generation is not yet stored");
    }
    assert_eq!(vm.generation(0).unwrap() & memslots::GEN_UPDATE_IN_PROGRESS, 0);
}

#[test]
fn guest_memfd_bindings_are_checked_per_file() {
    let vm = Vm::new(Config::default().with_guest_memfd(true)).unwrap();
    let hva = |i: u64| 0x10_0000_0000 + i * MIB;
    let bind = |slot: u32, gpa: u64, fd: u32, off: u64| {
        vm.set_user_memory_region2(&UserMemoryRegion2::with_guest_memfd(
            slot,
            0,
            gpa,
            MIB,
            hva(u64::from(slot)),
            fd,
            off,
        ))
    };
    vm.declare_guest_memfd(7, 4 * MIB);
    bind(0, 0, 7, 0).unwrap();
    let einval = |r: Result<memslots::Outcome, memslots::Error>| r.unwrap_err().errno();
    assert_eq!(einval(bind(1, MIB, 7, MIB / 2)), Errno::EINVAL, "overlaps slot 0's binding");
    assert_eq!(einval(bind(1, MIB, 7, 3 * MIB + 4096)), Errno::EINVAL, "past the end of the 4 MiB file");
    assert_eq!(einval(bind(1, MIB, 7, 1 << 63)), Errno::EINVAL, "negative as a file offset");
    assert!(vm.id_to_slot_desc(0, 1).is_none(), "nothing was created");
    bind(1, MIB, 7, MIB).unwrap();
    bind(2, 2 * MIB, 8, 0).unwrap(); // another file, same offset: fine
                                     // Deleting unbinds: the range can be bound again.
    vm.set_user_memory_region2(&UserMemoryRegion2::new(0, 0, 0, 0, 0)).unwrap();
    bind(3, 3 * MIB, 7, 0).unwrap();
}

#[test]
fn internal_slots_follow_kvm_set_internal_memslot_and_x86_set_memory_region() {
    let config = Config::default(); // 2 address spaces, 32764 user ids + 3 internal
    let vm = Vm::new(config).unwrap();
    let internal = config.user_slots; // the first internal id
                                      // kvm_set_internal_memslot: user ids and flags are refused.
    let user_id = UserMemoryRegion2::new(5, 0, 0, 0x1000, 0x10_0000_0000);
    assert_eq!(vm.set_memory_region_internal(&user_id).unwrap_err().errno(), Errno::EINVAL);
    let flagged = UserMemoryRegion2::new(u32::from(internal), KVM_MEM_LOG_DIRTY_PAGES, 0, 0x1000, 0x10_0000_0000);
    assert_eq!(vm.set_memory_region_internal(&flagged).unwrap_err().errno(), Errno::EINVAL);
    // __x86_set_memory_region: every address space; EEXIST on re-create.
    vm.x86_set_memory_region(internal, 0xfee0_0000, 0x1000, 0x10_0000_0000).unwrap();
    for as_id in 0..2 {
        let d = vm.id_to_slot_desc(as_id, internal).expect("created in every address space");
        assert_eq!((d.base_gfn, d.npages, d.userspace_addr), (0xfee00, 1, 0x10_0000_0000));
    }
    let again = vm.x86_set_memory_region(internal, 0xfee0_0000, 0x1000, 0x10_0000_0000);
    assert_eq!(again.unwrap_err().errno(), Errno::EEXIST);
    // Deleting uses the slot's own hva; deleting an absent one succeeds.
    assert_eq!(
        vm.x86_set_memory_region(internal, 0, 0, 0),
        Ok(memslots::Outcome::Changed(memslots::MemoryChange::Delete))
    );
    assert!(vm.id_to_slot_desc(0, internal).is_none() && vm.id_to_slot_desc(1, internal).is_none());
    assert_eq!(vm.x86_set_memory_region(internal, 0, 0, 0), Ok(memslots::Outcome::Unchanged));
    assert_eq!(vm.x86_set_memory_region(config.mem_slots_num, 0, 0x1000, 0x1000).unwrap_err().errno(), Errno::EINVAL);
}
