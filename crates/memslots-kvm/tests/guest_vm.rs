//! One VM for the whole VMM job ([`KvmGuestVm`]): a prepare failure in any
//! layer (guest memory, a user layer, KVM) leaves the library, the kernel
//! and the mapping registry exactly as before; guest, device (vm-memory)
//! and VMM (library) writes meet in one harvested dirty log in every kernel
//! dirty mode; vCPU handles move into threads.
//!
//! Needs /dev/kvm: each test says so and skips without it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VcpuExit;
use memslots::{ArchHooks, Errno, MemoryChange, MemorySlot, SlotDesc, SlotDraft, KVM_MEM_LOG_DIRTY_PAGES};
use memslots_kvm::guest::writer_program;
use memslots_kvm::{kvm_available, KernelDirtyMode, KvmGuestVm};
use memslots_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use memslots_mem::{HostMemory, MapOptions};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn skip(test: &str) -> bool {
    if kvm_available() {
        return false;
    }
    eprintln!("SKIP {test}: /dev/kvm is not usable on this machine");
    true
}

/// A user layer (an emulator's MMU, say): records what it prepared and
/// committed, undoes on abort, and fails on request.
#[derive(Debug, Default)]
struct UserLayer {
    fail: AtomicI32,
    /// Changes prepared and not aborted: (change, slot).
    prepared: Mutex<Vec<(MemoryChange, u32)>>,
    committed: Mutex<Vec<(MemoryChange, u32)>>,
}

fn slot_of(old: Option<&MemorySlot<()>>, new: Option<&SlotDraft<()>>) -> u32 {
    new.map(|n| n.desc.slot()).or(old.map(|o| o.slot())).unwrap_or(u32::MAX)
}

impl ArchHooks for UserLayer {
    type SlotData = ();
    fn prepare_memory_region(
        &self,
        change: MemoryChange,
        old: Option<&MemorySlot<()>>,
        new: Option<&mut SlotDraft<()>>,
    ) -> Result<(), Errno> {
        let e = self.fail.swap(0, Ordering::AcqRel);
        if e != 0 {
            return Err(Errno(e));
        }
        let slot = slot_of(old, new.map(|n| &*n));
        self.prepared.lock().unwrap().push((change, slot));
        Ok(())
    }
    fn abort_memory_region(&self, change: MemoryChange, old: Option<&MemorySlot<()>>, new: Option<&SlotDraft<()>>) {
        let last = self.prepared.lock().unwrap().pop();
        assert_eq!(last, Some((change, slot_of(old, new))), "abort does not match the last prepare");
    }
    fn commit_memory_region(&self, change: MemoryChange, old: Option<&MemorySlot<()>>, new: Option<&MemorySlot<()>>) {
        let slot = new.map(|n| n.slot()).or(old.map(|o| o.slot())).unwrap_or(u32::MAX);
        self.committed.lock().unwrap().push((change, slot));
    }
}

/// A probe slot id the library never uses.
const PROBE_SLOT: u32 = 500;

/// Whether the kernel VM has a slot overlapping `[gpa, gpa + size)`:
/// creating a probe slot there fails with EEXIST if so (and is undone if not).
fn kernel_occupied(vm: &KvmGuestVm<UserLayer>, gpa: u64, size: u64, hva: u64) -> bool {
    let region = kvm_userspace_memory_region {
        slot: PROBE_SLOT,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva,
    };
    // SAFETY: `hva` is a live mapping the test holds for the VM's lifetime,
    // and no vCPU runs; the probe slot is deleted right away.
    match unsafe { vm.vm_fd().set_user_memory_region(region) } {
        Ok(()) => {
            let gone = kvm_userspace_memory_region { memory_size: 0, ..region };
            // SAFETY: deleting the probe slot.
            unsafe { vm.vm_fd().set_user_memory_region(gone) }.unwrap();
            false
        }
        Err(e) if e.errno() == libc::EEXIST => true,
        Err(e) => panic!("probe failed: {e}"),
    }
}

/// Whether the kernel logs dirty pages of `slot` (GET_DIRTY_LOG answers;
/// ENOENT: no slot, or not logging).
fn kernel_logging(vm: &KvmGuestVm<UserLayer>, slot: u32, size: u64) -> bool {
    match vm.vm_fd().get_dirty_log(slot, usize::try_from(size).unwrap()) {
        Ok(_) => true,
        Err(e) if e.errno() == libc::ENOENT => false,
        Err(e) => panic!("GET_DIRTY_LOG: {e}"),
    }
}

