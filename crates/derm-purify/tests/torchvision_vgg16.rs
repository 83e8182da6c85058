//! derm's VGG16 feature extractor on a file written by torchvision itself, against PyTorch's own
//! `pool1` .. `pool5`.
//!
//! ```text
//! python bench/peer/export_torchvision.py /tmp/tv --models vgg16
//! DERM_TORCHVISION_DIR=/tmp/tv cargo test -p derm-purify --test torchvision_vgg16 -- --ignored --nocapture
//! ```
//!
//! `vgg16.safetensors` is loaded unchanged through [`derm_purify::vgg::Vgg16Features::load`]; the
//! largest absolute difference of each pool divided by its largest absolute PyTorch value must be
//! at most 1e-4. Without `DERM_TORCHVISION_DIR` the test says so and passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use candle_core::Device;
use derm_purify::vgg::Vgg16Features;

const TOLERANCE: f32 = 1e-4;

#[test]
#[ignore = "needs DERM_TORCHVISION_DIR with files from bench/peer/export_torchvision.py"]
fn vgg16_pools_equal_torchvision() {
    let Some(dir) = std::env::var_os("DERM_TORCHVISION_DIR").map(PathBuf::from) else {
        eprintln!(
            "skipped: DERM_TORCHVISION_DIR is not set (make the files with \
             `python bench/peer/export_torchvision.py DIR --models vgg16` and set it to DIR)"
        );
        return;
    };
    let dev = Device::Cpu;
    let vgg = Vgg16Features::load(&dir.join("vgg16.safetensors"), 5, &dev).unwrap();
    let io = derm_core::checkpoint::load_tensors(&dir.join("vgg16_io.safetensors"), &dev).unwrap();
    let feats = vgg.forward(&io["input"]).unwrap();
    assert_eq!(feats.len(), 5);
    for (k, f) in feats.iter().enumerate() {
        let key = format!("pool{}", k + 1);
        let t = &io[&key];
        assert_eq!(f.dims(), t.dims(), "{key}");
        let d = (f - t).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let m = t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let rel = d / m.max(f32::MIN_POSITIVE);
        eprintln!("vgg16 {key} {:?}: max |derm - torch| {d:.3e}, max |torch| {m:.3e}, relative {rel:.3e}", f.dims());
        assert!(rel <= TOLERANCE, "vgg16 {key}: relative difference {rel:e} above {TOLERANCE:e}");
    }
}
