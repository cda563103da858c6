//! Guest memory access by guest address: slot boundaries, holes, READONLY,
//! address spaces, dirty marking, atomics, objects, unbacked slots, volatile
//! slices, mapping lifetime, and a differential test against a byte model.

// Tests run on 64-bit Linux: guest sizes fit in usize.
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use memslots::{Config, UserMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use memslots_mem::vm_memory::{ByteValued, Bytes};
use memslots_mem::{Access, AccessError, AccessErrorKind, GuestMemory, HostMemory, MapOptions};

const PG: u64 = 4096;

fn gm() -> GuestMemory {
    GuestMemory::new(Config::default()).unwrap()
}

fn anon(mem: &GuestMemory, size: u64, fill: u8) -> Arc<HostMemory> {
    let m = mem.map_anonymous(size, &MapOptions::new()).unwrap();
    m.fill(0, m.len(), fill).unwrap();
    m
}

fn err(done: usize, gpa: u64, kind: AccessErrorKind) -> AccessError {
    AccessError { done, gpa, kind }
}

#[test]
fn read_write_across_slot_boundaries() {
    let mem = gm();
    let a = anon(&mem, 2 * PG, 0);
    let b = anon(&mem, 4 * PG, 0);
    // Slot 0: gpa [0, 2 pages) -> a; slot 1: gpa [2, 4 pages) -> b from page 1.
    mem.set_region(0, 0, 0, &a, 0, 2 * PG).unwrap();
    mem.set_region(1, 0, 2 * PG, &b, PG, 2 * PG).unwrap();

    let data: Vec<u8> = (0..3 * PG as usize).map(|i| (i * 7 % 251) as u8).collect();
    mem.write(0, 0x800, &data).unwrap();
    // Bytes land in the right mappings at the right offsets.
    let mut got = vec![0u8; 2 * PG as usize - 0x800];
    a.read_at(0x800, &mut got).unwrap();
    assert_eq!(got, data[..got.len()]);
    let mut got2 = vec![0u8; data.len() - got.len()];
    b.read_at(PG as usize, &mut got2).unwrap();
    assert_eq!(got2, data[got.len()..]);
    // Nothing before b's slot offset was touched.
    let mut before = vec![1u8; PG as usize];
    b.read_at(0, &mut before).unwrap();
    assert!(before.iter().all(|&x| x == 0));

    let mut back = vec![0u8; data.len()];
    mem.read(0, 0x800, &mut back).unwrap();
    assert_eq!(back, data);

    // Empty accesses succeed anywhere, even in holes.
    mem.read(0, 0xdead_0000, &mut []).unwrap();
    mem.write(0, 0xdead_0000, &[]).unwrap();
}

#[test]
fn holes_report_exact_progress() {
    let mem = gm();
    let a = anon(&mem, 4 * PG, 0x11);
    mem.set_region(0, 0, 0, &a, 0, 2 * PG).unwrap();
    mem.set_region(1, 0, 3 * PG, &a, 2 * PG, PG).unwrap();

    let mut buf = [0u8; 0x20];
    let e = mem.read(0, 2 * PG - 0x10, &mut buf).unwrap_err();
    assert_eq!(e, err(0x10, 2 * PG, AccessErrorKind::NoSlot));
    assert!(buf[..0x10].iter().all(|&x| x == 0x11), "the prefix was read");
    assert!(buf[0x10..].iter().all(|&x| x == 0), "nothing past the hole");

    let e = mem.write(0, 2 * PG - 4, &[9; 8]).unwrap_err();
    assert_eq!(e, err(4, 2 * PG, AccessErrorKind::NoSlot));
    // Starting in the hole: nothing done.
    let e = mem.read(0, 2 * PG + 5, &mut buf).unwrap_err();
    assert_eq!(e, err(0, 2 * PG + 5, AccessErrorKind::NoSlot));
    // Ending after the last slot.
    let e = mem.read(0, 4 * PG - 8, &mut buf).unwrap_err();
    assert_eq!(e, err(8, 4 * PG, AccessErrorKind::NoSlot));
    // Objects spanning into a hole.
    let e = mem.read_obj::<u64>(0, 2 * PG - 4).unwrap_err();
    assert_eq!(e, err(4, 2 * PG, AccessErrorKind::NoSlot));
    // Near the top of the guest physical address space: no overflow, no panic.
    let e = mem.read(0, u64::MAX - 3, &mut buf).unwrap_err();
    assert_eq!(e.kind, AccessErrorKind::NoSlot);
    assert_eq!(e.done, 0);
}

#[test]
fn readonly_slots_refuse_writes_distinctly() {
    let mem = gm();
    let a = anon(&mem, 2 * PG, 0x22);
    mem.set_region(0, 0, 0, &a, 0, PG).unwrap();
    mem.set_region(1, KVM_MEM_READONLY, PG, &a, PG, PG).unwrap();

    // Reads of a READONLY slot work.
    assert_eq!(mem.read_obj::<u32>(0, PG + 8).unwrap(), 0x2222_2222);
    // A write into it is a ReadOnly error (an MMIO exit for a vCPU), not NoSlot.
    assert_eq!(mem.write(0, PG + 8, &[1]).unwrap_err(), err(0, PG + 8, AccessErrorKind::ReadOnly));
    // Spanning RW -> RO: the RW part is written.
    assert_eq!(mem.write(0, PG - 3, &[7; 6]).unwrap_err(), err(3, PG, AccessErrorKind::ReadOnly));
    assert_eq!(mem.read_obj::<[u8; 6]>(0, PG - 3).unwrap(), [7, 7, 7, 0x22, 0x22, 0x22]);
    assert_eq!(mem.write_obj(0, PG, 5u64).unwrap_err().kind, AccessErrorKind::ReadOnly);
    assert_eq!(mem.store(0, PG, 5u64, Ordering::SeqCst).unwrap_err().kind, AccessErrorKind::ReadOnly);
    let r = mem.compare_exchange(0, PG, 0x2222_2222u32, 1, Ordering::SeqCst, Ordering::SeqCst);
    assert_eq!(r.unwrap_err().kind, AccessErrorKind::ReadOnly);
    assert_eq!(mem.load::<u32>(0, PG, Ordering::SeqCst).unwrap(), 0x2222_2222);
    // Through a vCPU, the same.
    let vcpu = mem.vcpu();
    assert_eq!(vcpu.write(PG, &[1]).unwrap_err().kind, AccessErrorKind::ReadOnly);
    // A write slice is refused, a read slice given.
    let g = mem.section();
    assert_eq!(g.slice(0, PG, 16, Access::Write).unwrap_err().kind, AccessErrorKind::ReadOnly);
    let s = g.slice(0, PG, 16, Access::Read).unwrap();
    assert_eq!(s.read_obj::<u8>(0).unwrap(), 0x22);
}

#[test]
fn both_address_spaces() {
    let mem = gm();
    let ram = anon(&mem, PG, 0xaa);
    let smram = anon(&mem, PG, 0x55);
    mem.set_region(0, 0, 0x3000, &ram, 0, PG).unwrap();
    mem.set_region(1 << 16, 0, 0x3000, &smram, 0, PG).unwrap();

    assert_eq!(mem.read_obj::<u8>(0, 0x3000).unwrap(), 0xaa);
    assert_eq!(mem.read_obj::<u8>(1, 0x3000).unwrap(), 0x55);
    assert_eq!(mem.read_obj::<u8>(2, 0x3000).unwrap_err().kind, AccessErrorKind::NoAddressSpace);

    mem.write_obj(1, 0x3010, 0x1234u16).unwrap();
    assert_eq!(mem.read_obj::<u16>(0, 0x3010).unwrap(), 0xaaaa);
    assert_eq!(mem.read_obj::<u16>(1, 0x3010).unwrap(), 0x1234);

    let mut vcpu = mem.vcpu();
    assert_eq!(vcpu.read_obj::<u8>(0x3000).unwrap(), 0xaa);
    vcpu.set_address_space(1).unwrap();
    assert_eq!(vcpu.read_obj::<u16>(0x3010).unwrap(), 0x1234);
    vcpu.write_obj(0x3020, 0x77u8).unwrap();
    assert_eq!(smram.read_at(0x20, &mut [0u8; 1]).map(|_| ()), Some(()));
    assert_eq!(mem.read_obj::<u8>(1, 0x3020).unwrap(), 0x77);
    assert_eq!(mem.read_obj::<u8>(0, 0x3020).unwrap(), 0xaa);
}

/// The dirty log of `slot` as a list of page numbers.
fn dirty_pages(mem: &GuestMemory, slot: u32) -> Vec<u64> {
    let words = mem.vm().get_dirty_log_vec(slot).unwrap();
    let mut v = Vec::new();
    for (w, &bits) in words.iter().enumerate() {
        for b in 0..64 {
            if bits & (1 << b) != 0 {
                v.push(w as u64 * 64 + b);
            }
        }
    }
    v
}

#[test]
fn writes_mark_exactly_the_written_pages() {
    let mem = gm();
    let a = anon(&mem, 32 * PG, 0);
    mem.set_region(3, KVM_MEM_LOG_DIRTY_PAGES, 0x10_0000, &a, 0, 32 * PG).unwrap();
    let base = 0x10_0000;
    assert_eq!(dirty_pages(&mem, 3), Vec::<u64>::new());

    mem.write(0, base + PG + 100, &[1; 10]).unwrap(); // page 1
    mem.write(0, base + 3 * PG + 4000, &[1; 2 * PG as usize]).unwrap(); // pages 3, 4, 5
    mem.write_obj(0, base + 8 * PG - 2, 0xffff_ffffu32).unwrap(); // pages 7, 8
    mem.store(0, base + 9 * PG, 1u64, Ordering::Relaxed).unwrap(); // page 9
    let failed = mem.compare_exchange(0, base + 11 * PG, 5u32, 6, Ordering::SeqCst, Ordering::SeqCst).unwrap();
    assert_eq!(failed, Err(0)); // not exchanged: page 11 not dirty
    let ok = mem.compare_exchange(0, base + 12 * PG, 0u16, 6, Ordering::SeqCst, Ordering::SeqCst).unwrap();
    assert_eq!(ok, Ok(0)); // page 12
                           // Reads and loads dirty nothing.
    let _ = mem.read_obj::<u64>(0, base + 20 * PG).unwrap();
    let _ = mem.load::<u64>(0, base + 21 * PG, Ordering::Relaxed).unwrap();
    // A vCPU without dirty rings marks the bitmap too.
    mem.vcpu().write_obj(base + 14 * PG, 1u8).unwrap();
    // Writes through a write slice mark the pages they touch.
    {
        let g = mem.section();
        let s = g.slice(0, base + 16 * PG, 3 * PG as usize, Access::Write).unwrap();
        s.write_obj(0xabu8, PG as usize + 5).unwrap(); // page 17
        let r = g.slice(0, base + 24 * PG, 16, Access::Read).unwrap();
        r.write_obj(0xabu8, 0).unwrap(); // a read slice does not track: page 24 not marked
    }
    assert_eq!(dirty_pages(&mem, 3), vec![1, 3, 4, 5, 7, 8, 9, 12, 14, 17]);
    // Taken and cleared.
    assert_eq!(dirty_pages(&mem, 3), Vec::<u64>::new());
    // A partial write marks what it wrote.
    let e = mem.write(0, base + 32 * PG - 5, &[1; 10]).unwrap_err();
    assert_eq!(e, err(5, base + 32 * PG, AccessErrorKind::NoSlot));
    assert_eq!(dirty_pages(&mem, 3), vec![31]);
}

#[test]
fn vcpu_writes_go_to_its_dirty_ring() {
    let mem = gm();
    // 4096 bytes = 256 entries, 64 reserved: soft-full at 192.
    mem.vm().enable_dirty_log_ring(4096).unwrap();
    let a = anon(&mem, 512 * PG, 0);
    mem.set_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, &a, 0, 512 * PG).unwrap();
    let vcpu = mem.vcpu();
    vcpu.write(3 * PG + 10, &[1; 2]).unwrap();
    vcpu.write(5 * PG - 1, &[1; 2]).unwrap(); // pages 4 and 5
    let mut got = Vec::new();
    mem.vm().harvest_dirty_rings(|id, e| got.push((id, e.slot, e.offset)));
    assert_eq!(got, vec![(0, 0, 3), (0, 0, 4), (0, 0, 5)]);
    assert!(!vcpu.take_dirty_ring_full());
    // Fill the ring past its soft limit in one write: the vCPU must exit.
    vcpu.write(10 * PG, &vec![1; 200 * PG as usize]).unwrap();
    assert!(vcpu.take_dirty_ring_full());
    assert!(!vcpu.take_dirty_ring_full());
    assert_eq!(vcpu.lost_dirty_marks(), 0);
    // Past the hard limit marks are lost (and counted).
    vcpu.write(300 * PG, &vec![1; 100 * PG as usize]).unwrap();
    assert!(vcpu.take_dirty_ring_full());
    assert!(vcpu.lost_dirty_marks() > 0);
}

