//! The vm-memory 0.18 interface: snapshots, regions, Bytes, dirty logging
//! through vm-memory writes, and a real virtio-queue descriptor chain.

// Tests run on 64-bit Linux: guest sizes fit in usize.
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::sync::Arc;

use memslots::{Config, UserMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use memslots_mem::vm_memory::bitmap::Bitmap;
use memslots_mem::vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};
use memslots_mem::{GuestMemory, MapOptions, SnapshotGuard};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};

const PG: u64 = 4096;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

fn dirty_pages(mem: &GuestMemory, slot: u32) -> Vec<u64> {
    let words = mem.vm().get_dirty_log_vec(slot).unwrap();
    (0..words.len() as u64 * 64).filter(|&p| words[(p / 64) as usize] & (1 << (p % 64)) != 0).collect()
}

/// A rust-vmm style consumer, generic over any vm-memory backend.
fn sum_bytes<M: GuestMemoryBackend>(m: &M, addr: GuestAddress, len: usize) -> u64 {
    let mut buf = vec![0u8; len];
    m.read_slice(&mut buf, addr).unwrap();
    buf.iter().map(|&b| u64::from(b)).sum()
}

#[test]
fn snapshot_regions_and_bytes() {
    let mem = GuestMemory::new(Config::default()).unwrap();
    let a = mem.map_anonymous(4 * PG, &MapOptions::new()).unwrap();
    let b = mem.map_memfd("b", 4 * PG, &MapOptions::new()).unwrap();
    mem.set_region(0, 0, 0, &a, PG, 2 * PG).unwrap();
    mem.set_region(1, KVM_MEM_READONLY, 2 * PG, &b, 2 * PG, 2 * PG).unwrap();
    // An unbacked slot and a slot in the other address space are not in as 0's snapshot.
    mem.vm().set_user_memory_region(&UserMemoryRegion::new(2, 0, 0x10_0000, PG, 0x50_0000_0000)).unwrap();
    mem.set_region(1 << 16, 0, 0x20_0000, &a, 0, PG).unwrap();

    let snap = mem.snapshot(0);
    assert_eq!(snap.num_regions(), 2);
    let starts: Vec<u64> = snap.iter().map(|r| r.start_addr().raw_value()).collect();
    assert_eq!(starts, [0, 2 * PG]);
    assert_eq!(snap.last_addr(), GuestAddress(4 * PG - 1));
    assert!(snap.find_region(GuestAddress(0x10_0000)).is_none());
    assert!(snap.find_region(GuestAddress(4 * PG)).is_none());
    let r1 = snap.find_region(GuestAddress(3 * PG + 5)).unwrap();
    assert!(r1.is_readonly());
    assert_eq!(r1.len(), 2 * PG);
    assert_eq!(r1.get_host_address(MemoryRegionAddress(5)).unwrap() as u64, b.addr() + 2 * PG + 5);
    assert!(r1.get_host_address(MemoryRegionAddress(2 * PG)).is_err());
    // A memfd-backed region tells where in the file it lives (vhost-user needs that).
    let fo = r1.file_offset().unwrap();
    assert_eq!(fo.start(), 2 * PG);
    assert_eq!(r1.is_hugetlbfs(), Some(false));
    assert!(snap.find_region(GuestAddress(0)).unwrap().file_offset().is_none());
    assert_eq!(mem.snapshot(1).num_regions(), 1);

    // Bytes across two regions backed by different mappings.
    let data: Vec<u8> = (0..200u8).collect();
    snap.write_slice(&data, GuestAddress(2 * PG - 100)).unwrap();
    let mut back = vec![0u8; 200];
    mem.read(0, 2 * PG - 100, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(sum_bytes(&*snap, GuestAddress(2 * PG - 100), 200), (0..200u64).sum::<u64>());
    // Objects and atomics through vm-memory.
    snap.write_obj(0xabcd_u16, GuestAddress(0x10)).unwrap();
    assert_eq!(mem.read_obj::<u16>(0, 0x10).unwrap(), 0xabcd);
    snap.store(7u32, GuestAddress(0x20), std::sync::atomic::Ordering::SeqCst).unwrap();
    assert_eq!(snap.load::<u32>(GuestAddress(0x20), std::sync::atomic::Ordering::SeqCst).unwrap(), 7);
    // A hole ends an access.
    assert!(snap.read_slice(&mut [0u8; 16], GuestAddress(4 * PG - 8)).is_err());
    assert_eq!(snap.read(&mut [0u8; 16], GuestAddress(4 * PG - 8)).unwrap(), 8);
    assert!(snap.get_slice(GuestAddress(2 * PG - 8), 16).is_err(), "a slice cannot cross regions");
    assert!(!snap.check_range(GuestAddress(3 * PG), 2 * PG as usize));
    assert!(snap.check_range(GuestAddress(0), 4 * PG as usize));
}

#[test]
fn snapshots_are_snapshots_and_keep_mappings_alive() {
    let mem = GuestMemory::new(Config::default()).unwrap();
    let a = mem.map_anonymous(2 * PG, &MapOptions::new()).unwrap();
    a.fill(0, a.len(), 0x61).unwrap();
    mem.set_region(0, 0, 0, &a, 0, 2 * PG).unwrap();
    let weak = Arc::downgrade(&a);
    mem.unregister(&a);
    drop(a);

    let space = mem.address_space(0);
    let s1 = space.memory();
    let s2 = space.memory();
    assert!(SnapshotGuard::ptr_eq(&s1, &s2), "unchanged memslots: the same snapshot");
    // memory() while nothing changed borrows the cached snapshot (an
    // arc-swap guard): no reference count per call, as GuestMemoryAtomic.
    let count = Arc::strong_count(&s1.to_arc());
    let more: Vec<_> = (0..3).map(|_| space.memory()).collect();
    assert_eq!(Arc::strong_count(&s1.to_arc()), count, "memory() took a reference count");
    let owned = s1.clone();
    assert_eq!(Arc::strong_count(&s1.to_arc()), count + 1, "a clone is reference counted");
    drop((more, owned));
    // Delete the slot: the snapshot does not see it, and keeps the mapping mapped.
    mem.delete_region(0).unwrap();
    assert!(weak.upgrade().is_some());
    assert_eq!(s1.read_obj::<u8>(GuestAddress(PG)).unwrap(), 0x61);
    let s3 = space.memory();
    assert!(!SnapshotGuard::ptr_eq(&s1, &s3), "a fresh snapshot after a change");
    assert_eq!(s3.num_regions(), 0);
    assert!(s3.read_obj::<u8>(GuestAddress(PG)).is_err());
    drop((s1, s2, space));
    assert!(weak.upgrade().is_none(), "the last snapshot gone, the mapping goes");
}

#[test]
fn vm_memory_writes_reach_the_dirty_log() {
    let mem = GuestMemory::new(Config::default()).unwrap();
    let a = mem.map_anonymous(8 * PG, &MapOptions::new()).unwrap();
    mem.set_region(4, KVM_MEM_LOG_DIRTY_PAGES, 0x10_0000, &a, 0, 8 * PG).unwrap();
    let snap = mem.snapshot(0);
    snap.write_slice(&[1; 10], GuestAddress(0x10_0000 + 2 * PG - 5)).unwrap(); // pages 1, 2
    snap.write_obj(5u32, GuestAddress(0x10_0000 + 6 * PG)).unwrap(); // page 6
    let region = snap.find_region(GuestAddress(0x10_0000)).unwrap();
    assert!(region.bitmap().dirty_at(6 * PG as usize));
    assert!(!region.bitmap().dirty_at(5 * PG as usize));
    assert_eq!(dirty_pages(&mem, 4), [1, 2, 6]);
    // Moved since the snapshot: same slot, same pages.
    mem.set_region(4, KVM_MEM_LOG_DIRTY_PAGES, 0x30_0000, &a, 0, 8 * PG).unwrap();
    snap.write_obj(5u8, GuestAddress(0x10_0000 + 3 * PG)).unwrap();
    assert_eq!(dirty_pages(&mem, 4), [3]);
    // Logging off, or slot deleted: nothing marked, nothing breaks.
    mem.set_region(4, 0, 0x30_0000, &a, 0, 8 * PG).unwrap();
    snap.write_obj(5u8, GuestAddress(0x10_0000)).unwrap();
    mem.delete_region(4).unwrap();
    snap.write_obj(5u8, GuestAddress(0x10_0000)).unwrap();
    assert!(!region.bitmap().dirty_at(0));
}

/// A real virtio split queue in memslots guest memory: the driver side
/// (virtio-queue's mock) and the device side (virtio-queue's Queue, Reader,
/// Writer) both run on memslots through the vm-memory traits.
#[test]
fn virtio_queue_descriptor_chain_over_memslots() {
    let mem = GuestMemory::new(Config::default()).unwrap();
    let ring = mem.map_memfd("vring", 16 * PG, &MapOptions::new()).unwrap();
    let buf_lo = mem.map_anonymous(2 * PG, &MapOptions::new()).unwrap();
    let buf_hi = mem.map_memfd("buf-hi", 2 * PG, &MapOptions::new()).unwrap();
    let out = mem.map_anonymous(PG, &MapOptions::new()).unwrap();
    mem.set_region(0, 0, 0, &ring, 0, 16 * PG).unwrap();
    // The request buffer spans two slots backed by different mappings.
    mem.set_region(1, 0, 0x10_0000, &buf_lo, 0, 2 * PG).unwrap();
    mem.set_region(2, 0, 0x10_2000, &buf_hi, 0, 2 * PG).unwrap();
    mem.set_region(3, KVM_MEM_LOG_DIRTY_PAGES, 0x20_0000, &out, 0, PG).unwrap();

    // The "guest" writes the request with the memslots API.
    let request: Vec<u8> = (0..0x1000u32).map(|i| (i * 13 % 256) as u8).collect();
    mem.write(0, 0x10_1800, &request).unwrap();

    let space = mem.address_space(0);
    let m = space.memory();
    // Driver side: descriptor table, avail ring.
    let vq = MockSplitQueue::new(&*m, 16);
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(0x10_1800, 0x1000, VRING_DESC_F_NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(0x20_0000, 0x100, VRING_DESC_F_WRITE, 0)),
    ];
    vq.add_desc_chains(&descs, 0).unwrap();

    // Device side: an unmodified rust-vmm consumer.
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(q.is_valid(&*m));
    let chain = q.pop_descriptor_chain(space.memory()).expect("a chain");
    let head = chain.head_index();
    let mut reader = chain.clone().reader(&*m).unwrap();
    assert_eq!(reader.available_bytes(), 0x1000);
    let mut got = vec![0u8; 0x1000];
    reader.read_exact(&mut got).unwrap();
    assert_eq!(got, request, "the device sees the bytes the guest wrote");
    let mut writer = chain.writer(&*m).unwrap();
    assert_eq!(writer.available_bytes(), 0x100);
    writer.write_all(b"response from the device").unwrap();
    q.add_used(&*m, head, 24).unwrap();
    assert!(q.pop_descriptor_chain(space.memory()).is_none());

    // The guest sees the response and the used ring entry.
    let mut resp = [0u8; 24];
    mem.read(0, 0x20_0000, &mut resp).unwrap();
    assert_eq!(&resp, b"response from the device");
    let used = vq.used_addr().raw_value();
    assert_eq!(mem.read_obj::<u16>(0, used + 2).unwrap(), 1, "used idx");
    assert_eq!(mem.read_obj::<u32>(0, used + 4).unwrap(), u32::from(head), "used elem id");
    assert_eq!(mem.read_obj::<u32>(0, used + 8).unwrap(), 24, "used elem len");
    // The device's write is in the memslots dirty log of the output slot.
    assert_eq!(dirty_pages(&mem, 3), [0]);
}

