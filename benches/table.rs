//! P6: what a 100k-alias table costs to take in, step by step: read the JSON of
//! `PUT /v1/aliases` and of a `table.file`, validate it, and build and swap it in.
//! The end-to-end figures (a reload's `took_ms`, under load) come from
//! `benches/memory.sh`; this splits them, and measures them on a quiet thread.
//! The memory is warm from one iteration to the next. A reload of an idle gateway gets
//! fresh pages from the kernel (docs/performance.md, "P6: fresh pages"); to measure that,
//! run the bench binary with `MIMALLOC_PURGE_DELAY=0`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use hagate::aliases::{AliasTable, TableHolder};
use hagate::model::TableValue;

/// The gateway's allocator (src/main.rs): allocation is much of what a table costs.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A table as `benches/memory.py` writes it: an address per alias, a zone label.
fn json(n: usize, generation: usize) -> Vec<u8> {
    let mut out = String::from("{\"instances\": {");
    for i in 0..n {
        if i > 0 {
            out.push_str(", ");
        }
        let zone = ["a", "b"][(i + generation) % 2];
        out.push_str(&format!(
            "\"cs_{i}_m\": {{\"address\": \"127.{}.{}.{}:9116\", \"labels\": {{\"zone\": \"{zone}\"}}}}",
            1 + i / 62_500,
            i / 250 % 250,
            i % 250 + 1
        ));
    }
    out.push_str("}}");
    out.into_bytes()
}

fn parse(bytes: &[u8]) -> TableValue {
    hagate::model::from_json(bytes).unwrap()
}

fn bench(c: &mut Criterion) {
    let n = 100_000;
    let (first, second) = (json(n, 0), json(n, 1));
    let mut group = c.benchmark_group("table of 100k aliases");
    group.sample_size(10);
    group.bench_function("parse JSON", |b| b.iter(|| parse(black_box(&first))));
    let table = parse(&first).instances;
    group.bench_function("validate", |b| {
        b.iter(|| AliasTable::validate(black_box(&table)).unwrap())
    });
    // a reload: the same addresses, new labels, so every health state is kept; each
    // table freshly read, as a reload reads it (the read is not timed)
    let holder = TableHolder::new(&table).unwrap();
    let jsons = [first, second];
    let mut turn = 0;
    group.bench_function("build and swap", |b| {
        b.iter_batched(
            || {
                turn += 1;
                parse(&jsons[turn % 2]).instances
            },
            |specs| holder.publish(black_box(&specs)).unwrap(),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
