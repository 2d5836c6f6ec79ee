//! `context_id::find` (query and headers) and `unwrap` on any input: a query string, then
//! header values, separated by NUL bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut pieces = data.split(|&b| b == 0);
    let query = pieces.next().and_then(|q| std::str::from_utf8(q).ok());
    let headers: Vec<&[u8]> = pieces.collect();
    if let Ok(Some(value)) = hagate::context_id::find(query, "contextID", headers.iter().copied()) {
        if let Ok(text) = hagate::context_id::unwrap(&value) {
            let _ = hagate::haid::decode(&text);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = hagate::context_id::unwrap(text);
    }
});