#[test]
fn memory_follows_every_kind_of_update() {
    // `memory()` returns its cached snapshot without comparing generations:
    // every publish must clear the cache, or one of these would see the
    // state before the change.
    let mem = GuestMemory::new(Config::default()).unwrap();
    let a = mem.map_anonymous(4 * PG, &MapOptions::new()).unwrap();
    let space = mem.address_space(0);
    assert_eq!(space.memory().num_regions(), 0);
    mem.set_region(0, 0, 0, &a, 0, 2 * PG).unwrap();
    let s = space.memory();
    assert_eq!(s.num_regions(), 1);
    assert!(SnapshotGuard::ptr_eq(&s, &space.memory()), "unchanged: the cached snapshot");
    // Create.
    mem.set_region(1, 0, 0x10_0000, &a, 2 * PG, 2 * PG).unwrap();
    assert_eq!(space.memory().num_regions(), 2);
    // Move.
    mem.set_region(1, 0, 0x20_0000, &a, 2 * PG, 2 * PG).unwrap();
    let m = space.memory();
    assert!(m.find_region(GuestAddress(0x10_0000)).is_none());
    assert!(m.find_region(GuestAddress(0x20_0000)).is_some());
    // Flags only (dirty logging on).
    assert_eq!(m.find_region(GuestAddress(0x20_0000)).unwrap().desc().flags, 0);
    mem.set_region(1, KVM_MEM_LOG_DIRTY_PAGES, 0x20_0000, &a, 2 * PG, 2 * PG).unwrap();
    let f = space.memory();
    assert_eq!(f.find_region(GuestAddress(0x20_0000)).unwrap().desc().flags, KVM_MEM_LOG_DIRTY_PAGES);
    // Delete.
    mem.delete_region(1).unwrap();
    assert_eq!(space.memory().num_regions(), 1);
    // Unchanged again: the cached snapshot.
    let s = space.memory();
    assert!(SnapshotGuard::ptr_eq(&s, &space.memory()));
}