#[test]
fn atomics() {
    let mem = gm();
    let a = anon(&mem, 2 * PG, 0);
    mem.set_region(0, 0, 0x8000, &a, 0, 2 * PG).unwrap();
    let g = mem.section();
    g.store(0, 0x8000, 0x1122_3344_5566_7788u64, Ordering::SeqCst).unwrap();
    assert_eq!(g.load::<u64>(0, 0x8000, Ordering::SeqCst).unwrap(), 0x1122_3344_5566_7788);
    assert_eq!(g.load::<u32>(0, 0x8004, Ordering::Acquire).unwrap(), 0x1122_3344);
    assert_eq!(g.load::<u16>(0, 0x8002, Ordering::Relaxed).unwrap(), 0x5566);
    assert_eq!(g.load::<u8>(0, 0x8007, Ordering::Relaxed).unwrap(), 0x11);
    g.store(0, 0x8001, 0xffu8, Ordering::Release).unwrap();
    assert_eq!(g.read_obj::<u64>(0, 0x8000).unwrap(), 0x1122_3344_5566_ff88);
    assert_eq!(
        g.compare_exchange(0, 0x8000, 1u64, 2, Ordering::SeqCst, Ordering::SeqCst).unwrap(),
        Err(0x1122_3344_5566_ff88)
    );
    assert_eq!(
        g.compare_exchange(0, 0x8000, 0x1122_3344_5566_ff88u64, 2, Ordering::SeqCst, Ordering::SeqCst).unwrap(),
        Ok(0x1122_3344_5566_ff88)
    );
    assert_eq!(g.load::<u64>(0, 0x8000, Ordering::SeqCst).unwrap(), 2);
    // Misaligned: refused, even if inside one page.
    for (gpa, size) in [(0x8001u64, 2), (0x8002, 4), (0x8004, 8), (0x8ffc, 8)] {
        let e = match size {
            2 => g.load::<u16>(0, gpa, Ordering::SeqCst).unwrap_err(),
            4 => g.store(0, gpa, 1u32, Ordering::SeqCst).unwrap_err(),
            _ => g.compare_exchange(0, gpa, 0u64, 1, Ordering::SeqCst, Ordering::SeqCst).unwrap_err(),
        };
        assert_eq!(e, err(0, gpa, AccessErrorKind::Misaligned), "gpa {gpa:#x} size {size}");
    }
    // Aligned, but in a hole.
    assert_eq!(g.load::<u64>(0, 0x7ff8, Ordering::SeqCst).unwrap_err(), err(0, 0x7ff8, AccessErrorKind::NoSlot));
    drop(g);
    // Through a vCPU.
    let vcpu = mem.vcpu();
    vcpu.store(0x9ff8, 42u64, Ordering::SeqCst).unwrap();
    assert_eq!(vcpu.load::<u64>(0x9ff8, Ordering::SeqCst).unwrap(), 42);
    assert_eq!(vcpu.compare_exchange(0x9ff8, 42u64, 43, Ordering::SeqCst, Ordering::SeqCst).unwrap(), Ok(42));
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Header {
    magic: u32,
    flags: u16,
    len: u16,
    addr: u64,
}

// SAFETY: plain integers, no padding (4 + 2 + 2 + 8 bytes, 8-aligned).
unsafe impl ByteValued for Header {}

#[test]
fn objects_anywhere_even_across_slots() {
    let mem = gm();
    let a = anon(&mem, PG, 0);
    let b = anon(&mem, PG, 0);
    mem.set_region(0, 0, 0, &a, 0, PG).unwrap();
    mem.set_region(1, 0, PG, &b, 0, PG).unwrap();
    let h = Header { magic: 0xfeed_f00d, flags: 3, len: 77, addr: 0x0123_4567_89ab_cdef };
    for gpa in [0, 0x10, 0x7, PG - 16, PG - 7, PG - 1, 2 * PG - 16] {
        mem.write_obj(0, gpa, h).unwrap();
        assert_eq!(mem.read_obj::<Header>(0, gpa).unwrap(), h, "gpa {gpa:#x}");
    }
    // Spanning two mappings: the bytes are split between them.
    mem.write_obj(0, PG - 4, 0x1122_3344_5566_7788u64).unwrap();
    let mut lo = [0u8; 4];
    a.read_at(PG as usize - 4, &mut lo).unwrap();
    let mut hi = [0u8; 4];
    b.read_at(0, &mut hi).unwrap();
    assert_eq!(u32::from_le_bytes(lo), 0x5566_7788);
    assert_eq!(u32::from_le_bytes(hi), 0x1122_3344);
    // Past the end.
    assert_eq!(mem.read_obj::<Header>(0, 2 * PG - 8).unwrap_err(), err(8, 2 * PG, AccessErrorKind::NoSlot));
    assert_eq!(mem.write_obj(0, 2 * PG - 8, h).unwrap_err(), err(8, 2 * PG, AccessErrorKind::NoSlot));
}

#[test]
fn unbacked_slots_fail_cleanly() {
    let mem = gm();
    let a = anon(&mem, 4 * PG, 0x33);
    // A slot whose host range is not inside any registered mapping: KVM
    // accepts it; accesses fail without touching memory.
    mem.vm().set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 2 * PG, 0x10_0000_0000)).unwrap();
    assert_eq!(mem.slot_backing(0).map(|b| b.is_none()), Some(true));
    let mut buf = [0u8; 8];
    assert_eq!(mem.read(0, 0x10, &mut buf).unwrap_err(), err(0, 0x10, AccessErrorKind::Unbacked));
    assert_eq!(mem.write(0, 0x10, &buf).unwrap_err(), err(0, 0x10, AccessErrorKind::Unbacked));
    assert_eq!(mem.load::<u32>(0, 0x10, Ordering::SeqCst).unwrap_err().kind, AccessErrorKind::Unbacked);
    assert_eq!(mem.section().slice(0, 0, 8, Access::Read).unwrap_err().kind, AccessErrorKind::Unbacked);
    // A slot overhanging the end of a registered mapping is unbacked too.
    let overhang = UserMemoryRegion::new(1, 0, 0x10_0000, 8 * PG, a.addr());
    mem.vm().set_user_memory_region(&overhang).unwrap();
    assert_eq!(mem.read_obj::<u8>(0, 0x10_0000).unwrap_err().kind, AccessErrorKind::Unbacked);
    // A backed slot before an unbacked one: progress stops at the unbacked one.
    mem.set_region(2, 0, 2 * PG, &a, 0, PG).unwrap();
    let mut big = [0u8; 16];
    assert_eq!(mem.read(0, 2 * PG - 8, &mut big).unwrap_err(), err(0, 2 * PG - 8, AccessErrorKind::Unbacked));
    assert_eq!(mem.read(0, 3 * PG - 8, &mut big).unwrap_err(), err(8, 3 * PG, AccessErrorKind::NoSlot));

    // set_region refuses ranges outside the mapping and unregistered mappings.
    assert!(mem.set_region(5, 0, 0x20_0000, &a, 2 * PG, 4 * PG).is_err());
    let stranger = Arc::new(HostMemory::anonymous(PG, &MapOptions::new()).unwrap());
    let e = mem.set_region(5, 0, 0x20_0000, &stranger, 0, PG).unwrap_err();
    assert!(matches!(e, memslots_mem::Error::NotRegistered { .. }), "{e}");
    // set_region passes KVM's errors through (overlap: EEXIST).
    let e = mem.set_region(5, 0, 2 * PG, &a, 0, PG).unwrap_err();
    assert_eq!(e.errno(), memslots::Errno::EEXIST);
}

