//! The per-request decision path: decode the HAID, resolve both aliases, decide.
//! Aim: at most 150 ns and no heap allocation (tests/no_alloc.rs checks the latter).
//! Placement (requests without a HAID) is in `benches/placement.rs`.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use hagate::aliases::{InstanceSpec, TableHolder};
use hagate::health::LiveView;
use hagate::{context_id, haid, route};

fn table(n: usize) -> TableHolder {
    let specs: BTreeMap<String, InstanceSpec> = (0..n)
        .map(|i| {
            (
                format!("cs_{i}_prod"),
                InstanceSpec::at(format!("10.0.{}.{}:9116", i / 250, i % 250 + 1)),
            )
        })
        .collect();
    TableHolder::new(&specs).unwrap()
}

fn bench(c: &mut Criterion) {
    let holder = table(64);
    let bare = "9-10--cs_3_prodcs_41_prod1234567890";
    let wrapped = r#"{"type":"HAWorkFlowContextID","value":"{\"instance\":\"cs_3_prod\",\"backupInstance\":\"cs_41_prod\",\"user\":\"hadoop\",\"contextId\":\"9-10--cs_3_prodcs_41_prod1234567890\"}"}"#;

    c.bench_function("decode", |b| b.iter(|| haid::decode(black_box(bare))));
    c.bench_function("decode+resolve+route (64 aliases)", |b| {
        b.iter(|| {
            let table = holder.load();
            let h = haid::decode(black_box(bare)).unwrap();
            route::decide(&h, &table, &LiveView::now())
                .clone()
                .eq(&route::Decision::UnknownAlias { alias: "" })
        })
    });
    c.bench_function("header lookup+decode+resolve+route", |b| {
        b.iter(|| {
            let table = holder.load();
            let raw = context_id::find(
                Some(black_box("a=1&b=2")),
                "contextID",
                Some(black_box(bare.as_bytes())),
            )
            .unwrap()
            .unwrap();
            let text = context_id::unwrap(&raw).unwrap();
            let h = haid::decode(&text).unwrap();
            matches!(
                route::decide(&h, &table, &LiveView::now()),
                route::Decision::Forward { .. }
            )
        })
    });
    c.bench_function("gson-wrapped unwrap+decode", |b| {
        b.iter(|| {
            let text = context_id::unwrap(black_box(wrapped)).unwrap();
            haid::decode(&text).map(|h| h.id.len()).unwrap_or(0)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
