//! The guest-memory lifecycle a VMM needs, without KVM: hot-unplug unmaps
//! the host mapping by itself once no slot, snapshot or reader reaches it
//! (and a holder keeps reading valid bytes until then: run under ASan by
//! `.ci/sanitizers`); balloon discard; an owned vCPU handle in a thread.

use memslots::Config;
use memslots_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use memslots_mem::{GuestMemory, MapOptions};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

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
fn hot_unplug_unmaps_once_no_slot_snapshot_or_reader_reaches_the_mapping() {
    let mem = GuestMemory::new(Config::default().with_address_spaces(1)).unwrap();
    let space = mem.address_space(0);
    let dimm = mem.map_memfd("dimm", 2 * MIB, &MapOptions::new()).unwrap();
    let addr = dimm.addr();
    mem.set_region(3, 0, 16 * MIB, &dimm, 0, 2 * MIB).unwrap();
    mem.write_obj(0, 16 * MIB + 8, 0x1234_5678_u64).unwrap();
    drop(dimm); // the caller lets go: the slot holds the mapping now
    let _cached = space.memory(); // the address space caches a snapshot
    let held = space.memory(); // a device keeps one across the unplug
    drop(_cached);
    let vcpu = mem.vcpu();
    mem.delete_region(3).unwrap();
    assert!(is_mapped(addr), "a held snapshot keeps the mapping");
    assert_eq!(held.read_obj::<u64>(GuestAddress(16 * MIB + 8)).unwrap(), 0x1234_5678, "valid bytes for the holder");
    // The vCPU no longer sees the slot, and holds nothing of it.
    assert!(vcpu.read_obj::<u64>(16 * MIB + 8).is_err());
    drop(held);
    assert!(!is_mapped(addr), "unmapped once no slot, snapshot or reader reaches it");
    // A fresh snapshot does not have the region.
    assert!(space.memory().read_obj::<u64>(GuestAddress(16 * MIB + 8)).is_err());
}

#[test]
fn a_read_section_keeps_the_mapping_until_it_ends() {
    let mem = GuestMemory::new(Config::default().with_address_spaces(1)).unwrap();
    let dimm = mem.map_anonymous(MIB, &MapOptions::new()).unwrap();
    let addr = dimm.addr();
    mem.set_region(1, 0, 0, &dimm, 0, MIB).unwrap();
    drop(dimm);
    let backing = mem.slot_backing(1).unwrap().unwrap(); // like a reader's Arc
    mem.delete_region(1).unwrap();
    assert!(is_mapped(addr));
    assert!(backing.memory().read_at(0, &mut [0u8; 8]).is_some());
    drop(backing);
    assert!(!is_mapped(addr));
}

/// A user layer recording `unmap_gfn_range` calls.
#[derive(Debug, Default)]
struct Unmaps(std::sync::Mutex<Vec<(u32, u64, u64)>>);

impl memslots::ArchHooks for Unmaps {
    type SlotData = ();
    fn unmap_gfn_range(&self, slot: &memslots::MemorySlot<()>, start: u64, end: u64) -> bool {
        self.0.lock().unwrap().push((slot.slot(), start, end));
        true
    }
}

#[test]
fn discard_zeroes_guest_pages_and_invalidates_them() {
    for shared_memfd in [true, false] {
        let config = Config::default().with_address_spaces(1);
        let mem = GuestMemory::with_layers(config, memslots_mem::MemHooks::new(), Unmaps::default()).unwrap();
        let ram = if shared_memfd {
            mem.map_memfd("ram", 4 * MIB, &MapOptions::new()).unwrap()
        } else {
            mem.map_anonymous(4 * MIB, &MapOptions::new()).unwrap()
        };
        // Two slots with a hole between them.
        mem.set_region(0, 0, 0, &ram, 0, MIB).unwrap();
        mem.set_region(1, 0, 2 * MIB, &ram, MIB, MIB).unwrap();
        for p in 0..(4 * MIB / PAGE) {
            let _ = mem.write_obj(0, p * PAGE, 0xffff_u64 + p);
        }
        // Balloon: discard [0.5 MiB, 2.5 MiB), crossing the hole.
        let done = mem.discard(0, MIB / 2, 2 * MIB).unwrap();
        assert_eq!(done, MIB, "the hole is skipped");
        let g = |a: u64| a / PAGE;
        assert_eq!(
            *mem.inner().0.lock().unwrap(),
            [(0, g(MIB / 2), g(MIB)), (1, g(2 * MIB), g(2 * MIB + MIB / 2))],
            "every layer is told, per slot, which gfns lost their host pages"
        );
        assert_eq!(mem.read_obj::<u64>(0, MIB / 2 - PAGE).unwrap(), 0xffff + (MIB / 2 - PAGE) / PAGE);
        assert_eq!(mem.read_obj::<u64>(0, MIB / 2).unwrap(), 0, "discarded: reads zero");
        assert_eq!(mem.read_obj::<u64>(0, 2 * MIB).unwrap(), 0);
        assert_eq!(mem.read_obj::<u64>(0, 2 * MIB + MIB / 2 - PAGE).unwrap(), 0);
        assert_ne!(mem.read_obj::<u64>(0, 2 * MIB + MIB / 2).unwrap(), 0, "past the range: kept");
        // The memory is still usable.
        mem.write_obj(0, MIB / 2, 7u64).unwrap();
        assert_eq!(mem.read_obj::<u64>(0, MIB / 2).unwrap(), 7);
        assert!(mem.discard(0, 1, PAGE).is_err(), "unaligned");
    }
}

#[test]
fn a_vcpu_handle_moves_into_a_thread() {
    let mem = GuestMemory::new(Config::default().with_address_spaces(1)).unwrap();
    let ram = mem.map_anonymous(MIB, &MapOptions::new()).unwrap();
    mem.set_region(0, 0, 0, &ram, 0, MIB).unwrap();
    let vcpu = mem.vcpu();
    let t = std::thread::spawn(move || {
        vcpu.write_obj(0x100, 42u32).unwrap();
        vcpu.read_obj::<u32>(0x100).unwrap()
    });
    drop(mem); // the vCPU keeps the VM alive
    assert_eq!(t.join().unwrap(), 42);
    assert_eq!(ram.addr() % PAGE, 0);
}

#[test]
fn discard_leaves_a_callers_file_and_rom_alone_and_checks_the_address_space() {
    use std::io::Write;
    let mem = GuestMemory::new(Config::default().with_address_spaces(1)).unwrap();
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&[0xab; 2 * 4096]).unwrap();
    let opts = MapOptions::new().sharing(memslots_mem::Sharing::Shared);
    // SAFETY: nothing truncates the file while the mapping lives, and it is
    // fully written (not sparse). A tempfile cannot be sealed.
    let file = unsafe { mem.map_file_unsealed(f, 0, 2 * PAGE, &opts) }.unwrap();
    mem.set_region(0, 0, 0, &file, 0, PAGE).unwrap();
    mem.set_region(1, memslots::KVM_MEM_READONLY, PAGE, &file, PAGE, PAGE).unwrap();
    assert_eq!(mem.discard(0, 0, 2 * PAGE).unwrap(), PAGE, "the ROM slot is skipped");
    assert_eq!(mem.read_obj::<u8>(0, 0).unwrap(), 0xab, "a caller's file keeps its data (no hole punched)");
    assert_eq!(mem.read_obj::<u8>(0, PAGE).unwrap(), 0xab);
    assert!(mem.discard(3, 0, 1 << 52).is_err(), "no such address space: refused at once");
}
