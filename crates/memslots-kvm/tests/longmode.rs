//! The long-mode helper on a plain kvm-ioctls VM (no memslots types): CPL3
//! programs write pages and report through I/O exits, exceptions reach the
//! CPL0 handlers, the identity map reaches slots at 4 GiB and just below
//! 16 GiB, the dirtying program is fast, and the ELF wrapper loads with
//! linux-loader.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use memslots_kvm::longmode::{
    dirty_forever_program, enter_long_mode, exception_info, fill_once_program, run, wrap_elf, write_boot_area, Entry,
    GuestExit, LongModeLayout,
};
use std::time::{Duration, Instant};

const LOW_SIZE: u64 = 64 << 20;
const HIGH_GPA: u64 = 4 << 30;
const HIGH_SIZE: u64 = 2 << 20;
/// The last 2 MiB of the default 16 GiB identity map.
const TOP_GPA: u64 = (16 << 30) - (2 << 20);
const CODE_GPA: u64 = 0x40_0000;
const STACK_TOP: u64 = 0x3F_F000;
const DATA_GPA: u64 = 0x100_0000;
const REPORT_PORT: u16 = 0x10;

fn skip(name: &str) -> bool {
    if memslots_kvm::kvm_available() {
        return false;
    }
    eprintln!("SKIP {name}: /dev/kvm is not usable");
    true
}

/// Anonymous host memory, unmapped on drop.
struct Anon {
    ptr: *mut u8,
    len: usize,
}

impl Anon {
    fn new(len: u64) -> Anon {
        let len = usize::try_from(len).unwrap();
        // SAFETY: a fresh private anonymous mapping, checked for failure.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Anon { ptr: p.cast(), len }
    }
    fn write(&self, off: u64, b: &[u8]) -> std::io::Result<()> {
        let off = usize::try_from(off).unwrap();
        if off.checked_add(b.len()).is_none_or(|e| e > self.len) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "outside the mapping"));
        }
        // SAFETY: in bounds (checked above); the vCPU is not running while the test writes.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.add(off), b.len()) };
        Ok(())
    }
    fn read_u64(&self, off: u64) -> u64 {
        let off = usize::try_from(off).unwrap();
        assert!(off + 8 <= self.len);
        // SAFETY: in bounds and 8-byte aligned (page offsets); the vCPU is stopped.
        unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<u64>()) }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; the VM using it is dropped first (field order).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A VM with 64 MiB of RAM at gpa 0 (slot 0), 2 MiB at 4 GiB (slot 1) and
/// 2 MiB at 16 GiB - 2 MiB (slot 2, the top of the default identity map).
struct TestVm {
    vcpu: VcpuFd,
    vm: VmFd,
    kvm: Kvm,
    low: Anon,
    high: Anon,
    top: Anon,
    layout: LongModeLayout,
}

impl TestVm {
    fn new(log_dirty: bool, entry: Entry) -> TestVm {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create_vm");
        let low = Anon::new(LOW_SIZE);
        let high = Anon::new(HIGH_SIZE);
        let top = Anon::new(HIGH_SIZE);
        let flags = if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for (slot, gpa, m) in [(0, 0, &low), (1, HIGH_GPA, &high), (2, TOP_GPA, &top)] {
            let r = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: gpa,
                memory_size: m.len as u64,
                userspace_addr: m.ptr as u64,
            };
            // SAFETY: the mapping outlives the VM (TestVm drops `vm` before `low`/`high`).
            unsafe { vm.set_user_memory_region(r) }.expect("set_user_memory_region");
        }
        let vcpu = vm.create_vcpu(0).expect("create_vcpu");
        let layout = LongModeLayout { entry, ..LongModeLayout::default() };
        let t = TestVm { vcpu, vm, kvm, low, high, top, layout };
        write_boot_area(&t.layout, |gpa, b| t.write(gpa, b)).expect("write_boot_area");
        t
    }
    fn write(&self, gpa: u64, b: &[u8]) -> std::io::Result<()> {
        if gpa >= TOP_GPA {
            self.top.write(gpa - TOP_GPA, b)
        } else if gpa >= HIGH_GPA {
            self.high.write(gpa - HIGH_GPA, b)
        } else {
            self.low.write(gpa, b)
        }
    }
    fn read_u64(&self, gpa: u64) -> u64 {
        if gpa >= TOP_GPA {
            self.top.read_u64(gpa - TOP_GPA)
        } else if gpa >= HIGH_GPA {
            self.high.read_u64(gpa - HIGH_GPA)
        } else {
            self.low.read_u64(gpa)
        }
    }
    fn start(&mut self, code: &[u8], args: [u64; 6]) {
        self.write(CODE_GPA, code).expect("load code");
        enter_long_mode(&self.kvm, &self.vcpu, &self.layout, CODE_GPA, STACK_TOP, args).expect("enter_long_mode");
    }
    fn run(&mut self) -> GuestExit {
        run(&mut self.vcpu).expect("KVM_RUN")
    }
}

