//! A 64-bit long-mode guest helper whose work runs at CPL3.
//!
//! Independent of this library's VM types: the boot area is written through
//! a closure `FnMut(gpa, &[u8]) -> io::Result<()>`, and the vCPU is a plain
//! [`kvm_ioctls::VcpuFd`], so a memslots-based VMM and a plain
//! vm-memory + kvm-ioctls VMM can both use it.
//!
//! # Why CPL3
//!
//! On a nested `/dev/kvm` with shadow paging (for instance `kvm_pvm`) guest
//! code at CPL3 runs natively while CPL0 code is emulated, about a million
//! instructions per second, and some instructions (`int3`, `int n`,
//! `cmpxchg16b`, `xsave`, SIMD) cannot run at CPL0 at all; `syscall` from CPL3
//! does not reach CPL0 either. So the guest's work runs at CPL3 and comes
//! back to the VMM through
//!
//! * I/O exits: `out`/`in` at CPL3 exit to the VMM (`KVM_EXIT_IO`). RFLAGS
//!   gets IOPL = 3, and because a host may not honour that (this nested
//!   host clears IOPL for CPL3, so `out` would #GP), the TSS also carries an
//!   all-zero I/O permission bitmap that allows every port at CPL3;
//! * exceptions: every one of the 32 exception vectors goes to a tiny CPL0
//!   handler that puts the error code in `rdx` and the faulting `rip` in
//!   `rsi`, does `out EXC_PORT, al` with `al` = the vector, then `hlt`s
//!   forever. [`classify`] turns that exit into [`GuestExit::Exception`] and
//!   [`exception_info`] reads the details;
//! * MMIO exits: an access to an identity-mapped gpa that no memory slot
//!   backs is a `KVM_EXIT_MMIO` ([`GuestExit::Mmio`]).
//!
//! [`enter_long_mode`] puts the vCPU straight at CPL3 through `KVM_SET_SREGS`
//! (CS and SS with DPL 3, long mode, paging on; [`Entry::Direct`], accepted
//! by this host). No CPL0 code runs until an exception. [`Entry::Cpl0Stub`]
//! is the alternative for a host that refuses that: the vCPU starts at CPL0
//! on a five-instruction stub that `iretq`s to CPL3.
//!
//! # Layout of the boot area (default `boot_gpa` = 0x1000)
//!
//! | gpa (default)       | offset          | contents                                                  |
//! |---------------------|-----------------|-----------------------------------------------------------|
//! | 0x1000              | 0x0000          | GDT: null, kernel code64 (0x08), kernel data (0x10), user data DPL3 (0x18, selector 0x1b), user code64 DPL3 (0x20, selector 0x23), 64-bit TSS (0x28, 16 bytes) |
//! | 0x2000..0x4069      | 0x1000..0x3069  | TSS (RSP0 = top of the kernel stack) and its I/O permission bitmap (all ports allowed) |
//! | 0x5000              | 0x4000          | IDT: 32 interrupt gates (selector 0x08, DPL0)             |
//! | 0x6000              | 0x5000          | exception handlers, 16 bytes each (vector `v` at `0x6000 + 16 v`) |
//! | 0x6200              | 0x5200          | CPL0 entry stub (only [`Entry::Cpl0Stub`])                |
//! | 0x7000..0x9000      | 0x6000..0x8000  | kernel stack (exception frames); RSP0 = 0x9000            |
//! | 0x9000              | 0x8000          | PML4 (entry 0 only)                                       |
//! | 0xA000              | 0x9000          | PDPT (one entry per GiB mapped)                           |
//! | 0xB000..            | 0xA000..        | page directories, one per GiB, 2 MiB pages                |
//!
//! With the default 16 GiB identity map the area ends at 0x1B000. Every page
//! of guest physical `[0, identity_map_bytes)` is mapped at the same linear
//! address, present, writable and user (U/S = 1), so CPL3 code can touch
//! all RAM, including RAM above a 32-bit PCI hole (e.g. 2 GiB at 0 and more
//! at 4 GiB). A linear address at or above `identity_map_bytes` gives a
//! #PF (vector 14). Only 2 MiB pages are used, never 1 GiB ones.
//!
//! # Use from a VMM
//!
//! ```no_run
//! # fn demo(kvm: &kvm_ioctls::Kvm, vcpu: &mut kvm_ioctls::VcpuFd,
//! #         mut write: impl FnMut(u64, &[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
//! use memslots_kvm::longmode::{self, GuestExit, LongModeLayout};
//! let layout = LongModeLayout::default();
//! longmode::write_boot_area(&layout, &mut write)?;                  // GDT, IDT, page tables
//! write(0x40_0000, &longmode::dirty_forever_program())?;           // the CPL3 program
//! longmode::enter_long_mode(kvm, vcpu, &layout, 0x40_0000, 0x3f_f000, [0x100_0000, 256, 0x10, 4096, 0, 0])?;
//! while let GuestExit::Io { port: 0x10, data: pass } = longmode::run(vcpu)? { /* one pass done */ }
//! # Ok(()) }
//! ```