#[test]
fn memory_never_returns_a_snapshot_older_than_a_finished_update() {
    // A writer moves one slot to ever higher addresses and publishes the
    // step after each move returns; a reader that saw step `i` must never
    // get a snapshot showing the slot below step `i` (a stale cached
    // snapshot), only at `i` or later, or not at all (mid-move, INVALID).
    use std::sync::atomic::{AtomicU64, Ordering};
    const STEPS: u64 = 2000;
    let mem = GuestMemory::new(Config::default()).unwrap();
    let a = mem.map_anonymous(PG, &MapOptions::new()).unwrap();
    mem.set_region(0, 0, 0, &a, 0, PG).unwrap();
    let space = mem.address_space(0);
    let done = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 1..=STEPS {
                mem.set_region(0, 0, i * PG, &a, 0, PG).unwrap();
                done.store(i, Ordering::Release);
            }
        });
        let mut checks = 0u64;
        loop {
            let seen = done.load(Ordering::Acquire);
            let m = space.memory();
            if let Some(r) = m.iter().next() {
                let at = r.start_addr().raw_value() / PG;
                assert!(at >= seen, "memory() showed step {at} after step {seen} had returned");
            }
            checks += 1;
            if seen == STEPS {
                break;
            }
        }
        assert!(checks > 0);
    });
}
