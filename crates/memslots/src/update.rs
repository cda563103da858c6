//! `KVM_SET_USER_MEMORY_REGION(2)`: validation in the kernel's order with the
//! kernel's errors, classification, and the two-set update protocol
//! (`__kvm_set_memory_region` and `kvm_set_memslot` in `virt/kvm/kvm_main.c`).

use crate::arch::{ArchHooks, SlotDraft};
use crate::config::{PAGE_SHIFT, PAGE_SIZE};
use crate::dirty::DirtyBitmap;
use crate::error::{Error, IllegalChange};
use crate::region::{
    MemoryChange, Outcome, SlotId, UserMemoryRegion, UserMemoryRegion2, KVM_MEMSLOT_INVALID, KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_SET_USER_MEMORY_REGION_V1_FLAGS,
};
use crate::slot::{GuestMemfd, MemorySlot, SlotDesc};
use crate::sync::{lock, MutexGuard};
use crate::vm::{Vm, WriterState};
use alloc::sync::Arc;
use core::sync::atomic::Ordering;

type Slot<H> = MemorySlot<<H as ArchHooks>::SlotData>;

impl<H: ArchHooks> Vm<H> {
    /// `KVM_SET_USER_MEMORY_REGION`: create, delete (size 0), move, or change
    /// the flags of a slot. Only LOG_DIRTY_PAGES and READONLY are accepted.
    ///
    /// On error nothing changed. Returns what the request did.
    ///
    /// Waits for a grace period: it must not be called by a thread that holds
    /// a read section of this VM ([`ReadGuard`](crate::ReadGuard),
    /// [`VcpuGuard`](crate::VcpuGuard)), which would wait for itself forever,
    /// as `synchronize_srcu` inside `srcu_read_lock` would in the kernel.
    ///
    /// ```
    /// use memslots::{Config, Vm, UserMemoryRegion, MemoryChange, Outcome};
    /// let vm = Vm::new(Config::default()).unwrap();
    /// let r = UserMemoryRegion::new(0, 0, 0x10_0000, 0x20_0000, 0x7f00_0000_0000);
    /// assert_eq!(vm.set_user_memory_region(&r), Ok(Outcome::Changed(MemoryChange::Create)));
    /// assert_eq!(vm.set_user_memory_region(&r), Ok(Outcome::Unchanged));
    /// let err = vm.set_user_memory_region(&UserMemoryRegion::new(1, 0, 0x10_0000, 0x1000, 0x1000)).unwrap_err();
    /// assert_eq!(err.errno(), memslots::Errno::EEXIST);
    /// ```
    pub fn set_user_memory_region(&self, mem: &UserMemoryRegion) -> Result<Outcome, Error> {
        if mem.flags & !KVM_SET_USER_MEMORY_REGION_V1_FLAGS != 0 {
            return Err(Error::InvalidFlags { flags: mem.flags, valid: KVM_SET_USER_MEMORY_REGION_V1_FLAGS });
        }
        self.set_memory_region(&UserMemoryRegion2::from(*mem), true)
    }

    /// `KVM_SET_USER_MEMORY_REGION2`: as v1, plus guest_memfd for VMs with private memory.
    pub fn set_user_memory_region2(&self, mem: &UserMemoryRegion2) -> Result<Outcome, Error> {
        self.set_memory_region(mem, true)
    }

    /// KVM's `kvm_set_internal_memslot`: a change of one internal slot (ids
    /// from [`Config::user_slots`](crate::Config::user_slots) up to the total
    /// number of ids; lower ids and any flags are `EINVAL`), in the address
    /// space `mem.slot` names. See [`x86_set_memory_region`](Self::x86_set_memory_region)
    /// for the x86 caller.
    pub fn set_memory_region_internal(&self, mem: &UserMemoryRegion2) -> Result<Outcome, Error> {
        let sid = SlotId::from_raw(mem.slot);
        if sid.id < self.config.user_slots {
            return Err(Error::SlotIdOutOfRange { slot: mem.slot, id: sid.id, limit: self.config.user_slots });
        }
        if mem.flags != 0 {
            return Err(Error::InvalidFlags { flags: mem.flags, valid: 0 });
        }
        self.set_memory_region(mem, false)
    }

