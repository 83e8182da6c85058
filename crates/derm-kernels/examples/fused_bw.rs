//! Memory throughput of the fused element-wise kernels on a ResNet layer-1 sized activation
//! (8x256x56x56), forward and backward, in GB/s of data read and written.
//!
//! `cargo run -p derm-kernels --example fused_bw`

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use derm_kernels::fused;

fn main() -> candle_core::Result<()> {
    derm_kernels::runtime::tune_allocator();
    let mut rng = derm_core::Rng::new(0);
    let shape = (8, 256, 56, 56);
    let n = 8 * 256 * 56 * 56;
    let x = Var::from_vec(rng.normal_vec(n, 0.0, 1.0), shape, &Device::Cpu)?;
    let r = Tensor::from_vec(rng.normal_vec(n, 0.0, 1.0), shape, &Device::Cpu)?;
    let gamma = Var::from_vec(vec![1f32; 256], 256, &Device::Cpu)?;
    let beta = Var::from_vec(vec![0f32; 256], 256, &Device::Cpu)?;
    let gb = |bytes_per: f64, f: &mut dyn FnMut() -> candle_core::Result<()>| -> candle_core::Result<f64> {
        f()?;
        let t = Instant::now();
        for _ in 0..5 {
            f()?;
        }
        let s = t.elapsed().as_secs_f64() / 5.0;
        Ok(bytes_per * n as f64 / s / 1e9)
    };
    let relu = gb(8.0, &mut || fused::relu(&x).map(|_| ()))?;
    // Backward of relu(x) * r: the product's backward (candle) plus the ReLU's (ours).
    let relu_b = gb(12.0, &mut || (fused::relu(&x)? * &r)?.sum_all()?.backward().map(|_| ()))?;
    let bn = gb(12.0, &mut || fused::batch_norm(&x, &gamma, &beta, None, 1e-5, true).map(|_| ()))?;
    let bn_b = gb(28.0, &mut || {
        (fused::batch_norm(&x, &gamma, &beta, None, 1e-5, true)?.0 * &r)?.sum_all()?.backward().map(|_| ())
    })?;
    println!("relu fwd {relu:.1} GB/s, relu fwd+loss+bwd {relu_b:.1}, bn fwd {bn:.1}, bn fwd+loss+bwd {bn_b:.1}");
    for (name, ms, calls) in derm_kernels::profile::report() {
        let per = ms / calls as f64;
        println!("  {name:<24} {per:>7.2} ms per call ({calls} calls)");
    }
    Ok(())
}
