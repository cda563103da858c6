//! A tiny real-mode guest on the KVM backend: RAM made of many slots created
//! through the library, two hand-assembled programs, and a vCPU run loop.
//! Used by `memslots demo` and the KVM integration tests.

use crate::backend::{new_kvm_guest_vm, KvmVcpu, KvmVm};
use crate::kdirty::{enable_kernel_dirty_mode, KernelDirtyMode, KernelRing};
use kvm_ioctls::VcpuExit;
use memslots::{UserMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use std::sync::Arc;

/// Guest physical address of the boot slot (code at 0x1000, data table at 0x2000).
pub const BOOT_GPA: u64 = 0;
/// Size of the boot slot.
pub const BOOT_SIZE: u64 = 0x1_0000;
/// Guest physical address of the first data slot.
pub const DATA_GPA: u64 = 0x1_0000;
/// Data slots (4 KiB each), all below 1 MiB so real mode reaches them.
pub const DATA_SLOTS: u32 = 192;
/// Slot id of data slot `i` is `DATA_SLOT_BASE + i` (the boot slot is 0).
pub const DATA_SLOT_BASE: u32 = 1;
/// Port the loop program reports the value it read on.
pub const REPORT_PORT: u16 = 0x10;

/// Anonymous host memory, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this object; concurrent access
// goes through volatile reads/writes of aligned words.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of zeroed anonymous memory.
    pub fn new(len: usize) -> std::io::Result<Arc<Self>> {
        // SAFETY: a fresh private anonymous mapping; checked for failure.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arc::new(Mapping { ptr: p.cast(), len }))
    }
    /// Host virtual address of byte 0.
    pub fn hva(&self) -> u64 {
        self.ptr as u64
    }
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Always false: `mmap` refuses empty mappings.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Whether `[off, off + n)` lies inside the mapping (overflow-safe).
    fn in_bounds(&self, off: usize, n: usize) -> bool {
        off.checked_add(n).is_some_and(|end| end <= self.len)
    }
    /// Copies `bytes` to offset `off`; `InvalidInput` (copying nothing) if
    /// the range is not inside the mapping.
    pub fn write(&self, off: usize, bytes: &[u8]) -> std::io::Result<()> {
        if !self.in_bounds(off, bytes.len()) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "write outside the mapping"));
        }
        // SAFETY: in bounds (checked); the guest may run concurrently, which
        // is a data race only on guest-visible bytes, as with any VMM.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off), bytes.len()) };
        Ok(())
    }
    /// Reads the little-endian u16 at `off` (volatile: the guest writes it).
    /// `None` if `off` is odd or the two bytes are not inside the mapping.
    pub fn read_u16(&self, off: usize) -> Option<u16> {
        if !off.is_multiple_of(2) || !self.in_bounds(off, 2) {
            return None;
        }
        // SAFETY: in bounds and aligned (checked; the mapping is page aligned).
        Some(unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<u16>()) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// Reads the u16 at guest address `gpa` through the library: `gfn_to_hva`,
/// then a volatile load from host memory. `None` for holes and MMIO.
///
/// # Safety
/// Every slot of `vm` must map memory that is valid while the read section
/// lasts (the `Guest` that created the slots guarantees this).
/// `None` also for an odd `gpa` (a u16 there could be unaligned, or cross
/// into the next page and out of the slot).
pub unsafe fn read_guest_u16(vm: &KvmVm, gpa: u64) -> Option<u16> {
    if !gpa.is_multiple_of(2) {
        return None;
    }
    let g = vm.read();
    let (hva, _) = g.gfn_to_hva_prot(0, gpa >> 12).ok()?;
    let addr = hva.checked_add(gpa & 0xfff)?;
    // SAFETY: per the contract the slot's host range is mapped; the read
    // section keeps the slot (and the caller keeps the mapping) alive. Both
    // bytes are in the same (mapped) page, as `gpa` is even; the slot's hva
    // is page aligned (the library checks it), so the read is aligned.
    Some(unsafe { std::ptr::read_volatile(addr as *const u16) })
}

/// The "writer" program: for each segment in the zero-terminated table at
/// 0x2000, write 0xBEEF to `seg:0` and the segment to `seg:2`; then HLT.
pub fn writer_program() -> Vec<u8> {
    vec![
        0xBE, 0x00, 0x20, // mov si, 0x2000
        0x8B, 0x04, // next: mov ax, [si]
        0x85, 0xC0, // test ax, ax
        0x74, 0x12, // jz done (+18)
        0x8E, 0xC0, // mov es, ax
        0x26, 0xC7, 0x06, 0x00, 0x00, 0xEF, 0xBE, // mov word [es:0], 0xBEEF
        0x26, 0xA3, 0x02, 0x00, // mov [es:2], ax
        0x83, 0xC6, 0x02, // add si, 2
        0xEB, 0xE8, // jmp next (-24)
        0xF4, // done: hlt
    ]
}

/// The "loop" program: `es = seg; forever { ax = [es:0]; out REPORT_PORT, ax; inc word [es:2] }`.
pub fn loop_program(seg: u16) -> Vec<u8> {
    let [lo, hi] = seg.to_le_bytes();
    vec![
        0xB8, lo, hi, // mov ax, seg
        0x8E, 0xC0, // mov es, ax
        0x26, 0xA1, 0x00, 0x00, // loop: mov ax, [es:0]
        0xE7, 0x10, // out 0x10, ax
        0x26, 0xFF, 0x06, 0x02, 0x00, // inc word [es:2]
        0xEB, 0xF3, // jmp loop (-13)
    ]
}

/// A VM with a boot slot and `DATA_SLOTS` 4 KiB data slots, all created
/// through the library (KVM backend), and one vCPU in real mode at 0x1000.
#[derive(Debug)]
pub struct Guest {
    /// The library VM mirrored into the kernel; it owns `boot` and `data`
    /// and refuses (`EFAULT`) slots over any other host memory.
    pub vm: KvmVm,
    /// The vCPU.
    pub vcpu: KvmVcpu,
    /// Host memory of the boot slot.
    pub boot: Arc<Mapping>,
    /// Host memory of the data slots (slot i at offset i * 4096).
    pub data: Arc<Mapping>,
    /// The vCPU's kernel dirty ring, in ring mode.
    pub ring: Option<KernelRing>,
}

impl Guest {
    /// Builds the VM: `code` at 0x1000, `table` (u16 segments) at 0x2000,
    /// data slots logging dirty pages if `log`.
    pub fn new(code: &[u8], table: &[u16], log: bool, mode: KernelDirtyMode) -> std::io::Result<Self> {
        let boot = Mapping::new(usize::try_from(BOOT_SIZE).unwrap_or(0))?;
        let data = Mapping::new(usize::try_from(u64::from(DATA_SLOTS) * 4096).unwrap_or(0))?;
        boot.write(0x1000, code)?;
        let t: Vec<u8> = table.iter().chain([&0u16]).flat_map(|s| s.to_le_bytes()).collect();
        boot.write(0x2000, &t)?;
        // Owned memory: slots may only map `boot` and `data`, which the VM
        // (and the vCPU) keep alive.
        let vm = new_kvm_guest_vm()?;
        vm.hooks().attach(&boot)?;
        vm.hooks().attach(&data)?;
        enable_kernel_dirty_mode(&vm, mode).map_err(|e| std::io::Error::from_raw_os_error(e.0))?;
        let io = |e: memslots::Error| std::io::Error::from_raw_os_error(e.errno().0);
        vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, BOOT_GPA, BOOT_SIZE, boot.hva())).map_err(io)?;
        let flags = if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for i in 0..DATA_SLOTS {
            let r = UserMemoryRegion::new(
                DATA_SLOT_BASE + i,
                flags,
                DATA_GPA + u64::from(i) * 4096,
                4096,
                data.hva() + u64::from(i) * 4096,
            );
            vm.set_user_memory_region(&r).map_err(io)?;
        }
        let vcpu = vm.hooks().create_vcpu(0)?;
        let mut sregs = vcpu.get_sregs().map_err(std::io::Error::from)?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).map_err(std::io::Error::from)?;
        let mut regs = vcpu.get_regs().map_err(std::io::Error::from)?;
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).map_err(std::io::Error::from)?;
        let ring = match mode {
            KernelDirtyMode::Ring(bytes) => Some(KernelRing::map(&vcpu, bytes)?),
            _ => None,
        };
        Ok(Guest { vm, vcpu, boot, data, ring })
    }

    /// Guest physical address of data slot `i`.
    pub fn data_gpa(i: u32) -> u64 {
        DATA_GPA + u64::from(i) * 4096
    }

    /// Runs the vCPU until HLT (or `max_exits` exits); returns the I/O values reported.
    pub fn run_to_hlt(&mut self, max_exits: usize) -> std::io::Result<Vec<u16>> {
        let mut out = Vec::new();
        for _ in 0..max_exits {
            match self.vcpu.run().map_err(std::io::Error::from)? {
                VcpuExit::Hlt => return Ok(out),
                VcpuExit::IoOut(_, d) => out.push(u16::from_le_bytes([d[0], d.get(1).copied().unwrap_or(0)])),
                other => return Err(std::io::Error::other(format!("unexpected exit {other:?}"))),
            }
        }
        Err(std::io::Error::other("guest did not halt"))
    }
}