fn fill_writes_pages_and_reports(entry: Entry) {
    let mut t = TestVm::new(false, entry);
    let pages = 64;
    t.start(&fill_once_program(), [DATA_GPA, pages, u64::from(REPORT_PORT), 4096, 0x1122_3344_5566_7788, 0]);
    assert_eq!(t.run(), GuestExit::Io { port: REPORT_PORT, data: 64 });
    for p in 0..pages {
        assert_eq!(t.read_u64(DATA_GPA + p * 4096), 0x1122_3344_5566_7788, "page {p}");
    }
    assert_eq!(t.read_u64(DATA_GPA + pages * 4096), 0, "page after the range");
    // Running again reports again and writes nothing.
    assert_eq!(t.run(), GuestExit::Io { port: REPORT_PORT, data: 64 });

    // The identity map reaches the slot at 4 GiB.
    t.start(&fill_once_program(), [HIGH_GPA + 0x1000, 16, u64::from(REPORT_PORT), 8192, 0xABCD, 0]);
    assert_eq!(t.run(), GuestExit::Io { port: REPORT_PORT, data: 16 });
    for p in 0..16 {
        assert_eq!(t.read_u64(HIGH_GPA + 0x1000 + p * 8192), 0xABCD, "high page {p}");
        assert_eq!(t.read_u64(HIGH_GPA + p * 8192), 0, "high page {p} gap");
    }

    // And the last page below 16 GiB.
    let last = TOP_GPA + HIGH_SIZE - 4096;
    t.start(&fill_once_program(), [last, 1, u64::from(REPORT_PORT), 4096, 0xF00D, 0]);
    assert_eq!(t.run(), GuestExit::Io { port: REPORT_PORT, data: 1 });
    assert_eq!(t.read_u64(last), 0xF00D);
}

#[test]
fn fill_program_writes_pages_and_reports() {
    if skip("fill_program_writes_pages_and_reports") {
        return;
    }
    fill_writes_pages_and_reports(Entry::Direct);
}

#[test]
fn cpl0_stub_entry_works_too() {
    if skip("cpl0_stub_entry_works_too") {
        return;
    }
    fill_writes_pages_and_reports(Entry::Cpl0Stub);
}

#[test]
fn dirty_forever_reports_each_pass() {
    if skip("dirty_forever_reports_each_pass") {
        return;
    }
    let mut t = TestVm::new(false, Entry::Direct);
    let pages = 32;
    t.start(&dirty_forever_program(), [DATA_GPA, pages, u64::from(REPORT_PORT), 4096, 0, 0]);
    for pass in 1..=5u32 {
        assert_eq!(t.run(), GuestExit::Io { port: REPORT_PORT, data: pass });
        for p in 0..pages {
            assert_eq!(t.read_u64(DATA_GPA + p * 4096), u64::from(pass), "pass {pass} page {p}");
        }
    }
}

#[test]
fn exceptions_reach_the_handlers() {
    if skip("exceptions_reach_the_handlers") {
        return;
    }
    let mut t = TestVm::new(false, Entry::Direct);
    // ud2 -> #UD (6), no error code.
    t.start(&[0x0F, 0x0B], [0; 6]);
    assert_eq!(t.run(), GuestExit::Exception(6));
    let info = exception_info(&t.vcpu).unwrap();
    assert_eq!((info.rip, info.error_code), (CODE_GPA, 0));
    // The handler then halts, and stays halted.
    assert_eq!(t.run(), GuestExit::Hlt);

    // hlt at CPL3 -> #GP (13), error code 0.
    t.start(&[0x90, 0xF4], [0; 6]);
    assert_eq!(t.run(), GuestExit::Exception(13));
    let info = exception_info(&t.vcpu).unwrap();
    assert_eq!((info.rip, info.error_code), (CODE_GPA + 1, 0));

    // A write beyond the 16 GiB identity map -> #PF (14): error code
    // 0b110 (not present, write, user), CR2 = the address.
    let beyond = LongModeLayout::default().identity_map_bytes + 0x1230;
    let mut code = vec![0x48, 0xBF]; // mov rdi, imm64
    code.extend_from_slice(&beyond.to_le_bytes());
    code.extend_from_slice(&[0x48, 0x89, 0x07]); // mov [rdi], rax
    t.start(&code, [0; 6]);
    assert_eq!(t.run(), GuestExit::Exception(14));
    let info = exception_info(&t.vcpu).unwrap();
    assert_eq!(info, memslots_kvm::longmode::ExceptionInfo { error_code: 0b110, rip: CODE_GPA + 10, cr2: beyond });

    // A mapped but unbacked gpa (inside the identity map, no slot) is MMIO.
    let mut code = vec![0x48, 0xBF];
    code.extend_from_slice(&(2u64 << 30).to_le_bytes());
    code.extend_from_slice(&[0x48, 0x89, 0x07]);
    t.start(&code, [0; 6]);
    assert_eq!(t.run(), GuestExit::Mmio { addr: 2 << 30, write: true });
}

