//! Any text as a data-set manifest.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = derm_data::manifest::Manifest::from_toml(&text, std::path::Path::new("fuzz.toml"));
});
