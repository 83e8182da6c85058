//! Any bytes as a `model.safetensors` file, loaded as derm loads checkpoints.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("derm-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("model.safetensors");
    if std::fs::write(&path, data).is_ok() {
        if let Ok(ts) = derm_core::checkpoint::load_tensors(&path, &candle_core::Device::Cpu) {
            for t in ts.values() {
                let _ = t.flatten_all();
            }
        }
    }
});
