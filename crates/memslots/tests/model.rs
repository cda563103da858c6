//! Property tests of the library against a deliberately naive reference model
//! of `KVM_SET_USER_MEMORY_REGION` (Linux 6.18 `__kvm_set_memory_region`,
//! x86-64): a `Vec` of slots per address space, linear scans everywhere.
//!
//! Random operation sequences (mostly drawn from small pools, so overlaps,
//! id reuse, moves, flag changes, no-ops and deletes are frequent) are applied
//! to both. After every operation the verdicts (outcome or errno, and the
//! library's error kind), the generations, the page count and the lookups of
//! persistent vCPU handles are compared; after every operation (small
//! profiles) or every few (the many-slots profile) every lookup and iteration
//! is compared over a dense set of probes.
//!
//! A recording [`ArchHooks`] implementation additionally checks the hook
//! calls of every update (prepare, INVALID publish + flush, publishes with
//! their generations, commit) and the per-slot arch data, and injects
//! prepare failures, whose rollback must restore the previous state exactly.

use proptest::test_runner::{Config as PtConfig, TestRunner};

include!("common/model.rs");

// ---------------------------------------------------------------------------
// Operation generation (proptest strategies)
// ---------------------------------------------------------------------------

fn id_strategy(p: Profile) -> BoxedStrategy<u16> {
    let us = p.cfg.user_slots;
    prop_oneof![
        2 * p.dense => 0..p.ids,
        1 => Just(us - 1),
        1 => Just(us),
        1 => Just(us + 2),
        1 => Just(0xffff),
        1 => any::<u16>(),
    ]
    .boxed()
}

fn as_strategy(p: Profile) -> BoxedStrategy<u16> {
    let nr = p.cfg.nr_address_spaces;
    prop_oneof![
        p.dense => 0..nr,
        1 => nr..nr + 2,
        1 => any::<u16>(),
    ]
    .boxed()
}

fn slot_strategy(p: Profile) -> BoxedStrategy<u32> {
    (as_strategy(p), id_strategy(p)).prop_map(|(a, i)| (u32::from(a) << 16) | u32::from(i)).boxed()
}

fn flags_strategy(p: Profile) -> BoxedStrategy<u32> {
    prop_oneof![
        2 * p.dense => prop::sample::select(vec![0, LOG, RO, LOG | RO]),
        1 => Just(4u32),
        1 => Just(1u32 << 16),
        1 => any::<u32>(),
    ]
    .boxed()
}

fn dense_gpa(p: Profile) -> BoxedStrategy<u64> {
    (0..p.gpa_slots).prop_map(move |k| k * p.gpa_step).boxed()
}

fn gpa_strategy(p: Profile) -> BoxedStrategy<u64> {
    let top = (p.max_gfn() + 1) * PAGE;
    prop_oneof![
        p.dense => dense_gpa(p),
        1 => (dense_gpa(p), prop::sample::select(vec![1u64, 0x800, 0xfff])).prop_map(|(g, o)| g + o),
        1 => prop::sample::select(vec![u64::MAX, ALIGNED_MAX, (ALIGNED_MAX) - 0x3000, 1 << 63, (1 << 63) + 0x1000]),
        // Around the highest gfn the MMU can map.
        1 => (1u64..8).prop_map(move |k| top - k * PAGE),
        1 => prop::sample::select(vec![top, top + PAGE, top * 2]),
        1 => any::<u64>(),
    ]
    .boxed()
}

fn size_strategy(p: Profile) -> BoxedStrategy<u64> {
    prop_oneof![
        2 => Just(0u64),
        p.dense => (1..=p.max_pages).prop_map(|n| n * PAGE),
        1 => (0..=p.max_pages, prop::sample::select(vec![1u64, 0x800, 0xfff])).prop_map(|(n, o)| n * PAGE + o),
        // KVM_MEM_MAX_NR_PAGES and one more.
        1 => prop::sample::select(vec![((1u64 << 31) - 1) * PAGE, (1u64 << 31) * PAGE]),
        1 => prop::sample::select(vec![ALIGNED_MAX, 1 << 63, 1 << 47]),
        1 => any::<u64>(),
    ]
    .boxed()
}