    /// x86's `__x86_set_memory_region` (the APIC access page, identity map
    /// and TSS slots): internal slot `id` at `gpa`, `size` bytes of host
    /// memory at `hva`, in **every** address space. Creating one that exists
    /// is `EEXIST`; deleting (`size` 0) one that does not exist succeeds
    /// (`Unchanged`), and a delete uses the slot's own host address. As in
    /// the kernel, a failure in address space `i` leaves the spaces before
    /// it changed.
    pub fn x86_set_memory_region(&self, id: u16, gpa: u64, size: u64, hva: u64) -> Result<Outcome, Error> {
        if id >= self.config.mem_slots_num {
            return Err(Error::SlotIdOutOfRange { slot: u32::from(id), id, limit: self.config.mem_slots_num });
        }
        let existing = self.id_to_slot_desc(0, id);
        let hva = match (size, existing) {
            (0, None) => return Ok(Outcome::Unchanged),
            (0, Some(d)) => d.userspace_addr,
            (_, Some(_)) => return Err(Error::InternalSlotExists { id }),
            (_, None) => hva,
        };
        let mut out = Outcome::Unchanged;
        for as_id in 0..self.config.nr_address_spaces {
            let slot = SlotId { as_id, id }.raw();
            let r = UserMemoryRegion2::new(slot, 0, gpa, size, hva);
            out = self.set_memory_region_internal(&r)?;
        }
        Ok(out)
    }

    fn set_memory_region(&self, mem: &UserMemoryRegion2, user: bool) -> Result<Outcome, Error> {
        let sid = SlotId::from_raw(mem.slot);
        if user && sid.id >= self.config.user_slots {
            return Err(Error::SlotIdOutOfRange { slot: mem.slot, id: sid.id, limit: self.config.user_slots });
        }
        let mut w = self.lock_writer();
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        // Hooks are user code. If one panics mid-change (after the INVALID
        // copy was published, between a publish and its replay, ...) the two
        // sets may no longer hold the same slots, and the replay of a later
        // change would remove a slot from the wrong set and leave a cached
        // pointer to a freed one. So an unwind out of here poisons the VM:
        // every later change is refused; readers keep the active set, which
        // is consistent at every point a hook runs (see DESIGN.md).
        let armed = PoisonOnUnwind(&self.poisoned);
        let r = self.set_memory_region_locked(&mut w, mem);
        core::mem::forget(armed);
        r
    }

    /// `check_memory_region_flags`.
    fn check_flags(&self, mem: &UserMemoryRegion2) -> Result<(), Error> {
        let mut valid = KVM_MEM_LOG_DIRTY_PAGES;
        if self.config.private_mem || self.config.guest_memfd {
            valid |= KVM_MEM_GUEST_MEMFD;
        }
        // Dirty logging of private memory is not supported.
        if mem.flags & KVM_MEM_GUEST_MEMFD != 0 {
            valid &= !KVM_MEM_LOG_DIRTY_PAGES;
        }
        // READONLY is incompatible with guest_memfd.
        if self.config.readonly_mem && mem.flags & KVM_MEM_GUEST_MEMFD == 0 {
            valid |= KVM_MEM_READONLY;
        }
        if mem.flags & !valid != 0 {
            return Err(Error::InvalidFlags { flags: mem.flags, valid });
        }
        Ok(())
    }