#[derive(Debug, PartialEq, Eq)]
struct State {
    slots: Vec<SlotDesc>,
    pages: u64,
    mappings: Vec<u64>,
    unbacked: u64,
    user_prepared: Vec<(MemoryChange, u32)>,
    /// Kernel: occupancy at A, B, C and whether slot 1 logs dirty pages.
    kernel: [bool; 4],
}

const GPA_A: u64 = MIB; // slot 1 lives here
const GPA_B: u64 = 4 * MIB; // CREATE target
const GPA_C: u64 = 8 * MIB; // MOVE target

fn state(vm: &KvmGuestVm<UserLayer>, probe_hva: u64) -> State {
    let slots = {
        let g = vm.vm().read();
        g.slots(0).map(|s| *s.desc()).collect()
    };
    State {
        slots,
        pages: vm.vm().nr_memslot_pages(),
        mappings: vm.mappings().iter().map(|m| m.addr()).collect(),
        unbacked: vm.mem_hooks().unbacked_slots(),
        user_prepared: vm.user_layer().prepared.lock().unwrap().clone(),
        kernel: [
            kernel_occupied(vm, GPA_A, MIB, probe_hva),
            kernel_occupied(vm, GPA_B, MIB, probe_hva),
            kernel_occupied(vm, GPA_C, MIB, probe_hva),
            kernel_logging(vm, 1, MIB),
        ],
    }
}

#[derive(Clone, Copy, Debug)]
enum Layer {
    Mem,
    User,
    Kvm,
}

#[derive(Clone, Copy, Debug)]
enum Change {
    Create,
    Move,
    Flags,
    Delete,
}

fn apply(vm: &KvmGuestVm<UserLayer>, ram: &Arc<HostMemory>, c: Change) -> Result<(), memslots_mem::Error> {
    match c {
        Change::Create => vm.set_region(2, 0, GPA_B, ram, MIB, MIB),
        Change::Move => vm.set_region(1, 0, GPA_C, ram, 0, MIB),
        Change::Flags => vm.set_region(1, KVM_MEM_LOG_DIRTY_PAGES, GPA_A, ram, 0, MIB),
        Change::Delete => vm.delete_region(1),
    }
    .map(|_| ())
}

#[test]
fn prepare_failure_in_any_layer_leaves_library_kernel_and_registry_as_before() {
    if skip("prepare_failure_in_any_layer_leaves_library_kernel_and_registry_as_before") {
        return;
    }
    let injected = Errno(libc::ENOSPC);
    for layer in [Layer::Mem, Layer::User, Layer::Kvm] {
        for change in [Change::Create, Change::Move, Change::Flags, Change::Delete] {
            let vm = KvmGuestVm::with_layer(UserLayer::default()).unwrap();
            let ram = vm.map_memfd("ram", 2 * MIB, &MapOptions::new()).unwrap();
            let probe = HostMemory::anonymous(MIB, &MapOptions::new()).unwrap();
            vm.set_region(1, 0, GPA_A, &ram, 0, MIB).unwrap();
            let before = state(&vm, probe.addr());
            match layer {
                Layer::Mem => vm.mem_hooks().inject_prepare_failure(injected),
                Layer::User => vm.user_layer().fail.store(injected.0, Ordering::Release),
                Layer::Kvm => vm.kvm_hooks().inject_prepare_failure(injected),
            }
            let e = apply(&vm, &ram, change).expect_err("the injected failure must refuse the change");
            assert_eq!(e.errno(), injected, "{layer:?} {change:?}: {e}");
            let after = state(&vm, probe.addr());
            assert_eq!(before, after, "{layer:?} {change:?}: state changed by a refused change");
            // The same change without the failure goes through, and the
            // probes see it (so they would have seen a leak).
            apply(&vm, &ram, change).unwrap();
            let done = state(&vm, probe.addr());
            let expect = match change {
                Change::Create => [true, true, false, false],
                Change::Move => [false, false, true, false],
                Change::Flags => [true, false, false, true],
                Change::Delete => [false, false, false, false],
            };
            assert_eq!(done.kernel, expect, "{layer:?} {change:?}: kernel after the change");
        }
    }
}

