//! The `bindgen!` of each released version of the `placement` world, and the conversions
//! between their generated types and hagate's domain types. Generated types go no further
//! than this file and `host.rs`.
//!
//! - `v1`: `hagate:policy@0.1.0` (`wit/placement.wit`): a `load` record per instance, the
//!   request's strings on every call, `result<choice, string>`.
//! - `v2`: `hagate:policy@0.2.0` (`wit/v0.2/placement.wit`): the loads as one flat
//!   `list<u32>`, only the request fields the plugin wants, `option<choice>`.
//!
//! A released version is never edited, so the host speaks every one of them: one
//! `bindgen!` per version, here and nowhere else.

use crate::model::Labels;
use crate::placement::{Candidate, PlacementRequest};

/// The generated code of `hagate:policy@0.1.0` (its docs come from the WIT).
#[allow(missing_docs)]
pub mod v1 {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "placement",
        // Parameters borrow the host's data: no copies of aliases, labels or paths per call.
        ownership: Borrowing { duplicate_if_necessary: false },
    });

    pub use hagate::policy::types::Label;
}

/// The generated code of `hagate:policy@0.2.0` (its docs come from the WIT).
#[allow(missing_docs)]
pub mod v2 {
    wasmtime::component::bindgen!({
        path: "wit/v0.2",
        world: "placement",
        ownership: Borrowing { duplicate_if_necessary: false },
    });

    pub use hagate::policy::types::Label;
}

/// A plugin's answer, in any version: the main's index and the backup's.
pub type Answer = (u32, Option<u32>);

/// The labels of one candidate, borrowed, as `T` (each version's `label` record).
pub fn labels<'a, T>(labels: &'a Labels, label: impl Fn(&'a str, &'a str) -> T) -> Vec<T> {
    labels
        .iter()
        .map(|(key, value)| label(key, value))
        .collect()
}

/// The static facts of `candidates` as `I` (each version's `instance` record), borrowing
/// `labels` (one entry per candidate).
pub fn instances<'a, L, I>(
    candidates: &[Candidate<'a>],
    labels: &'a [Vec<L>],
    instance: impl Fn(&'a str, u32, &'a [L]) -> I,
) -> Vec<I> {
    candidates
        .iter()
        .zip(labels)
        .map(|(c, l)| instance(c.alias, c.weight, l))
        .collect()
}

/// A candidate's in-flight count as the WIT's `u32` (saturating).
fn inflight(c: &Candidate<'_>) -> u32 {
    c.inflight.min(u64::from(u32::MAX)) as u32
}

/// The 0.1 per-call load record of one candidate.
pub fn load_v1(c: &Candidate<'_>) -> v1::Load {
    v1::Load {
        live: c.live,
        inflight: inflight(c),
        latency_ewma_us: c.latency_ewma_us,
        reported: c.reported_load,
    }
}

/// 0.2's flags word: live.
pub const LIVE: u32 = 1;
/// 0.2's flags word: excluded.
pub const EXCLUDED: u32 = 2;
/// 0.2's flags word: the instance reported its load.
pub const REPORTED: u32 = 4;
/// 0.2's numbers per instance in `place`'s `loads`.
pub const WORDS: usize = 4;

/// Appends the 0.2 `loads` of `candidates` to `words` (`WORDS` per candidate; the layout
/// is in `wit/v0.2/placement.wit`), with the indices in `exclude` flagged.
pub fn loads_v2(candidates: &[Candidate<'_>], exclude: &[usize], words: &mut Vec<u32>) {
    words.reserve(candidates.len() * WORDS);
    for c in candidates {
        let flags = if c.live { LIVE } else { 0 } | c.reported_load.map_or(0, |_| REPORTED);
        words.extend([
            flags,
            inflight(c),
            c.latency_ewma_us,
            c.reported_load.map_or(0, f32::to_bits),
        ]);
    }
    for &i in exclude {
        if let Some(flags) = words.get_mut(i * WORDS) {
            *flags |= EXCLUDED;
        }
    }
}

/// The 0.1 request record.
pub fn request_v1<'a>(r: &PlacementRequest<'a>) -> v1::Request<'a> {
    v1::Request {
        tenant: r.tenant,
        path: r.path,
        context_id: r.context_id,
    }
}

/// The 0.2 request record: only the fields in `wants`.
pub fn request_v2<'a>(r: &PlacementRequest<'a>, wants: v2::Wants) -> v2::Request<'a> {
    v2::Request {
        tenant: r.tenant.filter(|_| wants.contains(v2::Wants::TENANT)),
        path: Some(r.path).filter(|_| wants.contains(v2::Wants::PATH)),
        context_id: r
            .context_id
            .filter(|_| wants.contains(v2::Wants::CONTEXT_ID)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_v2_lays_out_four_words_per_candidate_and_flags_exclusions() {
        let labels = Labels::default();
        let c = |live, inflight, reported_load| Candidate {
            alias: "a",
            live,
            inflight,
            latency_ewma_us: 700,
            reported_load,
            weight: 1,
            labels: &labels,
        };
        let list = [
            c(true, 3, None),
            c(false, u64::MAX, Some(0.5)),
            c(true, 0, None),
        ];
        let mut words = vec![];
        loads_v2(&list, &[2, 9], &mut words);
        assert_eq!(
            words,
            [
                LIVE,
                3,
                700,
                0,
                REPORTED,
                u32::MAX,
                700,
                0.5f32.to_bits(),
                LIVE | EXCLUDED,
                0,
                700,
                0
            ]
        );
    }

    #[test]
    fn request_v2_carries_only_the_wanted_fields() {
        let r = PlacementRequest {
            tenant: Some("acme"),
            path: "/api/rest_j/v1/contextservice/createContextID",
            context_id: Some("1024"),
            exclude: &[],
        };
        let none = request_v2(&r, v2::Wants::empty());
        assert_eq!(
            (none.tenant, none.path, none.context_id),
            (None, None, None)
        );
        let tenant = request_v2(&r, v2::Wants::TENANT);
        assert_eq!(
            (tenant.tenant, tenant.path, tenant.context_id),
            (Some("acme"), None, None)
        );
        let all = request_v2(&r, v2::Wants::all());
        assert_eq!(
            (all.tenant, all.path, all.context_id),
            (Some("acme"), Some(r.path), Some("1024"))
        );
    }
}