    /// `__kvm_set_memory_region`: the checks, in the kernel's order.
    fn set_memory_region_locked(&self, w: &mut WriterState, mem: &UserMemoryRegion2) -> Result<Outcome, Error> {
        self.check_flags(mem)?;
        let SlotId { as_id, id } = SlotId::from_raw(mem.slot);
        let size = mem.memory_size;
        if size & (PAGE_SIZE - 1) != 0 {
            return Err(Error::UnalignedSize { size });
        }
        if mem.guest_phys_addr & (PAGE_SIZE - 1) != 0 {
            return Err(Error::UnalignedGuestPhysAddr { gpa: mem.guest_phys_addr });
        }
        // access_ok(): [addr, addr + size) inside user space, no wrap.
        let hva = mem.userspace_addr;
        let limit = self.config.user_addr_limit;
        let hva_ok = hva & (PAGE_SIZE - 1) == 0 && hva.checked_add(size).is_some_and(|end| end <= limit);
        if !hva_ok {
            return Err(Error::BadUserspaceAddr { hva, size, limit });
        }
        let gmem = mem.flags & KVM_MEM_GUEST_MEMFD != 0;
        if gmem && (mem.guest_memfd_offset & (PAGE_SIZE - 1) != 0 || mem.guest_memfd_offset.checked_add(size).is_none())
        {
            return Err(Error::BadGuestMemfdOffset { offset: mem.guest_memfd_offset, size });
        }
        if as_id >= self.config.nr_address_spaces {
            return Err(Error::AddressSpaceOutOfRange { slot: mem.slot, as_id, nr: self.config.nr_address_spaces });
        }
        if id >= self.config.mem_slots_num {
            return Err(Error::SlotIdOutOfRange { slot: mem.slot, id, limit: self.config.mem_slots_num });
        }
        if mem.guest_phys_addr.checked_add(size).is_none() {
            return Err(Error::GuestRangeWraps { gpa: mem.guest_phys_addr, size });
        }
        let npages = size >> PAGE_SHIFT;
        // Internal slots are exempt (they never log dirty pages).
        if id < self.config.user_slots && npages > self.config.max_pages_per_slot {
            return Err(Error::TooManyPages { npages, max: self.config.max_pages_per_slot });
        }

        let space = &self.spaces[usize::from(as_id)];
        // A VMM deleting a slot usually passes the slot's addresses: start
        // bringing in what the delete will touch while the slot itself is
        // looked up (a guess, checked below).
        let guess = (size == 0).then_some((mem.guest_phys_addr >> PAGE_SHIFT, hva));
        if let Some((gfn, hva)) = guess {
            // SAFETY: we hold the writer lock.
            unsafe { space.with_both_writer(|sets| crate::set::MemslotSet::prefetch_change(sets, id, gfn, hva)) };
        }
        // SAFETY: we hold the writer lock.
        let old: Option<Arc<Slot<H>>> = unsafe { space.with_active_writer(|set| set.id_to_memslot(id).cloned()) };

        if size == 0 {
            let Some(old) = old else {
                return Err(Error::DeleteNonexistent { slot: mem.slot });
            };
            let binding = old.guest_memfd;
            let prefetched = guess == Some((old.base_gfn, old.userspace_addr));
            self.set_memslot(w, as_id, Some(old), None, MemoryChange::Delete, prefetched)?;
            // kvm_gmem_unbind.
            if let Some(b) = binding {
                w.gmem_bound.remove(&(b.fd, b.offset));
            }
            return Ok(Outcome::Changed(MemoryChange::Delete));
        }

        let base_gfn = mem.guest_phys_addr >> PAGE_SHIFT;
        let change = match &old {
            None => {
                if w.nr_memslot_pages.checked_add(npages).is_none() {
                    return Err(Error::TotalPagesOverflow { total: w.nr_memslot_pages, npages });
                }
                MemoryChange::Create
            }
            Some(old) => {
                let slot = mem.slot;
                let illegal = |what| Err(Error::IllegalChange { slot, what });
                if gmem {
                    return illegal(IllegalChange::GuestMemfd);
                }
                if mem.userspace_addr != old.userspace_addr {
                    return illegal(IllegalChange::UserspaceAddr);
                }
                if npages != old.npages {
                    return illegal(IllegalChange::Size);
                }
                if (mem.flags ^ old.flags) & KVM_MEM_READONLY != 0 {
                    return illegal(IllegalChange::ReadonlyFlag);
                }
                if (mem.flags ^ old.flags) & KVM_MEM_GUEST_MEMFD != 0 {
                    return illegal(IllegalChange::GuestMemfdFlag);
                }
                if base_gfn != old.base_gfn {
                    MemoryChange::Move
                } else if mem.flags != old.flags {
                    MemoryChange::FlagsOnly
                } else {
                    return Ok(Outcome::Unchanged);
                }
            }
        };

        if matches!(change, MemoryChange::Create | MemoryChange::Move) {
            // SAFETY: we hold the writer lock.
            let other = unsafe { space.with_active_writer(|set| first_overlap(set, id, base_gfn, npages)) };
            if let Some(other) = other {
                return Err(Error::Overlap { slot: mem.slot, base_gfn, npages, other });
            }
        }

        if gmem && change == MemoryChange::Create {
            Self::check_gmem_bind(w, mem.guest_memfd, mem.guest_memfd_offset, size)?;
        }
        let desc = SlotDesc {
            base_gfn,
            npages,
            userspace_addr: mem.userspace_addr,
            flags: mem.flags,
            id,
            as_id,
            guest_memfd: gmem.then_some(GuestMemfd { fd: mem.guest_memfd, offset: mem.guest_memfd_offset }),
        };
        self.set_memslot(w, as_id, old, Some(desc), change, false)?;
        if gmem && change == MemoryChange::Create {
            let (fd, offset) = (mem.guest_memfd, mem.guest_memfd_offset);
            w.gmem_bound.insert((fd, offset), (offset + size, mem.slot));
        }
        Ok(Outcome::Changed(change))
    }