use kvm_bindings::{kvm_regs, kvm_segment, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use std::io;

const EXC_PORT_U8: u8 = 0xE0;
/// Port the exception handlers write the vector number to (`out imm8, al`).
pub const EXC_PORT: u16 = EXC_PORT_U8 as u16;
/// Number of IDT entries (the architectural exception vectors 0..32).
pub const IDT_ENTRIES: u8 = 32;

/// Kernel code64 selector (DPL0).
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector (DPL0).
pub const KERNEL_DS: u16 = 0x10;
const USER_DS_U8: u8 = 0x18 | 3;
const USER_CS_U8: u8 = 0x20 | 3;
/// User data selector (DPL3, RPL3).
pub const USER_DS: u16 = USER_DS_U8 as u16;
/// User code64 selector (DPL3, RPL3).
pub const USER_CS: u16 = USER_CS_U8 as u16;
/// TSS selector.
pub const TSS_SEL: u16 = 0x28;

const PAGE: u64 = 0x1000;
const PAGE_BYTES: usize = 0x1000;
const TWO_MIB: u64 = 2 << 20;
const ONE_GIB: u64 = 1 << 30;
/// One PDPT maps at most 512 GiB.
const MAX_IDENTITY: u64 = 512 * ONE_GIB;

const GDT_OFF: u64 = 0x0000;
const TSS_OFF: u64 = 0x1000;
const IDT_OFF: u64 = 0x4000;
const CODE_OFF: u64 = 0x5000;
const HANDLER_SIZE: usize = 16;
const STUB_OFF: u64 = CODE_OFF + (HANDLER_SIZE as u64) * (IDT_ENTRIES as u64);
const KSTACK_TOP_OFF: u64 = 0x8000;
const PML4_OFF: u64 = 0x8000;
const PDPT_OFF: u64 = 0x9000;
const PD_OFF: u64 = 0xA000;

/// GDT entries (8 bytes each; the TSS descriptor takes two).
const GDT_ENTRIES: u16 = 7;
/// Size of a 64-bit TSS without the I/O permission bitmap.
const TSS_SIZE: u16 = 104;
/// The I/O permission bitmap: one bit per port (all clear: every port
/// allowed at CPL3), then the terminating 0xFF byte the CPU may read.
const IOPB_BYTES: u16 = 8192; // 65536 ports / 8
/// TSS limit: the TSS, the bitmap and its terminating byte.
const TSS_LIMIT: u16 = TSS_SIZE + IOPB_BYTES;

// The boot area's pieces do not overlap.
const _: () = assert!(TSS_OFF + (TSS_LIMIT as u64) < IDT_OFF);
const _: () = assert!(IDT_OFF + 16 * IDT_ENTRIES as u64 <= CODE_OFF);
const _: () = assert!(STUB_OFF + 16 <= CODE_OFF + PAGE);
const _: () = assert!(CODE_OFF + PAGE < KSTACK_TOP_OFF);

// Page-table entry bits.
const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;

// Control-register and EFER bits.
const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_CPL3_U32: u32 = 0x2 | (3 << 12);
/// RFLAGS: bit 1 is always 1; IOPL = 3 (bits 12..14) lets CPL3 do port I/O
/// (where the host honours it; the TSS I/O bitmap covers the others).
pub const RFLAGS_CPL3: u64 = RFLAGS_CPL3_U32 as u64;

/// How [`enter_long_mode`] starts the vCPU at CPL3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Entry {
    /// `KVM_SET_SREGS` with CS/SS of DPL 3: the first instruction run is the
    /// program's, at CPL3.
    #[default]
    Direct,
    /// Start at CPL0 on a stub in the boot area that pushes an `iretq` frame
    /// (SS = [`USER_DS`], RSP = `r14`, RFLAGS = [`RFLAGS_CPL3`], CS =
    /// [`USER_CS`], RIP = `r15`) and `iretq`s. The program sees `r14`/`r15`
    /// holding its stack and entry.
    Cpl0Stub,
}