#[test]
fn natural_refusals_roll_back_every_layer() {
    if skip("natural_refusals_roll_back_every_layer") {
        return;
    }
    let vm = KvmGuestVm::with_layer(UserLayer::default()).unwrap();
    let ram = vm.map_memfd("ram", 2 * MIB, &MapOptions::new()).unwrap();
    let probe = HostMemory::anonymous(MIB, &MapOptions::new()).unwrap();
    vm.set_region(1, 0, GPA_A, &ram, 0, MIB).unwrap();
    let before = state(&vm, probe.addr());

    // Guest-memory layer: a slot over host memory that is not registered.
    let stray = HostMemory::anonymous(MIB, &MapOptions::new()).unwrap();
    let r = memslots::UserMemoryRegion::new(2, 0, GPA_B, MIB, stray.addr());
    assert_eq!(vm.vm().set_user_memory_region(&r).unwrap_err().errno(), Errno::EFAULT);
    assert_eq!(state(&vm, probe.addr()), before);

    // KVM: the kernel refuses a guest_memfd binding to a file that is not a
    // guest_memfd (the library cannot know); the user layer is aborted.
    if vm.vm().config().guest_memfd {
        use std::os::fd::AsFd;
        let not_gmem = ram.fd().unwrap().try_clone_to_owned().unwrap();
        let refusals = vm.kvm_hooks().refusals();
        let e = vm.set_region_guest_memfd(2, 0, GPA_B, &ram, MIB, MIB, not_gmem.as_fd(), 0).unwrap_err();
        assert_ne!(e.errno(), Errno(0));
        assert_eq!(vm.kvm_hooks().refusals(), refusals + 1, "the kernel, not the library, refused: {e}");
        assert_eq!(state(&vm, probe.addr()), before);
    } else {
        eprintln!("guest_memfd not offered on default VMs here: kernel-refusal case skipped");
    }
}

/// Real-mode vCPU at 0x1000 (the writer program reads its table at 0x2000).
fn real_mode(vcpu: &memslots_kvm::KvmVcpu) {
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
}

fn pages_of(bitmap: &[u64]) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for (w, &bits) in bitmap.iter().enumerate() {
        for b in 0..64 {
            if bits & (1 << b) != 0 {
                out.insert(w as u64 * 64 + b);
            }
        }
    }
    out
}

#[test]
fn guest_device_and_vmm_writes_meet_in_one_dirty_log_in_every_mode() {
    if skip("guest_device_and_vmm_writes_meet_in_one_dirty_log_in_every_mode") {
        return;
    }
    for mode in [KernelDirtyMode::Bitmap, KernelDirtyMode::ManualProtect, KernelDirtyMode::Ring(64 * 1024)] {
        let vm = KvmGuestVm::new().unwrap();
        vm.enable_dirty_mode(mode).unwrap();
        let ram = vm.map_memfd("ram", MIB, &MapOptions::new()).unwrap();
        vm.set_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, &ram, 0, MIB).unwrap();
        // The guest writes pages 16..40 (real mode: segment = gpa >> 4).
        let guest_pages: Vec<u64> = (16..40).collect();
        let table: Vec<u8> = guest_pages
            .iter()
            .map(|p| u16::try_from((p * PAGE) >> 4).unwrap())
            .chain([0])
            .flat_map(u16::to_le_bytes)
            .collect();
        vm.write(0, 0x1000, &writer_program()).unwrap();
        vm.write(0, 0x2000, &table).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        real_mode(&vcpu);
        // Loading the program dirtied pages 1 and 2: start from a clean log.
        let loaded = pages_of(&vm.harvest_dirty_log(0).unwrap());
        assert_eq!(loaded, BTreeSet::from([1, 2]), "{mode:?}: the VMM's own writes");

        // The vCPU runs in its own thread (the handle is owned and Send) ...
        let guest = std::thread::spawn(move || {
            let mut vcpu = vcpu;
            match vcpu.run().unwrap() {
                VcpuExit::Hlt => {}
                other => panic!("unexpected exit {other:?}"),
            }
        });
        // ... while a device thread writes through the vm-memory traits ...
        let space = vm.address_space(0);
        let device = std::thread::spawn(move || {
            for p in 100..110u32 {
                space.memory().write_obj(0xd0 + p, GuestAddress(u64::from(p) * PAGE + 8)).unwrap();
            }
        });
        // ... and the VMM writes through the library.
        for p in 200..205u64 {
            vm.write_obj(0, p * PAGE + 16, p).unwrap();
        }
        guest.join().unwrap();
        device.join().unwrap();

        let mut expect: BTreeSet<u64> = guest_pages.iter().copied().collect();
        expect.extend(100..110);
        expect.extend(200..205);
        let got = pages_of(&vm.harvest_dirty_log(0).unwrap());
        assert_eq!(got, expect, "{mode:?}: harvested set != union of the pages written");
        // Everything was harvested once.
        assert!(pages_of(&vm.harvest_dirty_log(0).unwrap()).is_empty(), "{mode:?}: second harvest not empty");
        // The guest's writes are really there.
        assert_eq!(vm.read_obj::<u16>(0, 16 * PAGE).unwrap(), 0xBEEF);
    }
}

