//! `cargo xtask bench`: benchmarks with the same models, shapes and batch sizes as the peer's
//! `peer_bench.py` subcommands, reported as median milliseconds after warm-up, with the peer's
//! row names. `--peer` runs the peer (PyTorch, OMP_WAIT_POLICY=PASSIVE) after each of our groups,
//! interleaved on the same machine, and prints the ratio ours/peer. `--rounds N` alternates the
//! two N times per group (ours, peer, ours, peer, ...) and takes each side's median over all its
//! samples, so that a slow spell of a shared machine falls on both sides rather than on one.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::peer_models::PeerUNet;

/// Arguments of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Only groups whose name contains this (unet_train, unet_infer, metrics, ...).
    #[arg(long)]
    only: Option<String>,
    /// Timed repeats per row (after one warm-up).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Warm-up runs per row.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Skip the largest shapes (256x256 U-Net training).
    #[arg(long)]
    quick: bool,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also run the PyTorch peer, interleaved, and print ours/peer.
    #[arg(long)]
    peer: bool,
    /// Rounds per group: ours then (with --peer) the peer, this many times in turn; each row's
    /// median is over the samples of all rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// The peer folder holding `peer_bench.py` (default: the repository's `bench/peer`).
    #[arg(long)]
    peer_dir: Option<PathBuf>,
    /// The peer's Python environment (default $PEER_VENV or ~/.cache/derm-peer-venv).
    #[arg(long)]
    peer_venv: Option<PathBuf>,
    /// Where the network rows run: cpu, or cuda[:N] / metal (derm built with that feature). On a
    /// GPU the rows take GPU batch sizes (U-Net and partial-conv b8 at 256, ResNet-50 training b32
    /// and inference b64 at 224, DCGAN b64 at 64) and each sample ends with a device sync; the
    /// metrics, VBP and hair groups stay on the CPU.
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl BenchArgs {
    fn dev(&self) -> anyhow::Result<Device> {
        Ok(derm_core::device::parse_device(&self.device)?)
    }

    /// Batch size of a row: `cpu` on the CPU, `gpu` on another device.
    fn batch(&self, cpu: usize, gpu: usize) -> usize {
        if self.device == "cpu" {
            cpu
        } else {
            gpu
        }
    }
}

/// Waits for the device's queued work (a no-op on the CPU), so a sample times the work itself.
fn sync(dev: &Device) -> anyhow::Result<()> {
    Ok(dev.synchronize()?)
}

/// One benchmark row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// The peer's row name.
    pub name: String,
    /// Median over the timed repeats (of every round).
    pub median_ms: f64,
    /// Fastest repeat.
    pub min_ms: f64,
    /// Every timed repeat.
    pub samples_ms: Vec<f64>,
}