    /// `kvm_gmem_bind`'s checks the library can make (the file's type and
    /// owner only the kernel knows): the offset as a file offset, the range
    /// inside the file's declared size, no other slot bound to part of it.
    fn check_gmem_bind(w: &WriterState, fd: u32, offset: u64, size: u64) -> Result<(), Error> {
        let refuse = |why| Err(Error::GuestMemfdBind { fd, offset, size, why });
        if w.gmem_sizes.get(&fd) == Some(&None) {
            return Err(Error::GuestMemfdBadFd { fd });
        }
        if i64::try_from(offset).is_err() {
            return refuse("the offset is negative as a file offset");
        }
        let end = offset + size; // checked not to wrap before
        if w.gmem_sizes.get(&fd).copied().flatten().is_some_and(|len| end > len) {
            return refuse("the range ends past the end of the file");
        }
        // Bindings of one file never overlap: only the last one starting
        // below `end` can reach into the range.
        if let Some((_, &(bound_end, _))) = w.gmem_bound.range((fd, 0)..(fd, end)).next_back() {
            if bound_end > offset {
                return refuse("part of the range is bound to another slot");
            }
        }
        Ok(())
    }

    /// Declares that guest_memfd `fd` is `size` bytes long, so bindings past
    /// its end are refused by the library (as `kvm_gmem_bind` does). A
    /// backend that can `fstat` the file does it for its callers. Replaces
    /// an earlier declaration; bindings are tracked per fd number, so
    /// declare again if the number is reused for another file.
    pub fn declare_guest_memfd(&self, fd: u32, size: u64) {
        let mut w = self.lock_writer();
        w.gmem_sizes.insert(fd, Some(size));
    }

    /// Declares that fd number `fd` is not open: binding a slot to it is
    /// `EBADF`, as the kernel's `fget` fails (a trace replayer uses it for
    /// guest_memfds its trace never created).
    pub fn declare_fd_closed(&self, fd: u32) {
        let mut w = self.lock_writer();
        w.gmem_sizes.insert(fd, None);
    }

    /// Whether [`declare_guest_memfd`](Self::declare_guest_memfd) or
    /// [`declare_fd_closed`](Self::declare_fd_closed) said anything about `fd`.
    pub fn guest_memfd_declared(&self, fd: u32) -> bool {
        self.lock_writer().gmem_sizes.contains_key(&fd)
    }

    /// Publishes the inactive set of `as_id` and waits for readers of the old one.
    fn swap(&self, as_id: u16) {
        self.swap_releasing(as_id, None);
    }

    /// [`swap`](Self::swap), releasing the arch lock `arch` right after the
    /// publish and before the wait, as `kvm_swap_active_memslots` releases
    /// `slots_arch_lock` before `synchronize_srcu` (a reader inside a section
    /// may be waiting for that lock in `enable_lazy_metadata`).
    fn swap_releasing(&self, as_id: u16, arch: Option<MutexGuard<'_, ()>>) {
        let space = &self.spaces[usize::from(as_id)];
        // The published flat table describes the old set: freed after the
        // grace period (flat.rs).
        let flat = &self.flat[usize::from(as_id)];
        // kvm_swap_active_memslots: the arch hook sees the new generation
        // before it is stored.
        // SAFETY: every caller holds the writer lock; `after_grace_period`
        // runs right after the grace period, before the final generation
        // is stored.
        unsafe {
            space.swap_then(
                &self.srcu,
                move || drop(arch),
                |gen| {
                    flat.after_grace_period();
                    self.hooks.memslots_updated(as_id, gen);
                },
            )
        };
    }

