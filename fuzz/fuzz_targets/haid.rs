//! `haid::decode` on any text, and encode-then-decode: whatever `encode` accepts must
//! decode back to the same parts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(h) = hagate::haid::decode(text) {
        // the parts are slices of the input, and the id is numeric
        assert!(hagate::haid::is_numeric(h.id));
        let _ = (h.main_java(), h.backup_java());
    }
    // encode: split the input into main, backup and id at two NUL bytes
    let mut parts = text.splitn(3, '\0');
    if let (Some(main), Some(backup), Some(id)) = (parts.next(), parts.next(), parts.next()) {
        if let Ok(haid) = hagate::haid::encode(main, &[backup], id) {
            let h = hagate::haid::decode(&haid).expect("an encoded HAID decodes");
            assert_eq!((h.main, h.backup, h.id), (main, backup, id));
        }
    }
});
