//! `cargo xtask device-check`: derm's ops and one training step of each network on a device
//! (CUDA, Metal) against derm's CPU kernels, from the same seed, with stated tolerances.
//!
//! Each op (the pooling windows of the U-Net, the ResNet stem and VGG, nearest and bilinear
//! resizing at odd sizes, batch norm in train mode, strided and dilated convolution, the fused
//! convolution + batch norm, the weighted cross-entropy) runs forward and backward (the gradient
//! of `sum(y * r)` for a fixed random `r`); each network (the small U-Net, ResNet-50, the
//! partial-convolution U-Net, the 64-pixel DCGAN) computes its training loss on one seeded batch
//! and the gradient of every parameter. Three runs: the CPU kernels in f64 (the reference), the
//! CPU kernels in f32, and the device in f32. A row passes when the device's relative L2 error
//! against the reference, for the output and for the gradients, is within the row's tolerance or
//! within 10 times the CPU kernels' own f32 error, whichever is larger. The tolerances: 1e-5 for
//! pooling and resizing, 1e-4 for the other ops, 1e-3 for whole networks. The second bound
//! matters for networks: at initialisation with small batches, batch norm over few values makes
//! some gradients ill-conditioned, so that any f32 evaluation (the CPU kernels' or the device's)
//! is 1e-2 off the f64 one on some parameters of the U-Net and ResNet-50 (measured on the CPU).
//! Each network also takes one optimiser step on the device, and the check counts the host reads
//! that step made (0 expected).
//!
//! `--device cpu` runs the "device" side on the CPU through the forced device path
//! ([`derm_kernels::ops::with_device_path`]): the same comparison that the tests make, useful to
//! check the check. `scripts/gpu-check.sh` runs it with `--device cuda` on a GPU machine.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use derm_core::Rng;
use derm_kernels::ops::{self, ConvParams, Pool2d, ResizeMode};
use serde::Serialize;

/// Arguments of `cargo xtask device-check`.
#[derive(Debug, clap::Args)]
pub struct DeviceCheckArgs {
    /// The device to check against the CPU kernels: cuda[:N], metal, or cpu (the forced device
    /// path on the CPU).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Write the rows as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seed of the inputs and weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// One compared computation.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRow {
    /// What ran.
    pub name: String,
    /// The device's relative L2 error against the f64 CPU reference: output (the loss, for a
    /// network).
    pub output_rel_err: f64,
    /// The same for the gradients (all parameters together, for a network).
    pub grad_rel_err: f64,
    /// The CPU kernels' own f32 errors against the same reference (output, gradients).
    pub cpu_f32_rel_err: (f64, f64),
    /// The row's tolerance (the device may also be up to 10 times the CPU's f32 error).
    pub tolerance: f64,
    /// Host reads made by the optimiser step on the device (networks only).
    pub step_host_reads: Option<u64>,
    /// The parameter whose gradient differs most, with its relative error (networks only).
    pub worst_param: Option<(String, f64)>,
    /// Whether the row passed.
    pub pass: bool,
}

/// Where the "device" side runs.
struct Target {
    device: Device,
    forced: bool,
}

impl Target {
    fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        if self.forced {
            ops::with_device_path(f)
        } else {
            f()
        }
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    (num / den.max(1e-30)).sqrt()
}

fn host(t: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
}

fn random(shape: &[usize], rng: &mut Rng) -> anyhow::Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(rng.normal_vec(n, 0.0, 1.0), shape, &Device::Cpu)?)
}

/// A fixed random tensor like `x` (its dtype and device), from `seed`.
fn fixed(shape: &[usize], seed: u64, like: &Tensor) -> candle_core::Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(Rng::new(seed).normal_vec(n, 0.0, 1.0), shape, &Device::Cpu)?
        .to_dtype(like.dtype())?
        .to_device(like.device())
}

type OpFn = fn(&Tensor) -> candle_core::Result<Tensor>;

/// The output and the input gradient of `f(x)` weighted by `r`, on `dev` in `dtype`.
fn op_on(f: OpFn, x: &Tensor, r_seed: u64, dev: &Device, dtype: DType) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
    let xv = Var::from_tensor(&x.to_dtype(dtype)?.to_device(dev)?)?;
    let y = f(xv.as_tensor())?;
    let r = fixed(y.dims(), r_seed, &y)?;
    let g = (&y * &r)?.sum_all()?.backward()?;
    let gx = g.get(xv.as_tensor()).context("no gradient reached the input")?;
    Ok((host(&y)?, host(gx)?))
}