#[test]
fn mappings_live_while_slots_use_them() {
    let mem = gm();
    let a = anon(&mem, 2 * PG, 0x44);
    let weak = Arc::downgrade(&a);
    mem.set_region(0, 0, 0, &a, 0, 2 * PG).unwrap();
    // Unregistering does not unmap: the slot holds the mapping.
    assert!(mem.unregister(&a));
    assert!(!mem.unregister(&a));
    drop(a);
    assert!(weak.upgrade().is_some());
    assert_eq!(mem.read_obj::<u8>(0, 5).unwrap(), 0x44);
    // MOVE and FLAGS_ONLY keep the backing although it is unregistered.
    let ram = weak.upgrade().unwrap();
    let hva = ram.addr();
    drop(ram);
    mem.vm().set_user_memory_region(&UserMemoryRegion::new(0, 0, 0x10_0000, 2 * PG, hva)).unwrap();
    assert_eq!(mem.read_obj::<u8>(0, 0x10_0005).unwrap(), 0x44);
    mem.vm()
        .set_user_memory_region(&UserMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 0x10_0000, 2 * PG, hva))
        .unwrap();
    mem.write_obj(0, 0x10_0000, 0x45u8).unwrap();
    assert_eq!(mem.read_obj::<u8>(0, 0x10_0000).unwrap(), 0x45);
    // A new slot at the same host range is unbacked: the mapping is no longer registered.
    mem.vm().set_user_memory_region(&UserMemoryRegion::new(1, 0, 0x20_0000, PG, hva)).unwrap();
    assert_eq!(mem.read_obj::<u8>(0, 0x20_0000).unwrap_err().kind, AccessErrorKind::Unbacked);
    assert!(weak.upgrade().is_some());
    // Deleting the last slot that uses it unmaps it (after the grace period,
    // which the delete waits for).
    mem.delete_region(0).unwrap();
    assert!(weak.upgrade().is_none());
    // Dropping the GuestMemory drops every mapping.
    let b = anon(&mem, PG, 0);
    mem.set_region(2, 0, 0, &b, 0, PG).unwrap();
    let wb = Arc::downgrade(&b);
    drop(b);
    drop(mem);
    assert!(wb.upgrade().is_none());
}

