//! `Config::parse` (TOML, then `validate`) on any text: an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = hagate::config::Config::parse(text);
    }
});
