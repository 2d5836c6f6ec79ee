//! Placement cost: the native policy versus the `lowest-load` Wasm plugin (a real
//! component built from `plugins/`) over 8 candidates, and the cost of replacing an
//! instance that trapped (a fresh instantiation plus `configure`); and both over a table of
//! 10k aliases, candidate list included.
//!
//! `cargo bench --bench placement`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use hagate::aliases::{InstanceSpec, TableHolder};
use hagate::health::LiveView;
use hagate::placement::{Candidate, Candidates, Labels, LeastLoaded, Placement, PlacementRequest};
use hagate::plugin::{Limits, Plugin};

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

fn labels() -> Vec<Labels> {
    (0..8)
        .map(|i| {
            Labels::from([
                ("zone".to_string(), ["a", "b"][i % 2].to_string()),
                ("tenant".to_string(), format!("t{}", i % 3)),
            ])
        })
        .collect()
}

fn candidates<'a>(aliases: &'a [String], labels: &'a [Labels]) -> Candidates<'a> {
    Candidates {
        version: 1,
        list: aliases
            .iter()
            .zip(labels)
            .enumerate()
            .map(|(i, (alias, labels))| Candidate {
                alias,
                live: i != 3,
                inflight: (i as u64 * 7) % 5,
                latency_ewma_us: 800 + i as u32 * 10,
                reported_load: None,
                weight: 1,
                labels,
            })
            .collect(),
    }
}

/// A table of `n` aliases over two zones.
fn table(n: usize) -> TableHolder {
    let specs: BTreeMap<String, InstanceSpec> = (0..n)
        .map(|i| {
            (
                format!("cs_{i}_prod"),
                InstanceSpec {
                    labels: BTreeMap::from([("zone".to_string(), ["a", "b"][i % 2].to_string())])
                        .into(),
                    ..InstanceSpec::at(format!("10.0.{}.{}:9116", i / 250, i % 250 + 1))
                },
            )
        })
        .collect();
    TableHolder::new(&specs).unwrap()
}

fn bench(c: &mut Criterion) {
    let aliases: Vec<String> = (0..8).map(|i| format!("cs_{i}_prod")).collect();
    let labels = labels();
    let cands = candidates(&aliases, &labels);
    let req = PlacementRequest {
        tenant: Some("t1"),
        path: "/api/rest_j/v1/contextservice/createContextID",
        context_id: None,
        exclude: &[],
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bytes = std::fs::read(common::plugin_wasm("lowest_load")).unwrap();
    // A deadline far above the call's cost: the epoch check costs the same whatever the
    // deadline, and a loaded machine must not turn a measurement into a timeout.
    let limits = Limits {
        deadline: Duration::from_secs(1),
        memory: 16 << 20,
    };
    let plugin = rt.block_on(Plugin::load(&bytes, "", limits)).unwrap();

    let mut g = c.benchmark_group("placement_8_candidates");
    let native = LeastLoaded::default();
    g.bench_function("native", |b| b.iter(|| native.place(&req, &cands).unwrap()));
    // The plugin call as the proxy makes it: awaited on the runtime thread.
    g.bench_function("wasm_lowest_load", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    plugin.place(&req, &cands).await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    // After an alias-table change the instance is handed the new instance list first.
    g.bench_function("wasm_lowest_load_new_table", |b| {
        let mut version = 1;
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut c = cands.clone();
                let start = Instant::now();
                for _ in 0..iters {
                    version += 1;
                    c.version = version;
                    plugin.place(&req, &c).await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    g.finish();

    // A large table: every call builds the candidate list from the table, as the proxy
    // does, and hands the plugin one load record per alias.
    let holder = table(10_000);
    let mut g = c.benchmark_group("placement_10k_aliases");
    g.bench_function("native", |b| {
        b.iter(|| {
            let table = holder.load();
            native
                .place(&req, &Candidates::of(&table, &LiveView::now()))
                .unwrap()
        })
    });
    g.bench_function("wasm_lowest_load", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let table = holder.load();
                    let cands = Candidates::of(&table, &LiveView::now());
                    plugin.place(&req, &cands).await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    g.finish();

    c.bench_function("replace_trapped_instance", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    plugin.replace_once().await.unwrap();
                }
                start.elapsed()
            })
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
