//! `cargo xtask bench`: benchmarks with the same models, shapes and batch sizes as the peer's
//! `peer_bench.py` subcommands, reported as median milliseconds after warm-up, with the peer's
//! row names. `--peer` runs the peer (PyTorch, OMP_WAIT_POLICY=PASSIVE) after each of our groups,
//! interleaved on the same machine, and prints the ratio ours/peer.

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
    /// The peer folder (default ../shared/peer beside the repository).
    #[arg(long)]
    peer_dir: Option<PathBuf>,
    /// The peer's Python environment (default $PEER_VENV or ~/.cache/derm-peer-venv).
    #[arg(long)]
    peer_venv: Option<PathBuf>,
}

/// One benchmark row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// The peer's row name.
    pub name: String,
    /// Median over the timed repeats.
    pub median_ms: f64,
    /// Fastest repeat.
    pub min_ms: f64,
    /// Every timed repeat.
    pub samples_ms: Vec<f64>,
}

/// Times `f` after `warmup` untimed runs.
pub fn time(name: &str, warmup: usize, repeats: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Row> {
    for _ in 0..warmup {
        f()?;
    }
    let mut s = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        s.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut sorted = s.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let row = Row { name: name.to_string(), median_ms: sorted[sorted.len() / 2], min_ms: sorted[0], samples_ms: s };
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
    ]
}

fn seg_batch(bs: usize, size: usize, seed: u64) -> anyhow::Result<(Tensor, Tensor)> {
    let mut r = derm_core::Rng::new(seed);
    let x = Tensor::from_vec(r.uniform_vec(bs * 3 * size * size, 0.0, 1.0), (bs, 3, size, size), &Device::Cpu)?;
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
    Ok((x, Tensor::from_vec(y, (bs, 1, size, size), &Device::Cpu)?))
}

fn bench_unet_train(a: &BenchArgs) -> anyhow::Result<Vec<Row>> {
    let sizes: &[usize] = if a.quick { &[128] } else { &[128, 256] };
    let mut rows = Vec::new();
    for &size in sizes {
        let vm = candle_nn::VarMap::new();
        let net = PeerUNet::new(derm_core::nn::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu))?;
        let mut opt = derm_core::optim::Optimizer::from_varmap(&vm, Default::default(), |_| true);
        let (x, y) = seg_batch(8, size, 0)?;
        rows.push(time(&format!("unet_train_step b8 {size}x{size}"), a.warmup, a.repeats, || {
            let loss = derm_core::ops::bce_with_logits(&net.forward_t(&x, true)?, &y)?;
            opt.backward_step(&loss)?;
            Ok(())
        })?);
    }
    Ok(rows)
}

fn bench_unet_infer(a: &BenchArgs) -> anyhow::Result<Vec<Row>> {
    let vm = candle_nn::VarMap::new();
    let net = PeerUNet::new(derm_core::nn::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu))?;
    let (x, _) = seg_batch(8, 256, 0)?;
    Ok(vec![time("unet_infer b8 256x256", a.warmup, a.repeats, || {
        net.forward_t(&x, false)?;
        Ok(())
    })?])
}

fn bench_metrics(a: &BenchArgs) -> anyhow::Result<Vec<Row>> {
    use derm_core::metrics::{roc_auc, SegmentationScores};
    use derm_core::rng::splitmix_counter as u;
    // The peer's inputs (RESULTS.md): 1000 masks of 256x256 from the counter SplitMix64.
    let words = 256 * 256 / 64;
    let bits = |stream: u64, img: usize| -> Vec<u64> { (0..words).map(|w| u(0, stream, (img * words + w) as u64)).collect() };
    let unpack = |ws: &[u64]| -> Vec<u8> { ws.iter().flat_map(|w| (0..64).map(move |b| ((w >> b) & 1) as u8)).collect() };
    let (mut ma, mut mb) = (Vec::new(), Vec::new());
    for img in 0..1000 {
        let a1 = bits(1, img);
        let b1: Vec<u64> = a1.iter().zip(bits(2, img)).zip(bits(3, img)).zip(bits(4, img)).map(|(((a, b), c), d)| a ^ (b & c & d)).collect();
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
    let scores: Vec<f64> =
        (0..10000u64).map(|i| (u(0, 11, i) >> 11) as f64 * 2f64.powi(-53) + if labels[i as usize] { 0.35 } else { 0.0 }).collect();
    let auc = time("roc_auc_sklearn n=10000", a.warmup, a.repeats.max(5), || {
        std::hint::black_box(roc_auc(&scores, &labels));
        Ok(())
    })?;
    Ok(vec![glob, per, auc])
}

#[derive(Deserialize)]
struct PeerOut {
    results: Vec<PeerRow>,
}

#[derive(Deserialize)]
struct PeerRow {
    name: String,
    median_ms: Option<f64>,
}

fn run_peer(a: &BenchArgs, g: &Group) -> anyhow::Result<Vec<PeerRow>> {
    let dir = a.peer_dir.clone().unwrap_or_else(|| crate::project_root().join("../shared/peer"));
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
        eprintln!("derm bench: {} rayon threads, {} repeats after {} warm-up", rayon_threads(), self.repeats, self.warmup);
        let mut all = Vec::new();
        let mut table = Vec::new();
        for g in groups(self) {
            if self.only.as_deref().is_some_and(|o| !g.name.contains(o)) {
                continue;
            }
            eprintln!("[{}]", g.name);
            let rows = (g.run)(self)?;
            let peer = if self.peer { Some(run_peer(self, &g)?) } else { None };
            for r in &rows {
                let p = peer.as_ref().and_then(|p| p.iter().find(|x| x.name.starts_with(&r.name)).and_then(|x| x.median_ms));
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