#[test]
fn volatile_slices() {
    let mem = gm();
    let a = anon(&mem, 2 * PG, 0);
    let b = anon(&mem, PG, 0);
    mem.set_region(0, 0, 0, &a, 0, 2 * PG).unwrap();
    mem.set_region(1, 0, 2 * PG, &b, 0, PG).unwrap();
    let g = mem.section();
    let s = g.slice(0, 0x100, 0x200, Access::Write).unwrap();
    assert_eq!(s.len(), 0x200);
    s.write_slice(&[9u8; 0x10], 0x10).unwrap();
    assert!(s.write_slice(&[9u8; 0x10], 0x1f8).is_err(), "slices are bounded");
    assert_eq!(g.read_obj::<[u8; 4]>(0, 0x10e).unwrap(), [0, 0, 9, 9]);
    // The slice must lie in one slot.
    let e = g.slice(0, 2 * PG - 8, 16, Access::Read).unwrap_err();
    assert_eq!(e, err(0, 2 * PG, AccessErrorKind::CrossesSlot));
    assert!(g.slice(0, 2 * PG - 8, 8, Access::Read).is_ok());
    assert_eq!(g.slice(0, 3 * PG, 1, Access::Read).unwrap_err().kind, AccessErrorKind::NoSlot);
    // Zero-length slices are fine inside a slot.
    assert_eq!(g.slice(0, 0, 0, Access::Read).unwrap().len(), 0);
    drop(g);
    // Through a vCPU.
    let vcpu = mem.vcpu();
    let vg = vcpu.section();
    let s = vg.slice(2 * PG, PG as usize, Access::Write).unwrap();
    s.write_obj(0x5au8, 7).unwrap();
    drop(vg);
    assert_eq!(mem.read_obj::<u8>(0, 2 * PG + 7).unwrap(), 0x5a);
}

