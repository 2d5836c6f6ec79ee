//! The one `bindgen!` of the `placement` world (`wit/placement.wit`), and the conversions
//! between its generated types and hagate's domain types. Generated types go no further
//! than this file and `host.rs`.

use crate::model::Labels;
use crate::placement::{Candidate, PlacementRequest};

/// The generated code (its docs come from the WIT).
#[allow(missing_docs)]
mod generated {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "placement",
        // Parameters borrow the host's data: no copies of aliases, labels or paths per call.
        ownership: Borrowing { duplicate_if_necessary: false },
    });
}

pub use generated::hagate::policy::types::{Choice, Instance, Label, Load, Request};
pub use generated::{Placement, PlacementPre};

/// The labels of one candidate, borrowed.
pub fn labels(labels: &Labels) -> Vec<Label<'_>> {
    labels
        .iter()
        .map(|(key, value)| Label { key, value })
        .collect()
}

/// The static facts of `candidates`, borrowing `labels` (one entry per candidate).
pub fn instances<'a>(
    candidates: &[Candidate<'a>],
    labels: &'a [Vec<Label<'a>>],
) -> Vec<Instance<'a>> {
    candidates
        .iter()
        .zip(labels)
        .map(|(c, l)| Instance {
            alias: c.alias,
            weight: c.weight,
            labels: l,
        })
        .collect()
}

/// The per-call load record of one candidate.
pub fn load(c: &Candidate<'_>) -> Load {
    Load {
        live: c.live,
        inflight: c.inflight.min(u64::from(u32::MAX)) as u32,
        latency_ewma_us: c.latency_ewma_us,
        reported: c.reported_load,
    }
}

/// The request facts.
pub fn request<'a>(r: &PlacementRequest<'a>) -> Request<'a> {
    Request {
        tenant: r.tenant,
        path: r.path,
        context_id: r.context_id,
    }
}