fn hva_strategy(p: Profile) -> BoxedStrategy<u64> {
    let limit = p.cfg.user_addr_limit;
    prop_oneof![
        p.dense => (0..p.hva_slots).prop_map(|k| HVA_BASE + k * HVA_STEP),
        1 => Just(0u64),
        1 => (0..p.hva_slots, prop::sample::select(vec![1u64, 0x10, 0x800])).prop_map(|(k, o)| HVA_BASE + k * HVA_STEP + o),
        // Around the user address limit.
        1 => (0u64..8).prop_map(move |k| limit - k * PAGE),
        1 => prop::sample::select(vec![limit + PAGE, 1 << 47, 1 << 63, ALIGNED_MAX]),
        1 => any::<u64>(),
    ]
    .boxed()
}

fn fresh_strategy(p: Profile) -> BoxedStrategy<Op> {
    (slot_strategy(p), flags_strategy(p), gpa_strategy(p), size_strategy(p), hva_strategy(p))
        .prop_map(|(slot, flags, gpa, size, hva)| Op::Fresh(UserMemoryRegion::new(slot, flags, gpa, size, hva)))
        .boxed()
}

fn reuse_strategy(p: Profile) -> BoxedStrategy<Op> {
    let slot = prop_oneof![8 => Just(None), 2 => slot_strategy(p).prop_map(Some)];
    let gpa = prop_oneof![13 => Just(None), 6 => dense_gpa(p).prop_map(Some), 1 => gpa_strategy(p).prop_map(Some)];
    let flags = prop_oneof![
        12 => Just(FlagsMod::Same),
        4 => Just(FlagsMod::Toggle(LOG)),
        1 => Just(FlagsMod::Toggle(RO)),
        1 => Just(FlagsMod::Toggle(LOG | RO)),
        2 => flags_strategy(p).prop_map(FlagsMod::Set),
    ];
    let size = prop_oneof![
        15 => Just(None),
        3 => Just(Some(0u64)),
        2 => size_strategy(p).prop_map(Some),
    ];
    let hva = prop_oneof![9 => Just(None), 1 => hva_strategy(p).prop_map(Some)];
    (any::<usize>(), slot, gpa, flags, size, hva)
        .prop_map(|(pick, slot, gpa, flags, size, hva)| Op::Reuse { pick, slot, gpa, flags, size, hva })
        .boxed()
}

fn op_strategy(p: Profile) -> BoxedStrategy<Op> {
    prop_oneof![p.fresh => fresh_strategy(p), p.reuse => reuse_strategy(p)].boxed()
}

/// One operation and whether the arch prepare hook fails on it.
fn inject_strategy(p: Profile) -> BoxedStrategy<Option<Errno>> {
    if p.inject == 0 {
        return Just(None).boxed();
    }
    prop_oneof![
        16 => Just(None),
        p.inject => prop::sample::select(vec![Errno::ENOMEM, Errno::EIO, Errno::EFAULT]).prop_map(Some),
    ]
    .boxed()
}

fn ops_strategy(p: Profile, max_len: usize) -> BoxedStrategy<Vec<Step>> {
    prop::collection::vec((op_strategy(p), inject_strategy(p)).prop_map(|(op, inject)| Step { op, inject }), 1..max_len)
        .boxed()
}

/// Deletes of existing slots, mostly.
fn shrink_op_strategy(p: Profile) -> BoxedStrategy<Op> {
    let delete = any::<usize>().prop_map(|pick| Op::Reuse {
        pick,
        slot: None,
        gpa: None,
        flags: FlagsMod::Same,
        size: Some(0),
        hva: None,
    });
    prop_oneof![9 => delete, 1 => op_strategy(p)].boxed()
}

/// Alternating phases of growth (the profile's usual mix, mostly creates)
/// and shrinkage (mostly deletes), so the indexes grow past several blocks
/// and then shrink, merging blocks and repacking the hva tree.
fn phased_ops_strategy(p: Profile, phases: usize, phase_len: usize) -> BoxedStrategy<Vec<Step>> {
    let phase = prop_oneof![
        prop::collection::vec(op_strategy(p), 1..phase_len),
        prop::collection::vec(shrink_op_strategy(p), 1..phase_len),
    ];
    prop::collection::vec(phase, 1..phases)
        .prop_map(|ps| ps.into_iter().flatten().map(|op| Step { op, inject: None }).collect())
        .boxed()
}