    /// Runs `f` on the inactive set of `as_id`.
    fn with_inactive(&self, as_id: u16, f: impl FnOnce(&mut crate::set::MemslotSet<H::SlotData>)) {
        let space = &self.spaces[usize::from(as_id)];
        // SAFETY: every caller holds the writer lock, and every swap waits for a
        // grace period, so the inactive set has no readers.
        unsafe { space.with_inactive_mut(f) }
    }

    /// `kvm_activate_memslot`: swap, then replay `old -> new` on the now
    /// inactive set so both sets agree again.
    fn activate(&self, as_id: u16, old: Option<&Arc<Slot<H>>>, new: Option<&Arc<Slot<H>>>) {
        self.activate_releasing(as_id, old, new, None);
    }

    /// [`activate`](Self::activate), releasing the arch lock after the publish.
    fn activate_releasing(
        &self,
        as_id: u16,
        old: Option<&Arc<Slot<H>>>,
        new: Option<&Arc<Slot<H>>>,
        arch: Option<MutexGuard<'_, ()>>,
    ) {
        self.swap_releasing(as_id, arch);
        self.with_inactive(as_id, |set| set.replace(old, new));
    }

    /// `kvm_prepare_memory_region`: the dirty bitmap decision, the x86 arch
    /// checks, then the arch hook.
    fn prepare(
        &self,
        _w: &WriterState, // proof that the writer lock is held
        change: MemoryChange,
        old: Option<&Slot<H>>,
        draft: Option<&mut SlotDraft<H::SlotData>>,
    ) -> Result<Option<Arc<DirtyBitmap>>, Error> {
        let mut bitmap = None;
        if let Some(new) = draft.as_deref() {
            if new.desc.logs_dirty_pages() {
                if let Some(b) = old.and_then(|o| o.dirty_bitmap.as_ref()) {
                    bitmap = Some(Arc::clone(b));
                } else if self.use_dirty_bitmap() {
                    let initially_set = self.manual_protect.load(Ordering::Relaxed)
                        & crate::dirty_log::KVM_DIRTY_LOG_INITIALLY_SET
                        != 0;
                    bitmap = Some(Arc::new(DirtyBitmap::try_new(new.desc.npages, initially_set)?));
                }
            }
            // x86 kvm_arch_prepare_memory_region: the slot must end below the
            // highest gfn the MMU can map.
            if matches!(change, MemoryChange::Create | MemoryChange::Move) {
                let last_gfn = new.desc.base_gfn + (new.desc.npages - 1);
                if last_gfn > self.config.max_gfn {
                    return Err(Error::GfnBeyondMax { last_gfn, max_gfn: self.config.max_gfn });
                }
            }
        }
        self.hooks.prepare_memory_region(change, old, draft).map_err(Error::Arch)?;
        Ok(bitmap)
    }