/// The row's verdict: the device within `tol` of the reference, or within 10 times the CPU's
/// own f32 error (the same rounding, summed in another order, amplified by the same
/// ill-conditioning).
fn row(name: &str, dev: (f64, f64), cpu: (f64, f64), tol: f64) -> CheckRow {
    let ok = |d: f64, c: f64| d <= tol.max(10.0 * c);
    CheckRow {
        name: name.to_string(),
        output_rel_err: dev.0,
        grad_rel_err: dev.1,
        cpu_f32_rel_err: cpu,
        tolerance: tol,
        step_host_reads: None,
        worst_param: None,
        pass: ok(dev.0, cpu.0) && ok(dev.1, cpu.1),
    }
}

fn check_ops(t: &Target, seed: u64) -> anyhow::Result<Vec<CheckRow>> {
    fn bn(x: &Tensor) -> candle_core::Result<Tensor> {
        let c = x.dim(1)?;
        let gamma = Tensor::from_vec((0..c).map(|i| 0.5 + 0.1 * i as f32).collect::<Vec<_>>(), c, x.device())?;
        let beta = Tensor::from_vec((0..c).map(|i| 0.05 * i as f32).collect::<Vec<_>>(), c, x.device())?;
        let (gamma, beta) = (gamma.to_dtype(x.dtype())?, beta.to_dtype(x.dtype())?);
        Ok(derm_kernels::fused::batch_norm(x, &gamma, &beta, None, 1e-5, true)?.0)
    }
    fn conv_with(x: &Tensor, k: usize, p: ConvParams) -> candle_core::Result<Tensor> {
        let w = fixed(&[6, x.dim(1)?, k, k], 77, x)?;
        ops::conv2d(x, &w, p)
    }
    fn conv_bn(x: &Tensor, d: usize) -> candle_core::Result<Tensor> {
        let c = x.dim(1)?;
        let w = (fixed(&[c, c, 3, 3], 80, x)? * (1.0 / (9.0 * c as f64).sqrt()))?;
        let gamma = Tensor::ones(c, x.dtype(), x.device())?;
        let beta = Tensor::zeros(c, x.dtype(), x.device())?;
        let spec = derm_kernels::conv::ConvSpec { padding: d, stride: 1, dilation: d };
        Ok(derm_kernels::fused::conv_batch_norm(x, &w, spec, &gamma, &beta, None, 1e-5, true)?.0)
    }
    fn ce(x: &Tensor) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let logits = x.flatten_from(1)?.narrow(1, 0, 3)?;
        let y = Tensor::from_vec((0..n as u32).map(|i| i % 3).collect::<Vec<_>>(), n, x.device())?;
        let w = Tensor::new(&[1f32, 2.5, 4.0], x.device())?.to_dtype(x.dtype())?;
        ops::cross_entropy(&logits, &y, Some(&w))?.reshape(1)
    }
    let cases: Vec<(&str, OpFn, Vec<usize>, f64)> = vec![
        ("max_pool 2x2/2 (U-Net)", |x| ops::max_pool2d(x, Pool2d::square(2, 2, 0)), vec![2, 3, 17, 22], 1e-5),
        (
            "max_pool 3x3/2 pad 1 (ResNet stem)",
            |x| ops::max_pool2d(x, Pool2d::square(3, 2, 1)),
            vec![2, 3, 15, 20],
            1e-5,
        ),
        ("avg_pool 2x2/2", |x| ops::avg_pool2d(x, Pool2d::square(2, 2, 0)), vec![2, 3, 16, 21], 1e-5),
        ("nearest x2", |x| ops::upsample_nearest(x, 2), vec![2, 3, 7, 9], 1e-5),
        ("bilinear 13x17 -> 29x11", |x| ops::resize2d(x, 29, 11, ResizeMode::Bilinear), vec![2, 3, 13, 17], 1e-5),
        ("nearest 13x17 -> 20x30", |x| ops::resize2d(x, 20, 30, ResizeMode::Nearest), vec![2, 3, 13, 17], 1e-5),
        ("batch_norm + relu (train), 128 channels 8x8", bn, vec![2, 128, 8, 8], 1e-4),
        (
            "conv 3x3/1 pad 1",
            |x| conv_with(x, 3, ConvParams { padding: 1, ..Default::default() }),
            vec![2, 4, 13, 18],
            1e-4,
        ),
        (
            "conv 3x3/2 pad 1, odd size",
            |x| conv_with(x, 3, ConvParams { padding: 1, stride: 2, ..Default::default() }),
            vec![2, 4, 13, 18],
            1e-4,
        ),
        (
            "conv 3x3/2 pad 1, even size (ResNet)",
            |x| conv_with(x, 3, ConvParams { padding: 1, stride: 2, ..Default::default() }),
            vec![2, 4, 16, 16],
            1e-4,
        ),
        (
            "conv 1x1/2, even size (ResNet downsample)",
            |x| conv_with(x, 1, ConvParams { stride: 2, ..Default::default() }),
            vec![2, 4, 16, 16],
            1e-4,
        ),
        (
            "conv 7x7/2 pad 3 (ResNet stem)",
            |x| conv_with(x, 7, ConvParams { stride: 2, padding: 3, ..Default::default() }),
            vec![2, 3, 32, 32],
            1e-4,
        ),
        (
            "conv 3x3 dilation 4 pad 4, 128 channels 8x8 (U-Net bottleneck)",
            |x| conv_with(x, 3, ConvParams { padding: 4, dilation: 4, ..Default::default() }),
            vec![2, 128, 8, 8],
            1e-4,
        ),
        (
            "conv 3x3 dilation 2 pad 2",
            |x| conv_with(x, 3, ConvParams { padding: 2, dilation: 2, ..Default::default() }),
            vec![2, 4, 13, 18],
            1e-4,
        ),
        ("fused conv + batch_norm + relu, dilation 2, 128 channels 8x8", |x| conv_bn(x, 2), vec![2, 128, 8, 8], 1e-4),
        ("fused conv + batch_norm + relu, 64 channels 16x16", |x| conv_bn(x, 1), vec![2, 64, 16, 16], 1e-4),
        (
            "batch_norm + relu, max_pool 2x2/2",
            |x| ops::max_pool2d(&bn(x)?, Pool2d::square(2, 2, 0)),
            vec![2, 4, 16, 16],
            1e-4,
        ),
        ("weighted cross-entropy", ce, vec![7, 3, 1, 1], 1e-4),
    ];
    let mut rows = Vec::new();
    for (i, (name, f, shape, tol)) in cases.into_iter().enumerate() {
        let x = random(&shape, &mut Rng::new(seed).fork(i as u64))?;
        let r = seed + 1000 + i as u64;
        let (y64, g64) = op_on(f, &x, r, &Device::Cpu, DType::F64)?;
        let (yc, gc) = op_on(f, &x, r, &Device::Cpu, DType::F32)?;
        let (yd, gd) = t.run(|| op_on(f, &x, r, &t.device, DType::F32))?;
        let cpu = (rel_err(&yc, &y64), rel_err(&gc, &g64));
        rows.push(row(name, (rel_err(&yd, &y64), rel_err(&gd, &g64)), cpu, tol));
    }
    Ok(rows)
}

