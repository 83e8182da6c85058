//! Any bytes as a checkpoint's `meta.json`, `state.json` or loop `config.json`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<derm_core::checkpoint::Meta>(data);
    let _ = serde_json::from_slice::<derm_core::train::TrainState>(data);
    let _ = serde_json::from_slice::<derm_core::train::LoopConfig>(data);
});
