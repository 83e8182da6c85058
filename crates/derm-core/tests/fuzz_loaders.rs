//! Bounded, seeded fuzzing of derm-core's loaders in the normal test run: mutated images (PNG,
//! JPEG, BMP, TIFF), checkpoint JSON (`meta.json`, `state.json`, `config.json`) and safetensors
//! files. Any input may be rejected with an error naming the file; none may panic. The same
//! loaders are cargo-fuzz targets in `fuzz/` for unbounded runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use candle_core::{Device, Tensor};
use derm_core::checkpoint::{self, Meta};
use derm_core::mutate::panics;
use derm_core::train::TrainState;

/// Cases per loader: 10 000 in the normal run; `DERM_FUZZ_CASES=N` for a longer one.
fn cases() -> usize {
    std::env::var("DERM_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}

fn encoded(format: image::ImageFormat, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 9) as u8, (y * 13) as u8, (x ^ y) as u8]));
    let mut buf = Vec::new();
    img.write_to(&mut Cursor::new(&mut buf), format).unwrap();
    buf
}

#[test]
fn mutated_images_never_panic_and_errors_name_the_file() {
    use image::ImageFormat::*;
    let seeds: Vec<Vec<u8>> =
        vec![encoded(Png, 12, 9), encoded(Jpeg, 16, 8), encoded(Bmp, 7, 5), encoded(Tiff, 6, 6), encoded(Png, 1, 1)];
    let origin = Path::new("fuzzed_upload.img");
    let found = panics(&seeds, cases(), 11, |bytes| {
        if let Err(e) = derm_core::image_io::load_rgb_bytes(bytes.to_vec(), origin) {
            let msg = e.to_string();
            assert!(msg.contains("fuzzed_upload.img"), "error does not name the file: {msg}");
        }
    });
    assert!(found.is_empty(), "{} of {} mutated images panicked, first: {:?}", found.len(), cases(), found.first());
}

#[test]
fn mutated_checkpoint_json_never_panics() {
    let d = tempfile::tempdir().unwrap();
    let meta = serde_json::to_vec_pretty(&Meta::new("segment", "unet-dilated")).unwrap();
    let state = serde_json::to_vec_pretty(&TrainState {
        epoch: 3,
        step: 40,
        best_metric: Some(0.5),
        history: vec![derm_core::train::HistoryPoint {
            step: 4,
            epoch: 0,
            loss: 0.7,
            metric: None,
            elapsed_s: 1.0,
            parts: Default::default(),
        }],
        ..Default::default()
    })
    .unwrap();
    let config = serde_json::to_vec_pretty(&derm_core::train::LoopConfig::default()).unwrap();
    let ckpt = d.path().join("ckpt");
    let vm = candle_nn::VarMap::new();
    let _ = vm.get((2, 3), "w", candle_nn::Init::Const(1.0), candle_core::DType::F32, &Device::Cpu).unwrap();
    checkpoint::save_varmap(&vm, &ckpt.join("model.safetensors")).unwrap();
    let seeds = vec![meta, state, config];
    let found = panics(&seeds, cases(), 12, |bytes| {
        for name in ["meta.json", "state.json", "config.json"] {
            std::fs::write(ckpt.join(name), bytes).unwrap();
        }
        let r = checkpoint::read_meta(&ckpt, "segment");
        if let Err(e) = r {
            assert!(e.to_string().contains("ckpt"), "{e}");
        }
        let _ = checkpoint::read_state::<TrainState>(&ckpt);
        let _ = checkpoint::read_config::<derm_core::train::LoopConfig>(&ckpt);
    });
    assert!(found.is_empty(), "{} of {} mutated JSON files panicked, first: {:?}", found.len(), cases(), found.first());
}

#[test]
fn mutated_safetensors_never_panic() {
    let d = tempfile::tempdir().unwrap();
    let mut t = HashMap::new();
    t.insert("enc.0.weight".to_string(), Tensor::ones((2, 3, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap());
    t.insert("enc.0.bias".to_string(), Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap());
    t.insert("steps".to_string(), Tensor::new(&[7i64], &Device::Cpu).unwrap());
    let good = d.path().join("good.safetensors");
    checkpoint::save_tensors(&t, &good).unwrap();
    let seed = std::fs::read(&good).unwrap();
    let path = d.path().join("model.safetensors");
    let vm = candle_nn::VarMap::new();
    let _ = vm.get((2, 3, 3, 3), "enc.0.weight", candle_nn::Init::Const(0.0), candle_core::DType::F32, &Device::Cpu);
    let found = panics(&[seed], cases(), 13, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        match checkpoint::load_tensors(&path, &Device::Cpu) {
            Ok(ts) => {
                for v in ts.values() {
                    let _ = v.flatten_all().and_then(|f| f.to_dtype(candle_core::DType::F32));
                }
            }
            Err(e) => assert!(e.to_string().contains("model.safetensors"), "{e}"),
        }
        let _ = checkpoint::load_varmap(&vm, &path, checkpoint::Strictness::AllowExtra, |_| false);
    });
    assert!(
        found.is_empty(),
        "{} of {} mutated safetensors panicked, first: {:?}",
        found.len(),
        cases(),
        found.first()
    );
}

#[test]
fn tiff_declaring_a_huge_image_is_an_error_not_an_abort() {
    // Found by the mutation run above: its header declares about 75 GB of pixels, and the TIFF
    // decoder allocated before checking, which aborted the process.
    let bytes = include_bytes!("fixtures/tiff_declares_75gb.tif").to_vec();
    let e = derm_core::image_io::load_rgb_bytes(bytes, Path::new("huge.tif")).unwrap_err().to_string();
    assert!(e.contains("huge.tif") && e.contains("limit"), "{e}");
}