/// Times `f` after `warmup` untimed runs.
pub fn time(
    name: &str,
    warmup: usize,
    repeats: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Row> {
    for _ in 0..warmup {
        f()?;
    }
    let mut s = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        s.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let row = Row::from_samples(name.to_string(), s);
    eprintln!("  {:<60} {:>10.1} ms (min {:.1})", row.name, row.median_ms, row.min_ms);
    Ok(row)
}

struct Group {
    /// Our group name = the peer's subcommand.
    name: &'static str,
    /// Extra peer arguments.
    peer_args: Vec<String>,
    run: fn(&BenchArgs) -> anyhow::Result<Vec<Row>>,
}

fn groups(a: &BenchArgs) -> Vec<Group> {
    let sizes = if a.quick { "128" } else { "128,256" };
    vec![
        Group { name: "metrics", peer_args: vec![], run: bench_metrics },
        Group { name: "unet_infer", peer_args: vec![], run: bench_unet_infer },
        Group { name: "unet_train", peer_args: vec!["--sizes".into(), sizes.into()], run: bench_unet_train },
        Group { name: "resnet50", peer_args: vec![], run: bench_resnet50 },
        Group { name: "vbp", peer_args: vec![], run: bench_vbp },
        Group { name: "pconv_train", peer_args: vec!["--mask-impls".into(), "fast".into()], run: bench_pconv },
        Group { name: "dcgan_train", peer_args: vec!["--resolutions".into(), "64".into()], run: bench_dcgan },
        Group { name: "hair", peer_args: vec![], run: bench_hair },
    ]
}

fn seg_batch(bs: usize, size: usize, seed: u64, dev: &Device) -> anyhow::Result<(Tensor, Tensor)> {
    let mut r = derm_core::Rng::new(seed);
    let x = Tensor::from_vec(r.uniform_vec(bs * 3 * size * size, 0.0, 1.0), (bs, 3, size, size), dev)?;
    let mut y = vec![0f32; bs * size * size];
    for b in 0..bs {
        let (cy, cx) = (r.uniform(0.25, 0.75) * size as f64, r.uniform(0.25, 0.75) * size as f64);
        let rad = r.uniform(0.1, 0.3) * size as f64;
        for i in 0..size {
            for j in 0..size {
                let d = (i as f64 - cy).powi(2) + (j as f64 - cx).powi(2);
                y[b * size * size + i * size + j] = if d < rad * rad { 1.0 } else { 0.0 };
            }
        }
    }
    Ok((x, Tensor::from_vec(y, (bs, 1, size, size), dev)?))
}

fn bench_unet_train(a: &BenchArgs) -> anyhow::Result<Vec<Row>> {
    let dev = a.dev()?;
    let sizes: &[usize] = if a.quick { &[128] } else { &[128, 256] };
    let mut rows = Vec::new();
    for &size in sizes {
        let vm = candle_nn::VarMap::new();
        let net = PeerUNet::new(derm_core::nn::seeded_var_builder(&vm, 0, DType::F32, &dev))?;
        let mut opt = derm_core::optim::Optimizer::from_varmap(&vm, Default::default(), |_| true);
        let (x, y) = seg_batch(8, size, 0, &dev)?;
        rows.push(time(&format!("unet_train_step b8 {size}x{size}"), a.warmup, a.repeats, || {
            let loss = derm_kernels::ops::bce_with_logits(&net.forward_t(&x, true)?, &y)?;
            opt.backward_step(&loss)?;
            sync(&dev)
        })?);
    }
    Ok(rows)
}

fn bench_unet_infer(a: &BenchArgs) -> anyhow::Result<Vec<Row>> {
    let dev = a.dev()?;
    let vm = candle_nn::VarMap::new();
    let net = PeerUNet::new(derm_core::nn::seeded_var_builder(&vm, 0, DType::F32, &dev))?;
    let (x, _) = seg_batch(8, 256, 0, &dev)?;
    Ok(vec![time("unet_infer b8 256x256", a.warmup, a.repeats, || {
        net.forward_t(&x, false)?;
        sync(&dev)
    })?])
}

fn bench_metrics(a: &BenchArgs) -> anyhow::Result<Vec<Row>> {
    use derm_core::metrics::{roc_auc, SegmentationScores};
    use derm_core::rng::splitmix_counter as u;
    // The peer's inputs (bench/peer/peer_bench.py `metrics`): 1000 masks of 256x256 from the counter SplitMix64.
    let words = 256 * 256 / 64;
    let bits =
        |stream: u64, img: usize| -> Vec<u64> { (0..words).map(|w| u(0, stream, (img * words + w) as u64)).collect() };
    let unpack =
        |ws: &[u64]| -> Vec<u8> { ws.iter().flat_map(|w| (0..64).map(move |b| ((w >> b) & 1) as u8)).collect() };
    let (mut ma, mut mb) = (Vec::new(), Vec::new());
    for img in 0..1000 {
        let a1 = bits(1, img);
        let b1: Vec<u64> = a1
            .iter()
            .zip(bits(2, img))
            .zip(bits(3, img))
            .zip(bits(4, img))
            .map(|(((a, b), c), d)| a ^ (b & c & d))
            .collect();
        ma.push(unpack(&a1));
        mb.push(unpack(&b1));
    }
    let per = time("jaccard_per_image 1000x256x256", a.warmup, a.repeats.max(5), || {
        let mut s = SegmentationScores::default();
        for (x, y) in ma.iter().zip(&mb) {
            s.add("", x, y);
        }
        std::hint::black_box(s.summary());
        Ok(())
    })?;
    let glob = time("jaccard_global 1000x256x256", a.warmup, a.repeats.max(5), || {
        let mut t = derm_core::metrics::PixelCounts::default();
        for (x, y) in ma.iter().zip(&mb) {
            t.add(&derm_core::metrics::PixelCounts::of(x, y));
        }
        std::hint::black_box(t.jaccard());
        Ok(())
    })?;
    let labels: Vec<bool> = (0..10000).map(|i| u(0, 10, i) >> 63 == 1).collect();
    let scores: Vec<f64> = (0..10000u64)
        .map(|i| (u(0, 11, i) >> 11) as f64 * 2f64.powi(-53) + if labels[i as usize] { 0.35 } else { 0.0 })
        .collect();
    let auc = time("roc_auc_sklearn n=10000", a.warmup, a.repeats.max(5), || {
        std::hint::black_box(roc_auc(&scores, &labels));
        Ok(())
    })?;
    Ok(vec![glob, per, auc])
}

fn resnet50(dev: &Device) -> anyhow::Result<(candle_nn::VarMap, derm_classify::model::ResNet)> {
    let vm = candle_nn::VarMap::new();
    let vb = derm_core::nn::seeded_var_builder(&vm, 0, DType::F32, dev);
    let net = derm_classify::model::ResNet::new(&derm_classify::model::ResNetConfig::resnet50(3), vb)?;
    Ok((vm, net))
}

fn bench_resnet50(a: &BenchArgs) -> anyhow::Result<Vec<Row>> {
    let dev = a.dev()?;
    let (vm, net) = resnet50(&dev)?;
    let mut r = derm_core::Rng::new(0);
    let batch = |n: usize, r: &mut derm_core::Rng| -> anyhow::Result<(Tensor, Tensor)> {
        let x = Tensor::from_vec(r.normal_vec(n * 3 * 224 * 224, 0.0, 1.0), (n, 3, 224, 224), &dev)?;
        let y = Tensor::from_vec((0..n as u32).map(|i| i % 3).collect::<Vec<_>>(), n, &dev)?;
        Ok((x, y))
    };
    let (bi, bt) = (a.batch(8, 64), a.batch(8, 32));
    let (xi, _) = batch(bi, &mut r)?;
    let infer = time(&format!("resnet50_infer b{bi} 224x224"), a.warmup, a.repeats, || {
        net.forward_t(&xi, false)?;
        sync(&dev)
    })?;
    let cfg = derm_core::optim::OptimConfig {
        optimizer: derm_core::optim::OptimizerKind::sgd(1e-3, 0.9),
        ..Default::default()
    };
    let mut opt = derm_core::optim::Optimizer::from_varmap(&vm, cfg, |_| true);
    let (x, y) = batch(bt, &mut r)?;
    let x = derm_classify::mix::Batch::unmixed(x);
    let train = time(&format!("resnet50_train_step b{bt} 224x224 SGD m0.9"), a.warmup, a.repeats, || {
        derm_classify::train_step(&net, &mut opt, &x, &y, Default::default())?;
        sync(&dev)
    })?;
    Ok(vec![infer, train])
}

fn bench_vbp(a: &BenchArgs) -> anyhow::Result<Vec<Row>> {
    let (_vm, net) = resnet50(&Device::Cpu)?;
    let mut r = derm_core::Rng::new(0);
    let x = Tensor::from_vec(r.normal_vec(3 * 224 * 224, 0.0, 1.0), (1, 3, 224, 224), &Device::Cpu)?;
    let full = time("vbp_resnet50 1x3x224x224 (forward + VBP)", a.warmup, a.repeats.max(5), || {
        let f = net.forward_features(&x, false)?;
        let mut st = vec![f.stem];
        st.extend(f.layers);
        derm_vbp::visual_backprop(&st, &derm_vbp::resnet_steps(1), (224, 224))?;
        Ok(())
    })?;
    let f = net.forward_features(&x, false)?;
    let mut st = vec![f.stem];
    st.extend(f.layers);
    let post = time(
        "vbp_postprocess_only (channel means + ConvT-of-ones chain + normalise)",
        a.warmup,
        a.repeats.max(5),
        || {
            derm_vbp::visual_backprop(&st, &derm_vbp::resnet_steps(1), (224, 224))?;
            Ok(())
        },
    )?;
    Ok(vec![full, post])
}

fn bench_pconv(a: &BenchArgs) -> anyhow::Result<Vec<Row>> {
    use derm_purify::{
        inpainting_loss, LossWeights, MaskConfig, MaskGenerator, MaskLibrary, PConvUNetConfig, Purifier, PurifyConfig,
    };
    let dev = a.dev()?;
    let bs = a.batch(4, 8);
    let cfg = PurifyConfig { model: PConvUNetConfig::peer(), size: 256, batch_size: bs, ..Default::default() };
    let p = Purifier::new(cfg.clone(), &dev)?;
    let mut opt = derm_core::optim::Optimizer::from_varmap(&p.varmap, cfg.optim, |_| true);
    let mut rng = derm_core::Rng::new(0);
    let gen = MaskGenerator::new(MaskConfig::default(), MaskLibrary::default())?;
    let holes: Vec<image::GrayImage> = (0..bs).map(|_| gen.generate(256, 256, &mut rng)).collect();
    let hrefs: Vec<&image::GrayImage> = holes.iter().collect();
    let t = Tensor::from_vec(rng.uniform_vec(bs * 3 * 256 * 256, -1.0, 1.0), (bs, 3, 256, 256), &dev)?;
    let valid = derm_core::image_io::masks_to_tensor(&hrefs, &dev)?.affine(-1.0, 1.0)?;
    Ok(vec![time(&format!("pconv_train_step b{bs} 256x256 L5 mask=fast"), a.warmup, a.repeats, || {
        let out = p.net.forward_t(&t.broadcast_mul(&valid)?, &valid, true)?;
        let (loss, _) =
            inpainting_loss(&out, &t, &valid, &LossWeights::default(), None, derm_core::image_io::Normalize::HALF)?;
        opt.backward_step(&loss)?;
        sync(&dev)
    })?])
}

fn bench_dcgan(a: &BenchArgs) -> anyhow::Result<Vec<Row>> {
    use derm_synth::{GanConfig, GanTrainer, SynthConfig};
    let dev = a.dev()?;
    let mut cfg = SynthConfig {
        model: GanConfig::peer64(),
        batch_size: 64,
        g_steps: 1,
        classes: vec!["x".into()],
        ..Default::default()
    };
    cfg.flip = false;
    let mut r = derm_core::Rng::new(0);
    let real = Tensor::from_vec(r.uniform_vec(64 * 3 * 64 * 64, -1.0, 1.0), (64, 3, 64, 64), &dev)?;
    let mut t = GanTrainer::new(cfg, vec![real], &dev)?;
    let mut rng = derm_core::Rng::new(1);
    Ok(vec![time("dcgan_joint_step b64 64x64", a.warmup, a.repeats, || {
        t.step(0, 0, &mut rng)?;
        sync(&dev)
    })?])
}

fn bench_hair(a: &BenchArgs) -> anyhow::Result<Vec<Row>> {
    let img = derm_hair::eval::benchmark_image();
    // The peer's row is black-hat, threshold and dilation only: compare with ruler search off,
    // and report the full mask (rulers and ink marks too) as a second row.
    let cfg = derm_hair::HairConfig { rulers: false, ..Default::default() };
    let mask = derm_hair::hair_mask(&img, None, &cfg)?;
    let m = time("hair_mask (Luv->L, blackhat, thresh, dilate)", a.warmup.max(2), a.repeats.max(10), || {
        derm_hair::hair_mask(&img, None, &cfg)?;
        Ok(())
    })?;
    let full_cfg = derm_hair::HairConfig::default();
    let full = time("hair_mask with ruler and ink search (derm only)", a.warmup.max(2), a.repeats.max(10), || {
        derm_hair::hair_mask(&img, None, &full_cfg)?;
        Ok(())
    })?;
    let i = time("hair_inpaint (cv2.inpaint TELEA)", a.warmup.max(2), a.repeats.max(10), || {
        derm_hair::inpaint(&img, &mask, &cfg)?;
        Ok(())
    })?;
    // Issue 18's size goal: a 4000 x 3000 photograph, mask (with the lesion) and cleaning, in
    // under a second on 2 cores.
    let (big, lesion) = derm_hair::eval::large_benchmark_scene(4000, 3000, None);
    let large = time("hair_mask + clean 4000x3000 (derm only)", a.warmup.max(1), a.repeats.max(3), || {
        let m = derm_hair::hair_mask(&big, Some(&lesion), &full_cfg)?;
        derm_hair::clean_mask(&big, m, &full_cfg)?;
        Ok(())
    })?;
    Ok(vec![m, full, i, large])
}

#[derive(Deserialize)]
struct PeerOut {
    results: Vec<PeerRow>,
}

#[derive(Deserialize)]
struct PeerRow {
    name: String,
    median_ms: Option<f64>,
    #[serde(default)]
    samples_ms: Vec<f64>,
}

/// The median of some samples (the upper one of an even count, as [`time`] takes).
fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

impl Row {
    /// A row whose median and minimum are those of `samples`.
    fn from_samples(name: String, samples: Vec<f64>) -> Row {
        let min_ms = samples.iter().copied().fold(f64::INFINITY, f64::min);
        Row { name, median_ms: median(&samples), min_ms, samples_ms: samples }
    }
}

/// Adds one round's rows to the rows so far (matched by name), keeping every sample.
fn merge_rows(all: &mut Vec<Row>, round: Vec<Row>) {
    for r in round {
        match all.iter().position(|a| a.name == r.name) {
            Some(i) => {
                let mut samples = std::mem::take(&mut all[i].samples_ms);
                samples.extend(r.samples_ms);
                all[i] = Row::from_samples(r.name, samples);
            }
            None => all.push(r),
        }
    }
}

/// The peer's rows as [`Row`]s (a row without samples keeps its median as its one sample).
fn peer_rows(rows: Vec<PeerRow>) -> Vec<Row> {
    rows.into_iter()
        .filter_map(|p| {
            let samples = if p.samples_ms.is_empty() { vec![p.median_ms?] } else { p.samples_ms };
            Some(Row::from_samples(p.name, samples))
        })
        .collect()
}

fn run_peer(a: &BenchArgs, g: &Group) -> anyhow::Result<Vec<PeerRow>> {
    let dir = a.peer_dir.clone().unwrap_or_else(|| crate::project_root().join("bench/peer"));
    let venv = a.peer_venv.clone().or_else(|| std::env::var_os("PEER_VENV").map(PathBuf::from)).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache/derm-peer-venv")
    });
    let py = venv.join("bin/python");
    if !py.exists() {
        bail!("no peer environment at {} (run {}/setup.sh once)", venv.display(), dir.display());
    }
    let out = Command::new(&py)
        .arg(dir.join("peer_bench.py"))
        .arg(g.name)
        .args(["--repeats", &a.repeats.to_string(), "--warmup", &a.warmup.to_string(), "--threads", "2"])
        .args(&g.peer_args)
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .output()
        .with_context(|| format!("running {}", py.display()))?;
    if !out.status.success() {
        bail!("peer {} failed: {}", g.name, String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).context("peer printed no JSON")?;
    Ok(serde_json::from_str::<PeerOut>(line)?.results)
}