#[test]
fn hot_unplug_unmaps_the_mapping_once_nothing_reaches_it() {
    if skip("hot_unplug_unmaps_the_mapping_once_nothing_reaches_it") {
        return;
    }
    let vm = KvmGuestVm::new().unwrap();
    let space = vm.address_space(0);
    let dimm = vm.map_memfd("dimm", 2 * MIB, &MapOptions::new()).unwrap();
    let addr = dimm.addr();
    vm.set_region(3, 0, 16 * MIB, &dimm, 0, 2 * MIB).unwrap();
    vm.write_obj(0, 16 * MIB, 0x5a5a_u64).unwrap();
    let _ = space.memory(); // the address space caches a snapshot with the DIMM
    let held = space.memory(); // and a device holds one
    drop(dimm);
    vm.delete_region(3).unwrap();
    assert!(is_mapped(addr), "a held snapshot keeps the mapping");
    assert_eq!(held.read_obj::<u64>(GuestAddress(16 * MIB)).unwrap(), 0x5a5a, "the holder reads valid bytes");
    drop(held);
    assert!(!is_mapped(addr), "unmapped once no slot, snapshot or reader reaches it");
}

/// Whether host address `addr` is inside a mapping of this process.
fn is_mapped(addr: u64) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().any(|l| {
        let range = l.split_whitespace().next().unwrap();
        let (s, e) = range.split_once('-').unwrap();
        let (s, e) = (u64::from_str_radix(s, 16).unwrap(), u64::from_str_radix(e, 16).unwrap());
        s <= addr && addr < e
    })
}

#[test]
fn a_guest_memfd_slot_through_the_guest_memory_layer() {
    if skip("a_guest_memfd_slot_through_the_guest_memory_layer") {
        return;
    }
    use std::os::fd::AsFd;
    let vm = KvmGuestVm::new().unwrap();
    if !vm.vm().config().guest_memfd {
        return eprintln!("SKIP a_guest_memfd_slot_through_the_guest_memory_layer: no guest_memfd on default VMs here");
    }
    let shared = vm.map_memfd("shared", 2 * MIB, &MapOptions::new()).unwrap();
    let gmem = vm.create_guest_memfd(4 * MIB).unwrap();
    vm.set_region_guest_memfd(0, 0, 0, &shared, 0, 2 * MIB, gmem.as_fd(), 2 * MIB).unwrap();
    let d = vm.vm().id_to_slot_desc(0, 0).unwrap();
    assert_eq!(d.guest_memfd.map(|g| g.offset), Some(2 * MIB));
    assert!(vm.slot_backing(0).unwrap().is_some(), "the shared half is backed by the mapping");
    // The shared half is accessible through the library.
    vm.write_obj(0, 0x1000, 7u64).unwrap();
    assert_eq!(vm.read_obj::<u64>(0, 0x1000).unwrap(), 7);
    // GUEST_MEMFD slots cannot log dirty pages (KVM's check_memory_region_flags).
    let e = vm.set_region_guest_memfd(1, KVM_MEM_LOG_DIRTY_PAGES, 4 * MIB, &shared, 0, MIB, gmem.as_fd(), 0);
    assert_eq!(e.unwrap_err().errno(), Errno::EINVAL);
    vm.delete_region(0).unwrap();
}
