//! derm's ResNet-18/50 on files written by torchvision itself, against PyTorch's own outputs.
//!
//! The files come from `bench/peer/export_torchvision.py` (seeded random weights with randomised
//! batch-norm statistics, `num_batches_tracked` included; no download):
//!
//! ```text
//! python bench/peer/export_torchvision.py /tmp/tv --models resnet18,resnet50
//! DERM_TORCHVISION_DIR=/tmp/tv cargo test -p derm-classify --test torchvision_equivalence -- --ignored --nocapture
//! ```
//!
//! Each test loads `NAME.safetensors` unchanged through [`derm_classify::load_torchvision`] and
//! compares eval-mode `stem`, `layer1` .. `layer4` and `logits` with `NAME_io.safetensors`:
//! the largest absolute difference divided by the largest absolute PyTorch value must be at most
//! 1e-4. Without `DERM_TORCHVISION_DIR` the tests say so and pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use derm_classify::{load_torchvision, ResNet, ResNetConfig};

const TOLERANCE: f32 = 1e-4;

fn dir() -> Option<PathBuf> {
    match std::env::var_os("DERM_TORCHVISION_DIR") {
        Some(d) => Some(PathBuf::from(d)),
        None => {
            eprintln!(
                "skipped: DERM_TORCHVISION_DIR is not set (make the files with \
                 `python bench/peer/export_torchvision.py DIR` and set it to DIR)"
            );
            None
        }
    }
}

/// (max |derm - torch|, max |torch|).
fn difference(derm: &Tensor, torch: &Tensor) -> (f32, f32) {
    assert_eq!(derm.dims(), torch.dims());
    let d = (derm - torch).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let m = torch.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    (d, m)
}

fn check(name: &str, cfg: ResNetConfig) {
    let Some(dir) = dir() else { return };
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = derm_core::nn::seeded_var_builder(&vm, 0, DType::F32, &dev);
    let net = ResNet::new(&cfg, vb).unwrap();
    let weights = dir.join(format!("{name}.safetensors"));
    let file = derm_core::checkpoint::load_tensors(&weights, &dev).unwrap();
    let tracked = file.keys().filter(|k| k.ends_with("num_batches_tracked")).count();
    assert!(tracked > 0, "{} has no num_batches_tracked: not a torchvision state dict", weights.display());
    load_torchvision(&vm, &weights, false).unwrap();
    let io = derm_core::checkpoint::load_tensors(&dir.join(format!("{name}_io.safetensors")), &dev).unwrap();
    let f = net.forward_features(&io["input"], false).unwrap();
    let mut worst = 0f32;
    let mut ours = vec![("stem", f.stem.clone())];
    for (k, l) in f.layers.iter().enumerate() {
        ours.push((["layer1", "layer2", "layer3", "layer4"][k], l.clone()));
    }
    ours.push(("logits", f.logits.clone()));
    for (key, t) in &ours {
        let (d, m) = difference(t, &io[*key]);
        let rel = d / m.max(f32::MIN_POSITIVE);
        eprintln!(
            "{name} {key:>6} {:?}: max |derm - torch| {d:.3e}, max |torch| {m:.3e}, relative {rel:.3e}",
            t.dims()
        );
        assert!(rel <= TOLERANCE, "{name} {key}: relative difference {rel:e} above {TOLERANCE:e}");
        worst = worst.max(rel);
    }
    // The logits of the plain forward pass are the same.
    let (d, m) = difference(&net.forward_t(&io["input"], false).unwrap(), &io["logits"]);
    assert!(d / m <= TOLERANCE, "{name} forward_t: {d:e} / {m:e}");
    eprintln!("{name}: worst relative difference {worst:.3e} ({tracked} num_batches_tracked ignored)");
}

#[test]
#[ignore = "needs DERM_TORCHVISION_DIR with files from bench/peer/export_torchvision.py"]
fn resnet18_equals_torchvision() {
    check("resnet18", ResNetConfig::resnet18(1000));
}

#[test]
#[ignore = "needs DERM_TORCHVISION_DIR with files from bench/peer/export_torchvision.py"]
fn resnet50_equals_torchvision() {
    check("resnet50", ResNetConfig::resnet50(1000));
}