/// A network's training loss on one seeded batch, built on a device in a dtype.
type NetFn = fn(&Device, u64, DType) -> anyhow::Result<(VarMap, Tensor)>;

fn inputs(r: &mut Rng, shape: &[usize], uniform: bool, dev: &Device, dt: DType) -> anyhow::Result<Tensor> {
    let n = shape.iter().product();
    let v = if uniform { r.uniform_vec(n, -1.0, 1.0) } else { r.normal_vec(n, 0.0, 1.0) };
    Ok(Tensor::from_vec(v, shape, dev)?.to_dtype(dt)?)
}

fn unet_loss(dev: &Device, seed: u64, dt: DType) -> anyhow::Result<(VarMap, Tensor)> {
    use derm_segment::model::{UNet, UNetConfig};
    let vm = VarMap::new();
    let net = UNet::new(&UNetConfig::small(), derm_core::nn::seeded_var_builder(&vm, seed, dt, dev))?;
    let mut r = Rng::new(seed + 1);
    let x = inputs(&mut r, &[2, 3, 64, 64], true, dev, dt)?;
    let y = inputs(&mut r, &[2, 1, 64, 64], true, dev, dt)?.ge(0.0)?.to_dtype(dt)?;
    Ok((vm.clone(), ops::bce_with_logits(&net.forward_t(&x, true)?, &y)?))
}

