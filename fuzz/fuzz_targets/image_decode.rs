//! Any bytes through derm's strict image decoding: an error naming the input, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = derm_core::image_io::load_rgb_bytes(data.to_vec(), std::path::Path::new("fuzz.img"));
});