fn pt_config(cases: u32) -> PtConfig {
    // No regression files: this test may only create its own source file.
    PtConfig { cases, failure_persistence: None, max_shrink_iters: 4096, ..PtConfig::default() }
}

proptest! {
    #![proptest_config(pt_config(512))]

    /// Two address spaces (x86 with SMM), 16 user slots.
    #[test]
    fn model_two_address_spaces(ops in ops_strategy(Profile::small(2), 200)) {
        run(&Profile::small(2), &ops, NoArch)?;
    }

    /// One address space, 16 user slots.
    #[test]
    fn model_one_address_space(ops in ops_strategy(Profile::small(1), 200)) {
        run(&Profile::small(1), &ops, NoArch)?;
    }
}

proptest! {
    #![proptest_config(pt_config(32))]

    /// Hundreds of slots per address space (gfn index blocks split and merge).
    #[test]
    fn model_many_slots(ops in phased_ops_strategy(Profile::many(), 10, 800)) {
        run(&Profile::many(), &ops, NoArch)?;
    }
}

proptest! {
    #![proptest_config(pt_config(256))]

    /// Recording hooks, with prepare failures injected: hook calls, arch data
    /// and rollbacks, two address spaces.
    #[test]
    fn model_hooks_two_address_spaces(ops in ops_strategy(Profile::injecting(2), 200)) {
        run(&Profile::injecting(2), &ops, Recorder::default())?;
    }

    /// The same with one address space.
    #[test]
    fn model_hooks_one_address_space(ops in ops_strategy(Profile::injecting(1), 200)) {
        run(&Profile::injecting(1), &ops, Recorder::default())?;
    }
}

// ---------------------------------------------------------------------------
// Errors leave the state unchanged
// ---------------------------------------------------------------------------

/// Everything observable about the slots: per address space the slots (with
/// whether they carry a bitmap), the generations, the page count.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    slots: Vec<Vec<(MSlot, bool)>>,
    gens: Vec<u64>,
    pages: u64,
    usage_slots: usize,
}

fn snapshot(vm: &Vm) -> Snapshot {
    let g = vm.read();
    let nr = vm.nr_address_spaces();
    Snapshot {
        slots: (0..nr)
            .map(|a| g.slots(a).map(|s| (MSlot::of(s.desc()), s.dirty_bitmap().is_some())).collect())
            .collect(),
        gens: (0..nr).map(|a| vm.generation(a).unwrap()).collect(),
        pages: vm.nr_memslot_pages(),
        usage_slots: vm.memory_usage().slots,
    }
}