fn resnet50_loss(dev: &Device, seed: u64, dt: DType) -> anyhow::Result<(VarMap, Tensor)> {
    use derm_classify::model::{ResNet, ResNetConfig};
    let vm = VarMap::new();
    let net = ResNet::new(&ResNetConfig::resnet50(3), derm_core::nn::seeded_var_builder(&vm, seed, dt, dev))?;
    let mut r = Rng::new(seed + 1);
    let x = inputs(&mut r, &[4, 3, 64, 64], false, dev, dt)?;
    let y = Tensor::new(&[0u32, 1, 2, 1], dev)?;
    let w = Tensor::new(&[1f32, 3.0, 5.0], dev)?.to_dtype(dt)?;
    Ok((vm.clone(), derm_classify::loss(&net.forward_t(&x, true)?, &y, Some(&w))?))
}

fn pconv_loss(dev: &Device, seed: u64, dt: DType) -> anyhow::Result<(VarMap, Tensor)> {
    use derm_purify::{
        inpainting_loss, LossWeights, MaskConfig, MaskGenerator, MaskLibrary, PConvUNet, PConvUNetConfig,
    };
    let vm = VarMap::new();
    let net = PConvUNet::new(&PConvUNetConfig::small(), derm_core::nn::seeded_var_builder(&vm, seed, dt, dev))?;
    let mut r = Rng::new(seed + 1);
    let gen = MaskGenerator::new(MaskConfig::default(), MaskLibrary::default())?;
    let holes: Vec<image::GrayImage> = (0..2).map(|_| gen.generate(64, 64, &mut r)).collect();
    let hrefs: Vec<&image::GrayImage> = holes.iter().collect();
    let t = inputs(&mut r, &[2, 3, 64, 64], true, dev, dt)?;
    let valid = derm_core::image_io::masks_to_tensor(&hrefs, dev)?.affine(-1.0, 1.0)?.to_dtype(dt)?;
    let out = net.forward_t(&t.broadcast_mul(&valid)?, &valid, true)?;
    let (loss, _) =
        inpainting_loss(&out, &t, &valid, &LossWeights::default(), None, derm_core::image_io::Normalize::HALF)?;
    Ok((vm.clone(), loss))
}

fn dcgan_loss(dev: &Device, seed: u64, dt: DType) -> anyhow::Result<(VarMap, Tensor)> {
    use derm_synth::{Discriminator, GanConfig, Generator};
    let vm = VarMap::new();
    let vb = derm_core::nn::seeded_var_builder(&vm, seed, dt, dev);
    let cfg = GanConfig::peer64();
    let (g, d) = (Generator::new(&cfg, vb.pp("g"))?, Discriminator::new(&cfg, vb.pp("d"))?);
    let mut r = Rng::new(seed + 1);
    let z = inputs(&mut r, &[8, cfg.latent], false, dev, dt)?;
    let real = inputs(&mut r, &[8, 3, 64, 64], true, dev, dt)?;
    let d_fake = d.forward_heads(&g.forward_all(&z, true)?, true, None)?;
    let d_real = d.forward_heads(&[real], true, None)?;
    let lf = ops::bce_with_logits(&d_fake[0].logits, &d_fake[0].logits.ones_like()?)?;
    let lr = ops::bce_with_logits(&d_real[0].logits, &d_real[0].logits.ones_like()?.affine(0.9, 0.0)?)?;
    Ok((vm.clone(), (lf + lr)?))
}

/// Parameter gradients by name, on the host.
type Grads = HashMap<String, Vec<f32>>;

/// Every parameter's gradient, by name, on the host.
fn grads_of(vm: &VarMap, loss: &Tensor) -> anyhow::Result<HashMap<String, Vec<f32>>> {
    let g = loss.backward()?;
    let data = vm.data().lock().map_err(|_| anyhow::anyhow!("varmap lock poisoned"))?;
    let mut out = HashMap::new();
    for (name, v) in data.iter() {
        if let Some(t) = g.get(v.as_tensor()) {
            out.insert(name.clone(), host(t)?);
        }
    }
    Ok(out)
}

/// All gradients in name order, concatenated, and the parameter names with their lengths.
fn flat(g: &HashMap<String, Vec<f32>>) -> (Vec<f32>, Vec<(String, usize)>) {
    let mut names: Vec<&String> = g.keys().collect();
    names.sort();
    let mut v = Vec::new();
    let mut index = Vec::new();
    for n in names {
        v.extend_from_slice(&g[n]);
        index.push((n.clone(), g[n].len()));
    }
    (v, index)
}

