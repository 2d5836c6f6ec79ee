//! Every admin JSON body as the admin API reads it: `PUT /v1/aliases` (parsed, then built
//! into a table as the gateway validates it), a heartbeat, and `POST /v1/placements`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(put) = serde_json::from_slice::<hagate::admin::PutAliases>(data) {
        let states = hagate::health::StateRegistry::default();
        let _ = hagate::aliases::AliasTable::build(&put.instances, 1, &states);
    }
    let _ = serde_json::from_slice::<hagate::store::Heartbeat>(data);
    if let Ok(ask) = serde_json::from_slice::<hagate::admin::PlacementAsk>(data) {
        let _ = hagate::haid::encode("a", &["b"], &ask.context_id);
    }
});