/// Without consulting the model: every failing request leaves the slots, the
/// generations and the page count as they were. The one exception is KVM's:
/// a MOVE refused by the x86 max-gfn check (which runs after the INVALID copy
/// was published) publishes twice, so its generation advances by two steps.
fn errors_leave_state_unchanged(p: &Profile, ops: &[Step]) -> Result<(), TestCaseError> {
    let vm = Vm::new(p.cfg).unwrap();
    let mut shadow = Model::new(p.cfg); // only to resolve `Op::Reuse`
    let mut history = History::default();
    let nr = u64::from(p.cfg.nr_address_spaces);
    for (step, Step { op, .. }) in ops.iter().enumerate() {
        let r = resolve(op, &shadow, &history);
        let _ = shadow.apply(&r);
        let before = snapshot(&vm);
        let sid = memslots::SlotId::from_raw(r.slot);
        let existed = vm.id_to_slot_desc(sid.as_id, sid.id).is_some();
        let got = vm.set_user_memory_region(&r);
        let after = snapshot(&vm);
        match got {
            Ok(Outcome::Unchanged) => prop_assert_eq!(&after, &before, "step {}: no-op {:x?} changed state", step, r),
            Ok(Outcome::Changed(_)) => {
                if let Some(s) = vm.id_to_slot_desc(sid.as_id, sid.id) {
                    history.record(MSlot::of(&s));
                }
            }
            Err(Error::GfnBeyondMax { .. }) if existed => {
                let mut expect = before;
                let g = &mut expect.gens[usize::from(sid.as_id)];
                *g += 2 * nr;
                prop_assert_eq!(&after, &expect, "step {}: failed move {:x?}", step, r);
            }
            Err(e) => prop_assert_eq!(&after, &before, "step {}: failed {:x?} ({}) changed state", step, r, e),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(pt_config(256))]

    #[test]
    fn errors_leave_state_unchanged_two_spaces(ops in ops_strategy(Profile::small(2), 200)) {
        errors_leave_state_unchanged(&Profile::small(2), &ops)?;
    }

    #[test]
    fn errors_leave_state_unchanged_one_space(ops in ops_strategy(Profile::small(1), 200)) {
        errors_leave_state_unchanged(&Profile::small(1), &ops)?;
    }
}

// ---------------------------------------------------------------------------
// The generator reaches every check
// ---------------------------------------------------------------------------

fn verdict_name(v: &Verdict) -> String {
    match v {
        Ok(o) => format!("{o:?}"),
        Err(Reject::Overlap(_)) => "Overlap".to_owned(),
        Err(r) => format!("{r:?}"),
    }
}

/// The strategy must reach every outcome and every reachable check (all but
/// the total-pages overflow, which needs 2^64 pages of slots), so the
/// properties above are not vacuous.
#[test]
fn generator_reaches_every_check() {
    let mut runner = TestRunner::deterministic();
    for p in [Profile::small(2), Profile::small(1), Profile::many()] {
        let mut hist: BTreeMap<String, usize> = BTreeMap::new();
        let mut moves_beyond_max = 0usize;
        let (mut max_slots, mut shrinks, mut high) = (0usize, 0usize, false);
        let strat = if p.full_every == 1 { ops_strategy(p, 200) } else { phased_ops_strategy(p, 10, 800) };
        for _ in 0..64 {
            let ops = strat.new_tree(&mut runner).unwrap().current();
            let mut model = Model::new(p.cfg);
            let mut history = History::default();
            for Step { op, .. } in &ops {
                let r = resolve(op, &model, &history);
                let sid = memslots::SlotId::from_raw(r.slot);
                let existed = u16::try_from(r.slot >> 16).ok().and_then(|a| model.by_id(a, sid.id)).is_some();
                let v = model.apply(&r);
                if v == Err(Reject::GfnBeyondMax) && existed {
                    moves_beyond_max += 1;
                }
                if let Some(s) = model.by_id(sid.as_id, sid.id) {
                    if v.is_ok() {
                        history.record(s);
                    }
                }
                *hist.entry(verdict_name(&v)).or_default() += 1;
                let most = model.spaces.iter().map(Vec::len).max().unwrap_or(0);
                // Count falls from above 3 blocks' worth to below one.
                max_slots = max_slots.max(most);
                if most > 3 * 64 {
                    high = true;
                } else if most < 40 && high {
                    high = false;
                    shrinks += 1;
                }
            }
        }
        println!(
            "{:?} address spaces, {} user slots: {hist:#?}, failed moves beyond max gfn: {moves_beyond_max}, most slots in a space: {max_slots}, shrinks: {shrinks}",
            p.cfg.nr_address_spaces, p.cfg.user_slots
        );
        if p.full_every != 1 {
            assert!(max_slots > 3 * 64 && shrinks > 0, "the many-slots profile must grow and shrink the indexes");
        }
        let mut expected = vec![
            "Changed(Create)",
            "Changed(Delete)",
            "Changed(Move)",
            "Changed(FlagsOnly)",
            "Unchanged",
            "Flags",
            "SlotId",
            "UnalignedSize",
            "UnalignedGpa",
            "BadHva",
            "GpaWraps",
            "TooManyPages",
            "DeleteMissing",
            "ChangeHva",
            "ChangeSize",
            "ChangeReadonly",
            "Overlap",
            "GfnBeyondMax",
        ];
        if p.cfg.nr_address_spaces < 0xffff {
            expected.push("AddressSpace");
        }
        for e in expected {
            assert!(hist.get(e).copied().unwrap_or(0) > 0, "{e} never reached with {p:?}: {hist:?}");
        }
        if p.full_every == 1 {
            assert!(moves_beyond_max > 0, "no MOVE beyond the max gfn with {p:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// Targeted cases
// ---------------------------------------------------------------------------

/// A MOVE refused by the max-gfn check: the slot stays where it was, usable
/// (not INVALID) in both sets, and the generation advanced by two publishes
/// (KVM's kvm_set_memslot error path re-activates the old slot).
#[test]
fn failed_move_beyond_max_gfn_restores_slot() {
    let cfg = Config::x86_64().with_address_spaces(2).with_user_slots(16);
    let vm = Vm::new(cfg).unwrap();
    let vcpu = vm.vcpu();
    let r = UserMemoryRegion::new(3, 0, 0x4000, 0x2000, HVA_BASE);
    assert_eq!(vm.set_user_memory_region(&r), Ok(Outcome::Changed(MemoryChange::Create)));
    assert_eq!(vcpu.gfn_to_hva(4), Ok(HVA_BASE));
    let gen = vm.generation(0).unwrap();
    let top = (cfg.max_gfn + 1) * PAGE;
    let bad = UserMemoryRegion::new(3, 0, top - PAGE, 0x2000, HVA_BASE);
    let e = vm.set_user_memory_region(&bad).unwrap_err();
    assert!(matches!(e, Error::GfnBeyondMax { .. }), "{e:?}");
    assert_eq!(vm.generation(0), Some(gen + 4));
    assert_eq!(vm.generation(1), Some(1));
    assert_eq!(vcpu.gfn_to_hva(4), Ok(HVA_BASE));
    assert_eq!(vm.gfn_to_hva(0, 5), Ok(HVA_BASE + PAGE));
    // Both sets hold the old slot: two more updates (each publishing and
    // replaying on the other set) still see it.
    let ok = UserMemoryRegion::new(3, LOG, 0x4000, 0x2000, HVA_BASE);
    assert_eq!(vm.set_user_memory_region(&ok), Ok(Outcome::Changed(MemoryChange::FlagsOnly)));
    let mv = UserMemoryRegion::new(3, LOG, top - 0x2000, 0x2000, HVA_BASE);
    assert_eq!(vm.set_user_memory_region(&mv), Ok(Outcome::Changed(MemoryChange::Move)));
    assert_eq!(vcpu.gfn_to_hva(4), Err(HvaError::NoSlot));
    assert_eq!(vcpu.gfn_to_hva(cfg.max_gfn), Ok(HVA_BASE + PAGE));
    assert_eq!(vm.generation(0), Some(gen + 4 + 2 + 4));
    let g = vm.read();
    let s = g.id_to_memslot(0, 3).unwrap();
    assert_eq!((s.base_gfn, s.flags), (cfg.max_gfn - 1, LOG));
    assert!(s.dirty_bitmap().is_some());
}

/// The user address limit is inclusive of the range end: `hva + size ==
/// limit` is accepted, one page more is not.
#[test]
fn user_addr_limit_boundary() {
    let cfg = Config::x86_64().with_address_spaces(1).with_user_slots(16);
    let vm = Vm::new(cfg).unwrap();
    let limit = cfg.user_addr_limit;
    let r = UserMemoryRegion::new(0, 0, 0, 0x2000, limit - 0x2000);
    assert_eq!(vm.set_user_memory_region(&r), Ok(Outcome::Changed(MemoryChange::Create)));
    let r = UserMemoryRegion::new(1, 0, 0x10_0000, 0x2000, limit - 0x1000);
    assert_eq!(vm.set_user_memory_region(&r).map_err(|e| e.errno()), Err(Errno::EINVAL));
    // A slot of KVM_MEM_MAX_NR_PAGES pages is accepted, one more page is not.
    let max = ((1u64 << 31) - 1) * PAGE;
    let r = UserMemoryRegion::new(2, 0, 1 << 32, max, HVA_BASE);
    assert_eq!(vm.set_user_memory_region(&r), Ok(Outcome::Changed(MemoryChange::Create)));
    assert_eq!(vm.nr_memslot_pages(), 2 + (1 << 31) - 1);
    let r = UserMemoryRegion::new(3, 0, 1 << 46, max + PAGE, HVA_BASE);
    assert!(matches!(vm.set_user_memory_region(&r), Err(Error::TooManyPages { .. })));
}
