//! Fuzzes guest memory access against a byte model: the input drives slot
//! creation, moves and deletion (backed, unbacked, READONLY) and accesses at
//! arbitrary guest addresses and lengths. Every access must return exactly
//! the model's result (bytes done, failing gpa, reason), read the model's
//! bytes, and never touch host memory outside what the model says.
//!
//! Run: `cd crates/memslots-mem/fuzz && cargo +nightly fuzz run access`.

#![no_main]

use std::sync::atomic::Ordering;

use libfuzzer_sys::fuzz_target;
use memslots::{Config, UserMemoryRegion, KVM_MEM_READONLY};
use memslots_mem::vm_memory::Bytes;
use memslots_mem::{Access, AccessError, AccessErrorKind, GuestMemory, MapOptions};

const PG: u64 = 4096;
const HOST_PAGES: u64 = 16;
const GUEST_PAGES: u64 = 48;
const IDS: usize = 6;

#[derive(Clone, Copy, Debug)]
struct SlotModel {
    gpage: u64,
    npages: u64,
    hpage: u64,
    ro: bool,
    backed: bool,
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.byte()?) | u16::from(self.byte()?) << 8)
    }
    fn gpa(&mut self) -> Option<u64> {
        Some(match self.byte()? % 8 {
            0 => {
                let mut v = 0u64;
                for _ in 0..8 {
                    v = v << 8 | u64::from(self.byte()?);
                }
                v
            }
            1 => u64::MAX - u64::from(self.u16()?),
            _ => (u64::from(self.byte()?) % (GUEST_PAGES + 2)) * PG + u64::from(self.u16()?) % PG,
        })
    }
    fn len(&mut self) -> Option<usize> {
        Some(match self.byte()? % 4 {
            0 => usize::from(self.byte()? % 17),
            1 => usize::from(self.u16()?) % (PG as usize + 1),
            _ => usize::from(self.u16()?) % (3 * PG as usize),
        })
    }
}

struct Model {
    slots: [Option<SlotModel>; IDS],
    host: Vec<u8>,
}

impl Model {
    /// The host byte behind `gpa`, or why there is none.
    fn byte_at(&self, gpa: u64, write: bool) -> Result<usize, AccessErrorKind> {
        let gpage = gpa / PG;
        let s = self
            .slots
            .iter()
            .flatten()
            .find(|s| gpage >= s.gpage && gpage < s.gpage + s.npages)
            .ok_or(AccessErrorKind::NoSlot)?;
        if write && s.ro {
            return Err(AccessErrorKind::ReadOnly);
        }
        if !s.backed {
            return Err(AccessErrorKind::Unbacked);
        }
        Ok(((s.hpage + gpage - s.gpage) * PG + gpa % PG) as usize)
    }

