//! Any text as a label or group table, with and without a header line, CSV and `||` cells.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let cols = ["image_id".to_string(), "label".to_string()];
    let origin = std::path::Path::new("fuzz.csv");
    for delim in [",", "||"] {
        let _ = derm_data::table::Table::parse(&text, origin, delim, None);
        let _ = derm_data::table::Table::parse(&text, origin, delim, Some(&cols));
    }
});
