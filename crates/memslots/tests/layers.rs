//! `Layered`: every hook reaches the layers in order, an inner prepare
//! failure aborts the outer layer exactly once, and teardown runs the inner
//! layer first, so a panicking outer `destroy_vm` cannot skip the inner one
//! (the kernel VM, in `memslots_kvm::KvmGuestVm`).

use memslots::{ArchHooks, Config, Errno, Layered, MemoryChange, MemorySlot, SlotDraft, UserMemoryRegion, Vm};
use std::sync::{Arc, Mutex};

type Log = Arc<Mutex<Vec<String>>>;

#[derive(Debug)]
struct Rec {
    name: &'static str,
    log: Log,
    fail_prepare: bool,
    panic_on_destroy: bool,
}

impl ArchHooks for Rec {
    type SlotData = ();
    fn prepare_memory_region(
        &self,
        change: MemoryChange,
        _old: Option<&MemorySlot<()>>,
        _new: Option<&mut SlotDraft<()>>,
    ) -> Result<(), Errno> {
        self.log.lock().unwrap().push(format!("{} prepare {change:?}", self.name));
        if self.fail_prepare {
            return Err(Errno::ENOSPC);
        }
        Ok(())
    }
    fn abort_memory_region(&self, change: MemoryChange, _old: Option<&MemorySlot<()>>, _new: Option<&SlotDraft<()>>) {
        self.log.lock().unwrap().push(format!("{} abort {change:?}", self.name));
    }
    fn commit_memory_region(&self, change: MemoryChange, _old: Option<&MemorySlot<()>>, _new: Option<&MemorySlot<()>>) {
        self.log.lock().unwrap().push(format!("{} commit {change:?}", self.name));
    }
    fn destroy_vm(&self) {
        self.log.lock().unwrap().push(format!("{} destroy", self.name));
        assert!(!self.panic_on_destroy, "{} panics in destroy_vm", self.name);
    }
}

fn layered(log: &Log, inner_fails: bool, outer_panics: bool) -> Vm<Layered<Rec, Rec>> {
    let outer = Rec { name: "outer", log: Arc::clone(log), fail_prepare: false, panic_on_destroy: outer_panics };
    let inner = Rec { name: "inner", log: Arc::clone(log), fail_prepare: inner_fails, panic_on_destroy: false };
    Vm::with_hooks(Config::default(), Layered::new(outer, inner)).unwrap()
}

#[test]
fn hooks_run_in_order_and_an_inner_failure_aborts_the_outer_layer_once() {
    let log = Log::default();
    let vm = layered(&log, false, false);
    vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0x1000, 0x1000_0000)).unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        ["outer prepare Create", "inner prepare Create", "outer commit Create", "inner commit Create"]
    );
    log.lock().unwrap().clear();
    let vm2 = layered(&log, true, false);
    let e = vm2.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0x1000, 0x1000_0000)).unwrap_err();
    assert_eq!(e.errno(), Errno::ENOSPC);
    assert_eq!(*log.lock().unwrap(), ["outer prepare Create", "inner prepare Create", "outer abort Create"]);
    assert!(vm2.id_to_slot_desc(0, 0).is_none());
    drop((vm, vm2));
}

#[test]
fn teardown_runs_the_inner_layer_first_even_if_the_outer_one_panics() {
    let log = Log::default();
    let vm = layered(&log, false, true);
    vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0x1000, 0x1000_0000)).unwrap();
    log.lock().unwrap().clear();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(vm)));
    assert!(r.is_err(), "the outer layer's panic propagates");
    assert_eq!(*log.lock().unwrap(), ["inner destroy", "outer destroy"]);
}
