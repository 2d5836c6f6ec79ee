//! The per-request decision path (decode, resolve, route) allocates nothing.
//! This test binary counts every heap allocation with a wrapping global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;

use hagate::aliases::{InstanceSpec, TableHolder};
use hagate::health::LiveView;
use hagate::{context_id, haid, route};

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: delegates every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations(f: impl FnOnce()) -> usize {
    let before = ALLOCS.with(Cell::get);
    f();
    ALLOCS.with(Cell::get) - before
}

#[test]
fn decode_resolve_route_allocates_nothing() {
    let specs: BTreeMap<String, InstanceSpec> = ["cs_1_dev", "cs_2_dev", "MTI3LjAuMC4xOjkxMDE="]
        .iter()
        .enumerate()
        .map(|(i, a)| {
            (
                a.to_string(),
                InstanceSpec::at(format!("127.0.0.1:{}", 9000 + i)),
            )
        })
        .collect();
    let holder = TableHolder::new(&specs).unwrap();
    let inputs = [
        "8-8--cs_1_devcs_2_dev1024",
        "8-20--cs_1_devMTI3LjAuMC4xOjkxMDE=77",
        "8-8-3--cs_1_devcs_9_devxyz1",
        "8-8--cs_1_devcs_2_devX", // invalid: the error path does not allocate either
    ];
    // One-time, per-thread set-up stays outside the measured region: the clock's epoch
    // and arc-swap's per-thread debt list.
    let _ = LiveView::now();
    drop(holder.load());
    for input in inputs {
        let n = allocations(|| {
            let table = holder.load();
            let raw = context_id::find(Some("x=1"), "contextID", Some(input.as_bytes()))
                .unwrap()
                .unwrap();
            let text = context_id::unwrap(&raw).unwrap();
            if let Ok(h) = haid::decode(&text) {
                std::hint::black_box(route::decide(&h, &table, &LiveView::now()));
            }
        });
        assert_eq!(n, 0, "{input}: {n} allocations");
    }
    // the counter works: a String allocates
    assert!(allocations(|| drop(std::hint::black_box(String::from("x")))) >= 1);
}