fn dirty_rate(log: bool) {
    let mut t = TestVm::new(log, Entry::Direct);
    let pages: u64 = 8192; // 32 MiB of the 64 MiB slot
    t.start(&dirty_forever_program(), [DATA_GPA, pages, u64::from(REPORT_PORT), 4096, 0, 0]);
    let start = Instant::now();
    let mut passes = 0u64;
    let mut harvested = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        let exit = t.run();
        passes += 1;
        assert_eq!(exit, GuestExit::Io { port: REPORT_PORT, data: u32::try_from(passes).unwrap() });
        if log {
            let bitmap = t.vm.get_dirty_log(0, usize::try_from(LOW_SIZE).unwrap()).expect("get_dirty_log");
            let first = DATA_GPA / 4096;
            let dirty = (first..first + pages).filter(|&p| bitmap[(p / 64) as usize] >> (p % 64) & 1 == 1).count();
            assert_eq!(dirty as u64, pages, "pass {passes}: every page dirty");
            harvested += dirty as u64;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = (passes * pages) as f64 / secs;
    eprintln!(
        "dirty_forever (dirty log {log}): {passes} passes x {pages} pages in {secs:.2} s = {rate:.0} page writes/s{}",
        if log { format!(", {harvested} dirty bits harvested") } else { String::new() }
    );
    assert!(rate >= 10_000.0, "{rate:.0} page writes/s < 10,000");
    assert_eq!(t.read_u64(DATA_GPA), passes);
}

#[test]
fn dirty_forever_is_fast() {
    if skip("dirty_forever_is_fast") {
        return;
    }
    dirty_rate(false);
}

#[test]
fn dirty_forever_is_fast_with_dirty_logging() {
    if skip("dirty_forever_is_fast_with_dirty_logging") {
        return;
    }
    dirty_rate(true);
}

#[test]
fn elf_loads_with_linux_loader() {
    use linux_loader::loader::{elf::Elf, KernelLoader};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    let code = dirty_forever_program();
    let elf = wrap_elf(&code, CODE_GPA, CODE_GPA, CODE_GPA);
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let r = Elf::load(&mem, None, &mut std::io::Cursor::new(&elf), None).expect("Elf::load");
    assert_eq!(r.kernel_load, GuestAddress(CODE_GPA));
    assert_eq!(r.kernel_end, CODE_GPA + code.len() as u64);
    let mut loaded = vec![0u8; code.len()];
    mem.read_slice(&mut loaded, GuestAddress(CODE_GPA)).unwrap();
    assert_eq!(loaded, code);

    // An entry inside the segment and a load address other than vaddr.
    let elf = wrap_elf(&code, 0xFFFF_8000_0040_0000, 0x20_0000, 0xFFFF_8000_0040_0002);
    let r = Elf::load(&mem, None, &mut std::io::Cursor::new(&elf), None).expect("Elf::load");
    assert_eq!(r.kernel_load, GuestAddress(0xFFFF_8000_0040_0002));
    mem.read_slice(&mut loaded, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(loaded, code);
}

#[test]
fn elf_loaded_program_runs() {
    if skip("elf_loaded_program_runs") {
        return;
    }
    use linux_loader::loader::{elf::Elf, KernelLoader};
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    // Load through linux-loader into a GuestMemoryMmap, then copy the
    // loaded bytes into the test VM at the same gpa and run them.
    let elf = wrap_elf(&fill_once_program(), CODE_GPA, CODE_GPA, CODE_GPA);
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let r = Elf::load(&mem, None, &mut std::io::Cursor::new(&elf), None).unwrap();
    let mut code = vec![0u8; usize::try_from(r.kernel_end - CODE_GPA).unwrap()];
    vm_memory::Bytes::read_slice(&mem, &mut code, GuestAddress(CODE_GPA)).unwrap();
    let mut t = TestVm::new(false, Entry::Direct);
    t.start(&code, [DATA_GPA, 3, u64::from(REPORT_PORT), 4096, 7, 0]);
    assert_eq!(t.run(), GuestExit::Io { port: REPORT_PORT, data: 3 });
    assert_eq!(t.read_u64(DATA_GPA + 2 * 4096), 7);
}

#[test]
fn port_io_at_cpl3_exits_to_the_vmm() {
    if skip("port_io_at_cpl3_exits_to_the_vmm") {
        return;
    }
    for entry in [Entry::Direct, Entry::Cpl0Stub] {
        let mut t = TestVm::new(false, entry);
        #[rustfmt::skip]
        let code = [
            0xBA, 0x34, 0x12, 0, 0, // mov edx, 0x1234
            0xB0, 0x5A,             // mov al, 0x5a
            0xEE,                   // out dx, al
            0xEC,                   // in al, dx
            0xEB, 0xFE,             // jmp $
        ];
        t.start(&code, [0; 6]);
        assert_eq!(t.run(), GuestExit::Io { port: 0x1234, data: 0x5A }, "{entry:?}");
        assert_eq!(t.run(), GuestExit::IoIn { port: 0x1234 }, "{entry:?}");
    }
}