impl BenchArgs {
    /// Runs the benchmarks.
    pub fn run(&self) -> anyhow::Result<()> {
        if self.peer && self.device != "cpu" {
            bail!("--peer runs the PyTorch peer on the CPU; on a GPU run bench/peer/cuda_bench.py (scripts/gpu-check.sh does)");
        }
        eprintln!(
            "derm bench: {} rayon threads, {} repeats after {} warm-up, {} round(s)",
            rayon_threads(),
            self.repeats,
            self.warmup,
            self.rounds.max(1)
        );
        let mut all = Vec::new();
        let mut table = Vec::new();
        for g in groups(self) {
            if self.only.as_deref().is_some_and(|o| !g.name.contains(o)) {
                continue;
            }
            let (mut rows, mut peer) = (Vec::new(), Vec::new());
            for round in 0..self.rounds.max(1) {
                if self.rounds > 1 {
                    eprintln!("[{}] round {} of {}", g.name, round + 1, self.rounds);
                } else {
                    eprintln!("[{}]", g.name);
                }
                merge_rows(&mut rows, (g.run)(self)?);
                if derm_kernels::profile::enabled() {
                    eprintln!("  kernel time over the whole group (warm-up and repeats), DERM_PROFILE:");
                    for (name, ms, calls) in derm_kernels::profile::report() {
                        eprintln!("    {name:<28} {ms:>10.1} ms {calls:>7} calls");
                    }
                }
                if self.peer {
                    merge_rows(&mut peer, peer_rows(run_peer(self, &g)?));
                }
            }
            for r in &rows {
                let p = peer.iter().find(|x| x.name.starts_with(&r.name)).map(|x| x.median_ms);
                table.push((r.name.clone(), r.median_ms, p));
            }
            all.extend(rows);
        }
        println!("| row | derm median ms | peer median ms | ratio derm/peer |");
        println!("|---|---:|---:|---:|");
        for (n, ours, p) in &table {
            match p {
                Some(p) => println!("| {n} | {ours:.1} | {p:.1} | {:.2} |", ours / p),
                None => println!("| {n} | {ours:.1} | | |"),
            }
        }
        if let Some(path) = &self.json {
            derm_core::fsutil::write_json(path, &all)?;
        }
        Ok(())
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