    /// `kvm_set_memslot`: the update protocol. `prefetched`: the caller
    /// already prefetched what changing `old` touches (`prefetch.rs`).
    fn set_memslot(
        &self,
        w: &mut WriterState,
        as_id: u16,
        old: Option<Arc<Slot<H>>>,
        new: Option<SlotDesc>,
        change: MemoryChange,
        prefetched: bool,
    ) -> Result<(), Error> {
        // DELETE and MOVE: publish an INVALID copy first so no vCPU creates new
        // mappings of the old range, then flush what exists.
        let invalid = match (&old, change) {
            (Some(old), MemoryChange::Delete | MemoryChange::Move) => {
                if !prefetched {
                    let space = &self.spaces[usize::from(as_id)];
                    let (id, gfn, hva) = (old.id, old.base_gfn, old.userspace_addr);
                    // SAFETY: we hold the writer lock.
                    unsafe {
                        space.with_both_writer(|sets| crate::set::MemslotSet::prefetch_change(sets, id, gfn, hva))
                    };
                }
                let mut desc = old.desc;
                desc.flags |= KVM_MEMSLOT_INVALID;
                let inv = Arc::new(MemorySlot { desc, dirty_bitmap: old.dirty_bitmap.clone(), arch: old.arch.clone() });
                self.with_inactive(as_id, |set| set.replace(Some(old), Some(&inv)));
                // Activate the INVALID slot without propagating it: the now
                // inactive set keeps `old` until the change is made.
                self.swap(as_id);
                self.hooks.flush_shadow_memslot(&inv);
                Some(inv)
            }
            _ => None,
        };

        let mut draft = new.map(|desc| SlotDraft {
            desc,
            arch: match (change, &old) {
                (MemoryChange::FlagsOnly, Some(o)) => o.arch.clone(),
                _ => H::SlotData::default(),
            },
        });
        let restore = |e: Error| {
            if let (Some(inv), Some(old)) = (&invalid, &old) {
                // Reinstall the old slot (seed 002): the inactive set has
                // it; activate it and replay on the other set.
                self.activate(as_id, Some(inv), Some(old));
            }
            Err(e)
        };
        // KVM's slots_arch_lock, from prepare to the publish of the new slot
        // (kvm_set_memslot retakes it after the INVALID copy's grace period).
        let arch = lock(&self.arch_lock);
        let bitmap = match self.prepare(w, change, old.as_deref(), draft.as_mut()) {
            Ok(b) => b,
            Err(e) => {
                drop(arch);
                return restore(e);
            }
        };
        // Seed 003: once enabled, the new slot gets its lazily allocated
        // metadata before it is visible (a FLAGS_ONLY draft shares the old
        // slot's, which the hook finds there).
        if let Some(d) = &draft {
            if let Err(e) = self.alloc_lazy_metadata_locked(&d.desc, &d.arch) {
                self.hooks.abort_memory_region(change, old.as_deref(), Some(d));
                drop(arch);
                return restore(Error::Arch(e));
            }
        }
        let new = draft.map(|d| Arc::new(MemorySlot { desc: d.desc, dirty_bitmap: bitmap, arch: d.arch }));

        let arch = Some(arch);
        match change {
            MemoryChange::Create => {
                self.with_inactive(as_id, |set| set.replace(None, new.as_ref()));
                self.activate_releasing(as_id, None, new.as_ref(), arch);
            }
            MemoryChange::Delete | MemoryChange::Move => {
                // The inactive set still holds `old`, the active one the INVALID copy.
                self.with_inactive(as_id, |set| set.replace(old.as_ref(), new.as_ref()));
                self.activate_releasing(as_id, invalid.as_ref(), new.as_ref(), arch);
            }
            MemoryChange::FlagsOnly => {
                self.with_inactive(as_id, |set| set.replace(old.as_ref(), new.as_ref()));
                self.activate_releasing(as_id, old.as_ref(), new.as_ref(), arch);
            }
        }

        // kvm_commit_memory_region: account pages first, then the arch hook.
        match (change, &old, &new) {
            (MemoryChange::Delete, Some(o), _) => w.nr_memslot_pages -= o.npages,
            (MemoryChange::Create, _, Some(n)) => w.nr_memslot_pages += n.npages,
            _ => {}
        }
        self.total_pages.store(w.nr_memslot_pages, Ordering::Relaxed);
        self.hooks.commit_memory_region(change, old.as_deref(), new.as_deref());
        Ok(())
    }
}

/// Sets the flag when dropped, which only happens when a panic unwinds
/// through [`Vm::set_memory_region`] (the normal path forgets it). Works
/// without `std` (no `catch_unwind` needed).
struct PoisonOnUnwind<'a>(&'a core::sync::atomic::AtomicBool);

impl Drop for PoisonOnUnwind<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// `kvm_check_memslot_overlap`: the first slot other than `id` intersecting
/// `[base_gfn, base_gfn + npages)`.
fn first_overlap<D>(set: &crate::set::MemslotSet<D>, id: u16, base_gfn: u64, npages: u64) -> Option<u32> {
    let end = base_gfn + npages;
    for (base, e) in set.gfn_iter_from(base_gfn) {
        if base >= end {
            break;
        }
        if base + e.npages <= base_gfn {
            continue;
        }
        // SAFETY: the writer holds the lock; the slot is owned by the set.
        let s = unsafe { e.slot.as_ref() };
        if s.id != id {
            return Some(s.slot());
        }
    }
    None
}