/// What the vCPU saw in [`run_loop`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopEvent {
    /// The guest read this value from the target page (it was mapped).
    Read(u16),
    /// A guest read of `addr` exited to userspace as MMIO (no slot there).
    MmioRead(u64),
    /// A guest write of `addr` exited as MMIO.
    MmioWrite(u64),
}

/// Value returned to the guest for MMIO reads.
pub const MMIO_VALUE: u16 = 0xDEAD;

/// Runs the loop program on `vcpu`, calling `f` for each event until it
/// returns false.
pub fn run_loop(vcpu: &mut KvmVcpu, mut f: impl FnMut(LoopEvent) -> bool) -> std::io::Result<()> {
    loop {
        let ev = match vcpu.run().map_err(std::io::Error::from)? {
            VcpuExit::IoOut(REPORT_PORT, d) => {
                LoopEvent::Read(u16::from_le_bytes([d[0], d.get(1).copied().unwrap_or(0)]))
            }
            VcpuExit::MmioRead(addr, data) => {
                let v = MMIO_VALUE.to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = v.get(i).copied().unwrap_or(0);
                }
                LoopEvent::MmioRead(addr)
            }
            VcpuExit::MmioWrite(addr, _) => LoopEvent::MmioWrite(addr),
            other => return Err(std::io::Error::other(format!("unexpected exit {other:?}"))),
        };
        if !f(ev) {
            return Ok(());
        }
    }
}