/// A tiny deterministic PRNG (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Differential test: random layouts (backed, unbacked, READONLY slots and
/// holes) and random accesses, against a byte-array model of guest memory.
#[test]
fn differential_against_a_model() {
    const PAGES: u64 = 64;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..20 {
        let mem = gm();
        let host = anon(&mem, PAGES * PG, 0);
        // kind per guest page: None = hole, Some((ro, backed))
        let mut kind: Vec<Option<(bool, bool)>> = vec![None; PAGES as usize];
        let mut page = 0u64;
        let mut id = 0u32;
        while page < PAGES {
            let len = 1 + rng.below(6).min(PAGES - page - 1);
            match rng.below(5) {
                0 => {} // hole
                k => {
                    let ro = k == 1;
                    let backed = k != 2;
                    let flags = if ro { KVM_MEM_READONLY } else { 0 };
                    if backed {
                        // Guest page p is host page p: the model is one array.
                        mem.set_region(id, flags, page * PG, &host, page * PG, len * PG).unwrap();
                    } else {
                        let hva = 0x40_0000_0000 + page * PG;
                        mem.vm()
                            .set_user_memory_region(&UserMemoryRegion::new(id, flags, page * PG, len * PG, hva))
                            .unwrap();
                    }
                    id += 1;
                    for p in page..page + len {
                        kind[p as usize] = Some((ro, backed));
                    }
                }
            }
            page += len;
        }
        let mut model = vec![0u8; (PAGES * PG) as usize];
        // Expected outcome of an access of `len` bytes at `gpa`.
        let expect = |gpa: u64, len: usize, write: bool| -> Result<(), AccessError> {
            for i in 0..len as u64 {
                let a = gpa + i;
                let k = if a < PAGES * PG { kind[(a / PG) as usize] } else { None };
                let fail = match k {
                    None => Some(AccessErrorKind::NoSlot),
                    Some((_, false)) => Some(AccessErrorKind::Unbacked),
                    Some((true, _)) if write => Some(AccessErrorKind::ReadOnly),
                    _ => None,
                };
                if let Some(kind) = fail {
                    return Err(err(i as usize, a, kind));
                }
            }
            Ok(())
        };
        for op in 0..400 {
            let gpa = rng.below((PAGES + 2) * PG);
            let len = match rng.below(4) {
                0 => rng.below(16) as usize,
                1 => rng.below(PG) as usize,
                _ => rng.below(4 * PG) as usize,
            };
            if rng.below(2) == 0 {
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                let r = mem.write(0, gpa, &data);
                let e = expect(gpa, len, true);
                assert_eq!(r, e, "round {round} op {op}: write {len:#x} at {gpa:#x}");
                let done = match e {
                    Ok(()) => len,
                    Err(e) => e.done,
                };
                if done > 0 {
                    model[gpa as usize..gpa as usize + done].copy_from_slice(&data[..done]);
                }
            } else {
                let mut buf = vec![0u8; len];
                let r = mem.read(0, gpa, &mut buf);
                let e = expect(gpa, len, false);
                assert_eq!(r, e, "round {round} op {op}: read {len:#x} at {gpa:#x}");
                let done = match e {
                    Ok(()) => len,
                    Err(e) => e.done,
                };
                if done > 0 {
                    assert_eq!(buf[..done], model[gpa as usize..gpa as usize + done], "round {round} op {op}");
                }
                assert!(buf[done..].iter().all(|&x| x == 0), "nothing written past the failure");
            }
        }
        // The host memory is exactly the model (no write strayed).
        let mut all = vec![0u8; model.len()];
        host.read_at(0, &mut all).unwrap();
        assert!(all == model, "round {round}: host memory differs from the model");
    }
}