/// Where the boot area lives and how much guest-physical space is identity mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongModeLayout {
    /// Page-aligned guest physical address of the boot area (see the module docs).
    pub boot_gpa: u64,
    /// Bytes of guest physical space identity mapped from 0, a multiple of
    /// 2 MiB, at most 512 GiB, covering the boot area.
    pub identity_map_bytes: u64,
    /// How the vCPU enters CPL3.
    pub entry: Entry,
}

impl Default for LongModeLayout {
    /// Boot area at 0x1000, 16 GiB identity mapped, direct CPL3 entry.
    fn default() -> Self {
        LongModeLayout { boot_gpa: 0x1000, identity_map_bytes: 16 * ONE_GIB, entry: Entry::Direct }
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

impl LongModeLayout {
    /// GDT base.
    pub fn gdt_gpa(&self) -> u64 {
        self.boot_gpa + GDT_OFF
    }
    /// TSS base.
    pub fn tss_gpa(&self) -> u64 {
        self.boot_gpa + TSS_OFF
    }
    /// IDT base.
    pub fn idt_gpa(&self) -> u64 {
        self.boot_gpa + IDT_OFF
    }
    /// Address of the handler of exception `vector`.
    pub fn handler_gpa(&self, vector: u8) -> u64 {
        self.boot_gpa + CODE_OFF + HANDLER_SIZE as u64 * u64::from(vector)
    }
    /// Address of the CPL0 entry stub ([`Entry::Cpl0Stub`]).
    pub fn stub_gpa(&self) -> u64 {
        self.boot_gpa + STUB_OFF
    }
    /// Top of the kernel stack (TSS.RSP0).
    pub fn kernel_stack_top(&self) -> u64 {
        self.boot_gpa + KSTACK_TOP_OFF
    }
    /// PML4 base (CR3).
    pub fn pml4_gpa(&self) -> u64 {
        self.boot_gpa + PML4_OFF
    }
    /// PDPT base.
    pub fn pdpt_gpa(&self) -> u64 {
        self.boot_gpa + PDPT_OFF
    }
    /// Number of page directories (one per GiB mapped, rounded up).
    pub fn pd_count(&self) -> u64 {
        self.identity_map_bytes.div_ceil(ONE_GIB)
    }
    /// Base of page directory `i` (mapping `[i GiB, (i + 1) GiB)`).
    pub fn pd_gpa(&self, i: u64) -> u64 {
        self.boot_gpa + PD_OFF + i * PAGE
    }
    /// First byte after the boot area.
    pub fn boot_end(&self) -> u64 {
        self.pd_gpa(self.pd_count())
    }
    /// Checks alignment and limits: `InvalidInput` with the reason.
    pub fn validate(&self) -> io::Result<()> {
        if !self.boot_gpa.is_multiple_of(PAGE) {
            return Err(invalid("boot_gpa must be 4 KiB aligned"));
        }
        if self.identity_map_bytes == 0 || !self.identity_map_bytes.is_multiple_of(TWO_MIB) {
            return Err(invalid("identity_map_bytes must be a non-zero multiple of 2 MiB"));
        }
        if self.identity_map_bytes > MAX_IDENTITY {
            return Err(invalid("identity_map_bytes must be at most 512 GiB"));
        }
        if self.boot_end() > self.identity_map_bytes {
            return Err(invalid("the boot area must lie inside the identity map"));
        }
        Ok(())
    }
}

/// A code/data segment descriptor: base 0, limit 4 GiB, `access` byte,
/// `flags` nibble (G, D/B, L).
fn seg_desc(access: u8, flags: u8) -> u64 {
    0xFFFF | (u64::from(access) << 40) | (0xF << 48) | (u64::from(flags) << 52)
}

/// The GDT's bytes for a TSS at `tss`.
fn gdt_bytes(tss: u64) -> Vec<u8> {
    let tss_lo = u64::from(TSS_LIMIT)
        | ((tss & 0xFF_FFFF) << 16)
        | (0x89 << 40) // P, DPL0, type 9 = available 64-bit TSS
        | (((tss >> 24) & 0xFF) << 56);
    let tss_hi = tss >> 32;
    let entries = [
        0,
        seg_desc(0x9A, 0xA), // kernel code64: P, DPL0, code exec/read; G, L
        seg_desc(0x92, 0xC), // kernel data: P, DPL0, data read/write; G, D/B
        seg_desc(0xF2, 0xC), // user data: P, DPL3, data read/write; G, D/B
        seg_desc(0xFA, 0xA), // user code64: P, DPL3, code exec/read; G, L
        tss_lo,
        tss_hi,
    ];
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

fn tss_bytes(rsp0: u64) -> Vec<u8> {
    let mut t = vec![0u8; usize::from(TSS_LIMIT) + 1];
    t[4..12].copy_from_slice(&rsp0.to_le_bytes());
    // The I/O permission bitmap follows the TSS; all zero (every port
    // allowed), then 0xFF. Needed where the host does not honour IOPL = 3.
    t[102..104].copy_from_slice(&TSS_SIZE.to_le_bytes());
    t[usize::from(TSS_LIMIT)] = 0xFF;
    t
}

fn idt_bytes(layout: &LongModeLayout) -> Vec<u8> {
    let mut idt = Vec::with_capacity(usize::from(IDT_ENTRIES) * 16);
    for v in 0..IDT_ENTRIES {
        let h = layout.handler_gpa(v).to_le_bytes();
        idt.extend_from_slice(&h[0..2]); // offset 15:0
        idt.extend_from_slice(&KERNEL_CS.to_le_bytes());
        idt.push(0); // IST 0: the CPL change loads RSP0 from the TSS
        idt.push(0x8E); // P, DPL0, 64-bit interrupt gate
        idt.extend_from_slice(&h[2..8]); // offset 31:16, offset 63:32
        idt.extend_from_slice(&[0; 4]);
    }
    idt
}

/// Whether the CPU pushes an error code for exception `vector`.
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// The handler for `vector`, padded to 16 bytes with `nop`s.
fn handler_bytes(vector: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(HANDLER_SIZE);
    if has_error_code(vector) {
        h.push(0x5A); // pop rdx            ; rdx = error code
    } else {
        h.extend_from_slice(&[0x31, 0xD2]); // xor edx, edx ; rdx = 0
    }
    h.extend_from_slice(&[0x48, 0x8B, 0x34, 0x24]); // mov rsi, [rsp]  ; rsi = faulting rip
    h.extend_from_slice(&[0xB0, vector]); // mov al, vector
    h.extend_from_slice(&[0xE6, EXC_PORT_U8]); // out EXC_PORT, al ; -> KVM_EXIT_IO
    h.push(0xF4); // hlt
    h.extend_from_slice(&[0xEB, 0xFD]); // jmp -3 (back to hlt)
    h.resize(HANDLER_SIZE, 0x90);
    h
}

/// The CPL0 entry stub ([`Entry::Cpl0Stub`]).
fn stub_bytes() -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&[0x6A, USER_DS_U8]); // push USER_DS          ; SS
    s.extend_from_slice(&[0x41, 0x56]); // push r14                       ; RSP
    s.push(0x68); // push imm32 RFLAGS_CPL3                               ; RFLAGS
    s.extend_from_slice(&RFLAGS_CPL3_U32.to_le_bytes());
    s.extend_from_slice(&[0x6A, USER_CS_U8]); // push USER_CS          ; CS
    s.extend_from_slice(&[0x41, 0x57]); // push r15                       ; RIP
    s.extend_from_slice(&[0x48, 0xCF]); // iretq
    s
}

/// Writes the GDT, TSS, IDT, exception handlers, entry stub and page tables
/// of `layout` through `write(gpa, bytes)`. The kernel stack is not written
/// (its contents do not matter).
pub fn write_boot_area(layout: &LongModeLayout, mut write: impl FnMut(u64, &[u8]) -> io::Result<()>) -> io::Result<()> {
    layout.validate()?;
    write(layout.gdt_gpa(), &gdt_bytes(layout.tss_gpa()))?;
    write(layout.tss_gpa(), &tss_bytes(layout.kernel_stack_top()))?;
    write(layout.idt_gpa(), &idt_bytes(layout))?;
    let code: Vec<u8> = (0..IDT_ENTRIES).flat_map(handler_bytes).collect();
    write(layout.handler_gpa(0), &code)?;
    write(layout.stub_gpa(), &stub_bytes())?;

    let table = |entries: &mut dyn Iterator<Item = u64>| -> Vec<u8> {
        let mut t = vec![0u8; PAGE_BYTES];
        for (i, e) in entries.enumerate() {
            t[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        t
    };
    let user_rw = PTE_P | PTE_RW | PTE_US;
    write(layout.pml4_gpa(), &table(&mut std::iter::once(layout.pdpt_gpa() | user_rw)))?;
    let pds = layout.pd_count();
    write(layout.pdpt_gpa(), &table(&mut (0..pds).map(|i| layout.pd_gpa(i) | user_rw)))?;
    for i in 0..pds {
        let base = i * ONE_GIB;
        let end = layout.identity_map_bytes.min(base + ONE_GIB);
        let mut pages = (0..(end - base).div_ceil(TWO_MIB)).map(|k| (base + k * TWO_MIB) | user_rw | PTE_PS);
        write(layout.pd_gpa(i), &table(&mut pages))?;
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, dpl: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets CPUID (KVM's supported set, which includes long mode), the special
/// registers (CR0/CR3/CR4/EFER, GDT/IDT, TR, segments) and the general
/// registers so that the next `run` executes `entry` at CPL3 in 64-bit mode
/// with `rsp = user_stack`, RFLAGS = [`RFLAGS_CPL3`] (IOPL 3, interrupts off)
/// and `args` in `rdi, rsi, rdx, rcx, r8, r9`. The boot area must already be
/// written ([`write_boot_area`]).
pub fn enter_long_mode(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    layout: &LongModeLayout,
    entry: u64,
    user_stack: u64,
    args: [u64; 6],
) -> io::Result<()> {
    layout.validate()?;
    // KVM refuses EFER.LME without the LM bit in the vCPU's CPUID, and
    // refuses KVM_SET_CPUID2 after the first KVM_RUN unless it is identical
    // to what KVM holds (which has run-time bits filled in): set it only
    // while the vCPU has no long mode in its CPUID.
    if !vcpu_has_long_mode(vcpu) {
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(io::Error::from)?;
        vcpu.set_cpuid2(&cpuid).map_err(io::Error::from)?;
    }

    let mut sregs = vcpu.get_sregs().map_err(io::Error::from)?;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = layout.pml4_gpa();
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs.gdt.base = layout.gdt_gpa();
    sregs.gdt.limit = GDT_ENTRIES * 8 - 1;
    sregs.idt.base = layout.idt_gpa();
    sregs.idt.limit = u16::from(IDT_ENTRIES) * 16 - 1;
    sregs.tr = kvm_segment {
        base: layout.tss_gpa(),
        limit: u32::from(TSS_LIMIT),
        selector: TSS_SEL,
        type_: 0xB, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment { selector: 0, type_: 2, present: 0, unusable: 1, ..sregs.ldt };
    let (cs, ds) = match layout.entry {
        Entry::Direct => (segment(USER_CS, 0xB, 3, true), segment(USER_DS, 0x3, 3, false)),
        Entry::Cpl0Stub => (segment(KERNEL_CS, 0xB, 0, true), segment(KERNEL_DS, 0x3, 0, false)),
    };
    sregs.cs = cs;
    sregs.ss = ds;
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    vcpu.set_sregs(&sregs).map_err(io::Error::from)?;

    let mut regs = kvm_regs {
        rdi: args[0],
        rsi: args[1],
        rdx: args[2],
        rcx: args[3],
        r8: args[4],
        r9: args[5],
        ..Default::default()
    };
    match layout.entry {
        Entry::Direct => {
            regs.rip = entry;
            regs.rsp = user_stack;
            regs.rflags = RFLAGS_CPL3;
        }
        Entry::Cpl0Stub => {
            regs.rip = layout.stub_gpa();
            regs.rsp = layout.kernel_stack_top();
            regs.rflags = 0x2;
            regs.r14 = user_stack;
            regs.r15 = entry;
        }
    }
    vcpu.set_regs(&regs).map_err(io::Error::from)
}

/// Whether the vCPU's CPUID already has leaf 0x8000_0001 with EDX.LM (bit 29).
fn vcpu_has_long_mode(vcpu: &VcpuFd) -> bool {
    vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map(|c| c.as_slice().iter().any(|e| e.function == 0x8000_0001 && e.edx & (1 << 29) != 0))
        .unwrap_or(false)
}

/// What a vCPU exit means for a guest set up by this module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// `out` to `port` (not [`EXC_PORT`]); `data` is the value written
    /// (1, 2 or 4 bytes, zero-extended).
    Io {
        /// The port.
        port: u16,
        /// The value written.
        data: u32,
    },
    /// `in` from `port`; the vCPU reads whatever the run area's data holds.
    IoIn {
        /// The port.
        port: u16,
    },
    /// An exception reached the handler for this vector (an `out` to
    /// [`EXC_PORT`]); [`exception_info`] has the error code, rip and CR2.
    Exception(u8),
    /// `hlt` (only reached after an exception, when the vCPU is run again).
    Hlt,
    /// Triple fault or similar.
    Shutdown,
    /// An access to guest physical `addr` that no memory slot backs.
    Mmio {
        /// Guest physical address.
        addr: u64,
        /// Whether the access was a write.
        write: bool,
    },
    /// Anything else, described.
    Other(String),
}

/// Classifies one `VcpuFd::run` exit.
pub fn classify(exit: &VcpuExit<'_>) -> GuestExit {
    match exit {
        VcpuExit::IoOut(port, data) => {
            let mut v = [0u8; 4];
            let n = data.len().min(4);
            v[..n].copy_from_slice(&data[..n]);
            if *port == EXC_PORT {
                GuestExit::Exception(v[0])
            } else {
                GuestExit::Io { port: *port, data: u32::from_le_bytes(v) }
            }
        }
        VcpuExit::IoIn(port, _) => GuestExit::IoIn { port: *port },
        VcpuExit::Hlt => GuestExit::Hlt,
        VcpuExit::Shutdown => GuestExit::Shutdown,
        VcpuExit::MmioRead(addr, _) => GuestExit::Mmio { addr: *addr, write: false },
        VcpuExit::MmioWrite(addr, _) => GuestExit::Mmio { addr: *addr, write: true },
        other => GuestExit::Other(format!("{other:?}")),
    }
}

/// Runs the vCPU once and classifies the exit. `EINTR`/`EAGAIN` come back as
/// `Other` so a VMM can kick the vCPU with a signal.
pub fn run(vcpu: &mut VcpuFd) -> io::Result<GuestExit> {
    match vcpu.run() {
        Ok(exit) => Ok(classify(&exit)),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(GuestExit::Other(format!("{e}"))),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Details of an exception, read after a [`GuestExit::Exception`] exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExceptionInfo {
    /// The error code (0 for vectors without one, see [`has_error_code`]).
    pub error_code: u64,
    /// `rip` of the faulting instruction (for traps: of the next one).
    pub rip: u64,
    /// CR2: the faulting linear address of a #PF.
    pub cr2: u64,
}

/// Reads the error code (`rdx`), faulting rip (`rsi`) and CR2 the handler
/// left behind. The handler clobbers the guest's `rax`, `rdx` and `rsi`.
pub fn exception_info(vcpu: &VcpuFd) -> io::Result<ExceptionInfo> {
    let regs = vcpu.get_regs().map_err(io::Error::from)?;
    let sregs = vcpu.get_sregs().map_err(io::Error::from)?;
    Ok(ExceptionInfo { error_code: regs.rdx, rip: regs.rsi, cr2: sregs.cr2 })
}

/// A position-independent CPL3 program that dirties pages forever.
///
/// In: `rdi` = first page's gpa (identity mapped), `rsi` = pages per pass,
/// `rdx` = report port, `rcx` = stride in bytes (4096 for every page). Pass
/// `n` (from 1) writes the 64-bit value `n` to the first 8 bytes of each of
/// the `rsi` pages, then does `out dx, eax` with `eax = n`, so the VMM gets
/// one `KVM_EXIT_IO` of 4 bytes per pass; running the vCPU again starts the
/// next pass. Uses `rax`, `r8`, `r9`.
pub fn dirty_forever_program() -> Vec<u8> {
    #[rustfmt::skip]
    let code: Vec<u8> = vec![
        0x31, 0xC0,                               // 0x00: xor eax, eax        ; rax = pass = 0
        // outer (0x02):
        0x48, 0xFF, 0xC0,                         // 0x02: inc rax             ; pass += 1
        0x49, 0x89, 0xF8,                         // 0x05: mov r8, rdi         ; r8 = current page
        0x49, 0x89, 0xF1,                         // 0x08: mov r9, rsi         ; r9 = pages left
        0x4D, 0x85, 0xC9,                         // 0x0b: test r9, r9
        0x74, 0x0B,                               // 0x0e: jz report (0x1b)    ; no pages: just report
        // inner (0x10):
        0x49, 0x89, 0x00,                         // 0x10: mov [r8], rax       ; dirty the page
        0x49, 0x01, 0xC8,                         // 0x13: add r8, rcx         ; next page
        0x49, 0xFF, 0xC9,                         // 0x16: dec r9
        0x75, 0xF5,                               // 0x19: jnz inner (0x10)
        // report (0x1b):
        0xEF,                                     // 0x1b: out dx, eax         ; KVM_EXIT_IO, data = pass
        0xEB, 0xE4,                               // 0x1c: jmp outer (0x02)
    ];
    code
}

/// A position-independent CPL3 program that writes a value to a range of
/// pages once, then reports.
///
/// In: `rdi` = first page's gpa, `rsi` = page count, `rdx` = report port,
/// `rcx` = stride in bytes, `r8` = the 64-bit value. Writes `r8` to the first
/// 8 bytes of each page, then does `out dx, eax` with `eax` = the page count
/// (low 32 bits); running the vCPU again reports again without writing.
/// Uses `rax`, `r9`, `r10`.
pub fn fill_once_program() -> Vec<u8> {
    #[rustfmt::skip]
    let code: Vec<u8> = vec![
        0x4C, 0x89, 0xC0,                         // 0x00: mov rax, r8         ; rax = value
        0x49, 0x89, 0xFA,                         // 0x03: mov r10, rdi        ; r10 = current page
        0x49, 0x89, 0xF1,                         // 0x06: mov r9, rsi         ; r9 = pages left
        0x4D, 0x85, 0xC9,                         // 0x09: test r9, r9
        0x74, 0x0B,                               // 0x0c: jz done (0x19)
        // loop (0x0e):
        0x49, 0x89, 0x02,                         // 0x0e: mov [r10], rax      ; write the value
        0x49, 0x01, 0xCA,                         // 0x11: add r10, rcx        ; next page
        0x49, 0xFF, 0xC9,                         // 0x14: dec r9
        0x75, 0xF5,                               // 0x17: jnz loop (0x0e)
        // done (0x19):
        0x89, 0xF0,                               // 0x19: mov eax, esi        ; eax = page count
        // report (0x1b):
        0xEF,                                     // 0x1b: out dx, eax         ; KVM_EXIT_IO, data = count
        0xEB, 0xFD,                               // 0x1c: jmp report (0x1b)
    ];
    code
}

/// Wraps `code` into a minimal ELF64 x86-64 executable: one `PT_LOAD`
/// segment (R+X) with `p_vaddr = vaddr`, `p_paddr = paddr`, file and memory
/// size `code.len()`, and `e_entry = entry`. No section headers. The code
/// starts at file offset `0x1000 + vaddr % 0x1000` (congruent to `vaddr`
/// modulo the 4 KiB alignment).
pub fn wrap_elf(code: &[u8], vaddr: u64, paddr: u64, entry: u64) -> Vec<u8> {
    const EHDR: u16 = 64;
    const PHDR: u16 = 56;
    let misalign = u16::try_from(vaddr % PAGE).expect("below 4096");
    let offset = PAGE_BYTES + usize::from(misalign);
    let mut f = Vec::with_capacity(offset + code.len());
    // ELF header.
    f.extend_from_slice(&[
        0x7F, b'E', b'L', b'F', 2, /* 64-bit */
        1, /* little endian */
        1, /* version */
    ]);
    f.resize(16, 0); // OS ABI (System V), ABI version, padding
    f.extend_from_slice(&2u16.to_le_bytes()); // e_type = ET_EXEC
    f.extend_from_slice(&0x3Eu16.to_le_bytes()); // e_machine = EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&entry.to_le_bytes()); // e_entry
    f.extend_from_slice(&u64::from(EHDR).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&EHDR.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&PHDR.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    debug_assert_eq!(f.len(), usize::from(EHDR));
    // Program header.
    f.extend_from_slice(&1u32.to_le_bytes()); // p_type = PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // p_flags = R | X
    f.extend_from_slice(&(PAGE + u64::from(misalign)).to_le_bytes()); // p_offset
    f.extend_from_slice(&vaddr.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&paddr.to_le_bytes()); // p_paddr
    f.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    f.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    f.extend_from_slice(&PAGE.to_le_bytes()); // p_align
    debug_assert_eq!(f.len(), usize::from(EHDR + PHDR));
    f.resize(offset, 0);
    f.extend_from_slice(code);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_is_valid_and_small() {
        let l = LongModeLayout::default();
        l.validate().unwrap();
        assert_eq!(l.boot_end(), 0x1B000);
        assert!(l.boot_end() <= TWO_MIB);
    }

    #[test]
    fn bad_layouts_are_refused() {
        let d = LongModeLayout::default();
        assert!(LongModeLayout { boot_gpa: 0x1234, ..d }.validate().is_err());
        assert!(LongModeLayout { identity_map_bytes: 0x1000, ..d }.validate().is_err());
        assert!(LongModeLayout { identity_map_bytes: 1024 * ONE_GIB, ..d }.validate().is_err());
        assert!(LongModeLayout { boot_gpa: 16 * ONE_GIB, ..d }.validate().is_err());
    }

    #[test]
    fn handlers_fit_their_slots() {
        for v in 0..IDT_ENTRIES {
            assert_eq!(handler_bytes(v).len(), HANDLER_SIZE);
        }
        assert!(stub_bytes().len() <= 16);
    }

    #[test]
    fn page_tables_map_the_whole_range() {
        let l = LongModeLayout { identity_map_bytes: 10 * ONE_GIB + TWO_MIB, ..Default::default() };
        let mut mem = std::collections::BTreeMap::new();
        write_boot_area(&l, |gpa, b| {
            mem.insert(gpa, b.to_vec());
            Ok(())
        })
        .unwrap();
        let entry = |table: u64, i: u64| {
            u64::from_le_bytes(mem[&table][usize::try_from(i).unwrap() * 8..][..8].try_into().unwrap())
        };
        let walk = |a: u64| -> Option<u64> {
            let e = entry(l.pml4_gpa(), a >> 39);
            if e & PTE_P == 0 {
                return None;
            }
            let e = entry(e & !0xFFF, (a >> 30) & 511);
            if e & PTE_P == 0 {
                return None;
            }
            let e = entry(e & !0xFFF, (a >> 21) & 511);
            (e & (PTE_P | PTE_RW | PTE_US | PTE_PS) == 0x87).then_some((e & !0x1F_FFFF) | (a & 0x1F_FFFF))
        };
        for a in [0, 0x1234, 2 * ONE_GIB - 8, 4 * ONE_GIB, 8 * ONE_GIB + 0x5000, 10 * ONE_GIB + TWO_MIB - 1] {
            assert_eq!(walk(a), Some(a), "{a:#x}");
        }
        assert_eq!(walk(10 * ONE_GIB + TWO_MIB), None);
        assert_eq!(walk(11 * ONE_GIB), None);
    }

    #[test]
    fn elf_header_fields() {
        let e = wrap_elf(&[0x90, 0xF4], 0x40_0000, 0x40_0000, 0x40_0000);
        assert_eq!(&e[..4], b"\x7fELF");
        assert_eq!(u64::from_le_bytes(e[24..32].try_into().unwrap()), 0x40_0000);
        assert_eq!(&e[0x1000..], &[0x90, 0xF4]);
    }
}