fn check_net(t: &Target, name: &str, f: NetFn, seed: u64) -> anyhow::Result<CheckRow> {
    let run_on = |dev: &Device, dt: DType| -> anyhow::Result<(Vec<f32>, Grads)> {
        let (vm, loss) = f(dev, seed, dt)?;
        let g = grads_of(&vm, &loss)?;
        Ok((host(&loss)?, g))
    };
    let (l64, g64) = run_on(&Device::Cpu, DType::F64)?;
    let (lc, gc) = run_on(&Device::Cpu, DType::F32)?;
    let ((ld, gd), reads) = t.run(|| -> anyhow::Result<_> {
        let out = run_on(&t.device, DType::F32)?;
        // One optimiser step on the device, counted.
        let (vm, loss) = f(&t.device, seed, DType::F32)?;
        let mut opt = derm_core::optim::Optimizer::from_varmap(&vm, Default::default(), |_| true);
        let before = ops::host_reads();
        opt.backward_step(&loss)?;
        let reads = ops::host_reads() - before;
        t.device.synchronize()?;
        Ok((out, reads))
    })?;
    if gc.len() != gd.len() || g64.len() != gd.len() || gd.is_empty() {
        bail!(
            "{name}: {} parameters have a gradient in f64, {} in f32 on the CPU, {} on the device",
            g64.len(),
            gc.len(),
            gd.len()
        );
    }
    let (v64, index) = flat(&g64);
    let (vc, vd) = (flat(&gc).0, flat(&gd).0);
    let mut worst: Option<(String, f64)> = None;
    let mut at = 0;
    for (n, len) in index {
        let e = rel_err(&vd[at..at + len], &v64[at..at + len]);
        if worst.as_ref().is_none_or(|w| e > w.1) {
            worst = Some((n, e));
        }
        at += len;
    }
    let cpu = (rel_err(&lc, &l64), rel_err(&vc, &v64));
    let mut r = row(name, (rel_err(&ld, &l64), rel_err(&vd, &v64)), cpu, 1e-3);
    r.step_host_reads = Some(reads);
    r.worst_param = worst;
    r.pass &= reads == 0;
    Ok(r)
}

impl DeviceCheckArgs {
    /// Runs the check; fails when a row does not pass.
    pub fn run(&self) -> anyhow::Result<()> {
        let target = if self.device == "cpu" {
            Target { device: Device::Cpu, forced: true }
        } else {
            Target { device: derm_core::device::parse_device(&self.device)?, forced: false }
        };
        eprintln!("device-check: {} against derm's CPU kernels, seed {}", self.device, self.seed);
        let mut rows = check_ops(&target, self.seed)?;
        let nets: [(&str, NetFn); 4] = [
            ("U-Net small 64x64 b2 (BCE)", unet_loss),
            ("ResNet-50 64x64 b4 (weighted CE)", resnet50_loss),
            ("partial-conv U-Net small 64x64 b2 (inpainting loss)", pconv_loss),
            ("DCGAN 64 b8 (D and G BCE)", dcgan_loss),
        ];
        for (name, f) in nets {
            eprintln!("  {name} ...");
            rows.push(check_net(&target, name, f, self.seed)?);
        }
        println!("Relative L2 errors against the CPU kernels in f64:");
        println!("| check | device output | device grads | CPU f32 output | CPU f32 grads | tolerance | step host reads | worst device parameter | pass |");
        println!("|---|---:|---:|---:|---:|---:|---:|---|---|");
        for r in &rows {
            let reads = r.step_host_reads.map(|n| n.to_string()).unwrap_or_default();
            let worst = r.worst_param.as_ref().map(|(n, e)| format!("{n} {e:.1e}")).unwrap_or_default();
            println!(
                "| {} | {:.1e} | {:.1e} | {:.1e} | {:.1e} | {:.0e} | {reads} | {worst} | {} |",
                r.name,
                r.output_rel_err,
                r.grad_rel_err,
                r.cpu_f32_rel_err.0,
                r.cpu_f32_rel_err.1,
                r.tolerance,
                if r.pass { "yes" } else { "NO" }
            );
        }
        if let Some(p) = &self.json {
            derm_core::fsutil::write_json(p, &rows)?;
        }
        let failed: Vec<&str> = rows.iter().filter(|r| !r.pass).map(|r| r.name.as_str()).collect();
        if !failed.is_empty() {
            bail!("{} of {} checks failed: {}", failed.len(), rows.len(), failed.join("; "));
        }
        Ok(())
    }
}