#[test]
fn unbacked_slot_accounting() {
    let mem = gm();
    let a = anon(&mem, 4 * PG, 0x66);
    let hooks = mem.mem_hooks();
    let unbacked = |id: u32, gpa: u64| UserMemoryRegion::new(id, 0, gpa, PG, 0x20_0000_0000 + u64::from(id) * PG);
    mem.set_region(0, 0, 0, &a, 0, PG).unwrap();
    assert_eq!(hooks.unbacked_slots(), 0);
    mem.vm().set_user_memory_region(&unbacked(1, 0x10_0000)).unwrap();
    assert_eq!(hooks.unbacked_slots(), 1);
    // Reads of backed slots still work (checked path), unbacked ones fail.
    assert_eq!(mem.read_obj::<u32>(0, 0).unwrap(), 0x6666_6666);
    assert_eq!(mem.read_obj::<u32>(0, 0x10_0000).unwrap_err().kind, AccessErrorKind::Unbacked);
    assert_eq!(mem.load::<u32>(0, 0x10_0000, Ordering::SeqCst).unwrap_err().kind, AccessErrorKind::Unbacked);
    // Move and flags changes keep the count; a second one adds to it.
    mem.vm().set_user_memory_region(&UserMemoryRegion::new(1, 0, 0x20_0000, PG, 0x20_0000_1000)).unwrap();
    mem.vm()
        .set_user_memory_region(&UserMemoryRegion::new(1, KVM_MEM_LOG_DIRTY_PAGES, 0x20_0000, PG, 0x20_0000_1000))
        .unwrap();
    assert_eq!(hooks.unbacked_slots(), 1);
    mem.vm().set_user_memory_region(&unbacked(2, 0x30_0000)).unwrap();
    assert_eq!(hooks.unbacked_slots(), 2);
    // A request refused before or in prepare counts nothing.
    assert!(mem.vm().set_user_memory_region(&unbacked(3, 0x30_0000)).is_err()); // overlap
    let beyond = UserMemoryRegion::new(3, 0, 1 << 60, PG, 0x20_0000_3000);
    assert!(mem.vm().set_user_memory_region(&beyond).is_err()); // beyond the max gfn
    assert_eq!(hooks.unbacked_slots(), 2);
    // Deleting backed slots changes nothing; unbacked ones are uncounted.
    mem.delete_region(0).unwrap();
    assert_eq!(hooks.unbacked_slots(), 2);
    mem.delete_region(1).unwrap();
    assert_eq!(hooks.unbacked_slots(), 1);
    mem.delete_region(2).unwrap();
    assert_eq!(hooks.unbacked_slots(), 0);
    mem.set_region(0, 0, 0, &a, PG, PG).unwrap();
    assert_eq!(mem.read_obj::<u32>(0, 0).unwrap(), 0x6666_6666);
}