    /// The expected outcome of an access: host byte indices, or the error.
    fn expect(&self, gpa: u64, len: usize, write: bool) -> (Vec<usize>, Option<AccessError>) {
        let mut idx = Vec::with_capacity(len);
        for i in 0..len as u64 {
            let Some(a) = gpa.checked_add(i) else {
                let e =
                    AccessError { done: idx.len(), gpa: gpa.wrapping_add(i), kind: AccessErrorKind::AddressOverflow };
                return (idx, Some(e));
            };
            match self.byte_at(a, write) {
                Ok(h) => idx.push(h),
                Err(kind) => return (idx.clone(), Some(AccessError { done: idx.len(), gpa: a, kind })),
            }
        }
        (idx, None)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mem = GuestMemory::new(Config::default()).unwrap();
    let host = mem.map_anonymous(HOST_PAGES * PG, &MapOptions::new()).unwrap();
    let mut model = Model { slots: [None; IDS], host: vec![0; (HOST_PAGES * PG) as usize] };
    let mut counter = 0u8;

    while let Some(op) = input.byte() {
        counter = counter.wrapping_add(1);
        match op % 9 {
            // Create a slot.
            0 => {
                let (Some(id), Some(g), Some(n), Some(h), Some(f)) =
                    (input.byte(), input.byte(), input.byte(), input.byte(), input.byte())
                else {
                    break;
                };
                let id = usize::from(id) % IDS;
                if model.slots[id].is_some() {
                    continue; // a request on an existing id would be a move or flags change
                }
                let npages = u64::from(n) % 8 + 1;
                let gpage = u64::from(g) % GUEST_PAGES;
                let hpage = u64::from(h) % HOST_PAGES;
                let (ro, backed) = (f & 1 != 0, f & 2 == 0);
                let flags = if ro { KVM_MEM_READONLY } else { 0 };
                let slot = id as u32;
                let r = if backed && hpage + npages <= HOST_PAGES {
                    mem.set_region(slot, flags, gpage * PG, &host, hpage * PG, npages * PG).map(|_| ())
                } else {
                    let hva = 0x30_0000_0000 + hpage * PG;
                    let region = UserMemoryRegion::new(slot, flags, gpage * PG, npages * PG, hva);
                    mem.vm().set_user_memory_region(&region).map(|_| ()).map_err(Into::into)
                };
                if r.is_ok() {
                    let backed = backed && hpage + npages <= HOST_PAGES;
                    model.slots[id] = Some(SlotModel { gpage, npages, hpage, ro, backed });
                }
            }
            // Move a slot.
            1 => {
                let (Some(id), Some(g)) = (input.byte(), input.byte()) else { break };
                let id = usize::from(id) % IDS;
                if let Some(s) = model.slots[id] {
                    let gpage = u64::from(g) % GUEST_PAGES;
                    let flags = if s.ro { KVM_MEM_READONLY } else { 0 };
                    let hva = mem.vm().id_to_slot_desc(0, id as u16).unwrap().userspace_addr;
                    let region = UserMemoryRegion::new(id as u32, flags, gpage * PG, s.npages * PG, hva);
                    if mem.vm().set_user_memory_region(&region).is_ok() {
                        model.slots[id] = Some(SlotModel { gpage, ..s });
                    }
                }
            }
            // Delete a slot.
            2 => {
                let Some(id) = input.byte() else { break };
                let id = usize::from(id) % IDS;
                let r = mem.delete_region(id as u32);
                assert_eq!(r.is_ok(), model.slots[id].is_some());
                model.slots[id] = None;
            }
            // Write.
            3 => {
                let (Some(gpa), Some(len)) = (input.gpa(), input.len()) else { break };
                let buf: Vec<u8> = (0..len).map(|i| counter.wrapping_add(i as u8) | 1).collect();
                let (idx, e) = model.expect(gpa, len, true);
                assert_eq!(mem.write(0, gpa, &buf).err(), e, "write {len:#x} at {gpa:#x}");
                for (i, h) in idx.into_iter().enumerate() {
                    model.host[h] = buf[i];
                }
            }
            // Read.
            4 => {
                let (Some(gpa), Some(len)) = (input.gpa(), input.len()) else { break };
                let mut buf = vec![0u8; len];
                let (idx, e) = model.expect(gpa, len, false);
                assert_eq!(mem.read(0, gpa, &mut buf).err(), e, "read {len:#x} at {gpa:#x}");
                for (i, h) in idx.iter().enumerate() {
                    assert_eq!(buf[i], model.host[*h]);
                }
                assert!(buf[idx.len()..].iter().all(|&b| b == 0));
            }
            // read_obj / write_obj of a u64 at any alignment.
            5 => {
                let Some(gpa) = input.gpa() else { break };
                let (idx, e) = model.expect(gpa, 8, false);
                match mem.read_obj::<u64>(0, gpa) {
                    Ok(v) => {
                        assert!(e.is_none());
                        let want: Vec<u8> = idx.iter().map(|&h| model.host[h]).collect();
                        assert_eq!(v.to_le_bytes().to_vec(), want);
                    }
                    Err(got) => assert_eq!(Some(got), e),
                }
                let v = u64::from(counter) * 0x0101_0101_0101_0101;
                let (idx, e) = model.expect(gpa, 8, true);
                assert_eq!(mem.write_obj(0, gpa, v).err(), e);
                for (i, h) in idx.into_iter().enumerate() {
                    model.host[h] = v.to_le_bytes()[i];
                }
            }
            // Atomics: aligned ones act like the model, misaligned ones fail.
            6 => {
                let Some(gpa) = input.gpa() else { break };
                let r = mem.store(0, gpa, u32::from(counter), Ordering::SeqCst);
                if gpa % 4 != 0 {
                    assert_eq!(r.unwrap_err().kind, AccessErrorKind::Misaligned);
                } else {
                    let (idx, e) = model.expect(gpa, 4, true);
                    match e {
                        // Aligned and page-contained: all or nothing.
                        Some(e) => assert_eq!(r.unwrap_err(), AccessError { done: 0, ..e }),
                        None => {
                            r.unwrap();
                            for (i, h) in idx.into_iter().enumerate() {
                                model.host[h] = u32::from(counter).to_le_bytes()[i];
                            }
                        }
                    }
                }
            }
            // Volatile slices: inside one slot only.
            7 => {
                let (Some(gpa), Some(len)) = (input.gpa(), input.len()) else { break };
                let g = mem.section();
                match g.slice(0, gpa, len, Access::Read) {
                    Ok(s) => {
                        let (idx, e) = model.expect(gpa, len, false);
                        assert!(e.is_none(), "slice where the model fails: {e:?}");
                        let mut buf = vec![0u8; len];
                        s.read_slice(&mut buf, 0).unwrap();
                        for (i, h) in idx.iter().enumerate() {
                            assert_eq!(buf[i], model.host[*h]);
                        }
                    }
                    Err(e) => {
                        let (_, me) = model.expect(gpa, len.max(1), false);
                        if e.kind != AccessErrorKind::CrossesSlot {
                            assert_eq!(Some(e.kind), me.map(|m| m.kind));
                            assert_eq!(me.map(|m| m.done), Some(0));
                        }
                    }
                }
            }
            // Host memory equals the model.
            _ => {
                let mut all = vec![0u8; model.host.len()];
                host.read_at(0, &mut all).unwrap();
                assert!(all == model.host, "host memory differs from the model");
            }
        }
    }
});
