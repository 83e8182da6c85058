//! Measurements of the classifier (not a test: it writes to a temporary folder, or reads an ISIC
//! 2017 training folder given as ROOT).
//!
//! - `bench ARCH BATCH SIZE REPS [WIDTH]`: eval forward and SGD train-step times, plain and on a
//!   CutMix and a mixup batch (the mixing included).
//! - `freeze ARCH BATCH SIZE REPS`: what `--freeze-backbone` costs and saves: a full SGD step,
//!   a step that trains only `layer4` and `fc` (`--trainable-from layer4`), the frozen backbone's
//!   one-off feature pass per batch, and a head-only step on cached features.
//! - `phantom TRAIN TEST SIZE WIDTH EPOCHS [MINUTES]`: trains a ResNet-18 layout from scratch on
//!   phantoms and scores a separately drawn test set.
//! - `isic ROOT MINUTES SIZE WIDTH [freeze]`: trains on the ISIC 2017 training images (split by
//!   id) within a time budget and scores the validation part.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use derm_classify::{
    evaluate, mix, train, train_step, BatchMix, Classifier, ClassifyConfig, ExtraSources, ResNet, ResNetConfig, Stage,
    StepOptions,
};
use derm_core::optim::{OptimConfig, Optimizer, OptimizerKind};
use derm_core::train::LoopConfig;
use derm_data::dataset::Dataset;
use derm_data::phantom::{write_phantom_set, PhantomConfig};

fn arg<T: std::str::FromStr>(a: &[String], i: usize, d: T) -> T {
    a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d)
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("bench") => bench(&a),
        Some("freeze") => freeze(&a),
        Some("phantom") => phantom(&a),
        Some("isic") => isic(&a),
        _ => anyhow::bail!("usage: classify_run bench|freeze|phantom|isic ..."),
    }
}

fn bench(a: &[String]) -> anyhow::Result<()> {
    let arch: String = arg(a, 2, "resnet50".to_string());
    let (b, s, reps, width): (usize, usize, usize, usize) = (arg(a, 3, 8), arg(a, 4, 224), arg(a, 5, 3), arg(a, 6, 64));
    let cfg =
        ResNetConfig { base_width: width, ..ResNetConfig::by_name(&arch, 3).ok_or_else(|| anyhow::anyhow!("arch"))? };
    let vm = candle_nn::VarMap::new();
    let vb = derm_core::nn::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
    let net = ResNet::new(&cfg, vb)?;
    let mut opt = Optimizer::from_varmap(
        &vm,
        OptimConfig { optimizer: OptimizerKind::sgd(1e-3, 0.9), ..Default::default() },
        |_| true,
    );
    let mut r = derm_core::Rng::new(0);
    let x = Tensor::from_vec(r.normal_vec(b * 3 * s * s, 0.0, 1.0), (b, 3, s, s), &Device::Cpu)?;
    let plain = mix::Batch::unmixed(x.clone());
    let y = Tensor::new((0..b as u32).map(|i| i % 3).collect::<Vec<_>>(), &Device::Cpu)?;
    let (mut inf, mut step, mut cut, mut mixup) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    for _ in 0..reps {
        let t = Instant::now();
        let _ = net.forward_t(&x, false)?.to_vec2::<f32>()?;
        inf.push(ms(t));
        let t = Instant::now();
        train_step(&net, &mut opt, &plain, &y, Default::default())?;
        step.push(ms(t));
        for (mix, times) in [(BatchMix::CutMix { alpha: 1.0 }, &mut cut), (BatchMix::Mixup { alpha: 0.2 }, &mut mixup)]
        {
            let t = Instant::now();
            let m = mix.apply(&x, &mut r)?;
            anyhow::ensure!(m.pairing.is_some(), "{mix:?} mixes nothing");
            train_step(&net, &mut opt, &m, &y, Default::default())?;
            times.push(ms(t));
        }
    }
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let all = |v: &[f64]| v.iter().map(|v| v.round()).collect::<Vec<_>>();
    println!(
        "{} b{b} {s}x{s}: params {} infer median {:.0} ms, train step median {:.0} ms, on CutMix {:.0} ms, on \
         mixup {:.0} ms (all {:?} / {:?} / {:?} / {:?})",
        cfg.name(),
        derm_classify::parameter_count(&vm),
        med(&inf),
        med(&step),
        med(&cut),
        med(&mixup),
        all(&inf),
        all(&step),
        all(&cut),
        all(&mixup)
    );
    Ok(())
}

fn freeze(a: &[String]) -> anyhow::Result<()> {
    let arch: String = arg(a, 2, "resnet50".to_string());
    let (b, s, reps): (usize, usize, usize) = (arg(a, 3, 8), arg(a, 4, 224), arg(a, 5, 3));
    let cfg = ResNetConfig::by_name(&arch, 3).ok_or_else(|| anyhow::anyhow!("arch"))?;
    let vm = candle_nn::VarMap::new();
    let vb = derm_core::nn::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
    let net = ResNet::new(&cfg, vb)?;
    let sgd = OptimConfig { optimizer: OptimizerKind::sgd(1e-3, 0.9), ..Default::default() };
    let mut r = derm_core::Rng::new(0);
    let x = Tensor::from_vec(r.normal_vec(b * 3 * s * s, 0.0, 1.0), (b, 3, s, s), &Device::Cpu)?;
    let y = Tensor::new((0..b as u32).map(|i| i % 3).collect::<Vec<_>>(), &Device::Cpu)?;
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        f()?; // warm-up
        let mut v = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            f()?;
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(med(v))
    };
    let mut rows = Vec::new();
    let plain = mix::Batch::unmixed(x.clone());
    for from in [Stage::Conv1, Stage::Layer4] {
        let mut opt = Optimizer::from_varmap(&vm, sgd, |n| derm_classify::model::is_trainable(n, from));
        let ms = time(&mut || {
            train_step(&net, &mut opt, &plain, &y, StepOptions { trainable_from: from, ..Default::default() })?;
            Ok(())
        })?;
        rows.push((format!("train step, trainable from {from:?}"), ms));
    }
    let feats = net.pooled(&x, false, Stage::Fc)?;
    let ms = time(&mut || {
        net.pooled(&x, false, Stage::Fc)?.to_vec2::<f32>()?;
        Ok(())
    })?;
    rows.push(("frozen: feature pass (once per image and view)".into(), ms));
    let mut opt = Optimizer::from_varmap(&vm, sgd, |n| derm_classify::model::is_trainable(n, Stage::Fc));
    let ms = time(&mut || {
        let loss = derm_kernels::ops::cross_entropy(&net.head().forward(&feats)?, &y, None)?;
        opt.backward_step(&loss)?;
        Ok(())
    })?;
    rows.push(("frozen: head step on cached features".into(), ms));
    for (name, ms) in rows {
        println!("{} b{b} {s}x{s} {name}: median {ms:.1} ms ({reps} reps)", cfg.name());
    }
    Ok(())
}

fn report(tag: &str, r: &derm_classify::ClassificationReport) {
    println!(
        "{tag}: images {} mean AUC {:?} AUC {:?} balanced acc {:.4} acc {:.4} mel spec@82/89/95 {:?} confusion {:?}",
        r.images,
        r.mean_auc,
        r.auc,
        r.balanced_accuracy,
        r.accuracy,
        r.melanoma_specificity.iter().map(|s| s.specificity).collect::<Vec<_>>(),
        r.confusion.counts
    );
}

fn run_and_score(
    cfg: ClassifyConfig,
    data: &Dataset,
    test: Option<&Dataset>,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    let t = Instant::now();
    let (mut task, state) = train(cfg, data, &ExtraSources::default(), &Device::Cpu, out, false, &mut |e| {
        if let derm_core::train::Event::Eval { step, metric, best } = e {
            println!(
                "  step {step} val metric {metric:.4}{} at {:.0} s",
                if *best { " (best)" } else { "" },
                t.elapsed().as_secs_f64()
            );
        }
    })?;
    let (ntr, nval) = task.sizes();
    println!(
        "trained {} steps, {} epochs, in {:.1} s ({ntr} train / {nval} val), stop {:?}, best val metric {:?} at step {:?}",
        state.step,
        state.epoch,
        state.elapsed_s,
        state.stop_reason,
        state.best_metric,
        state.best_step
    );
    report("last weights, validation", &task.val_report()?);
    let best = Classifier::load(out, &Device::Cpu)?;
    if let Some(test) = test {
        for tta in [false, true] {
            let t = Instant::now();
            let e = evaluate(&best, test, None, tta, &mut |_| {})?;
            report(
                &format!("best checkpoint, held-out test, tta {tta} ({:.1} s)", t.elapsed().as_secs_f64()),
                &e.report,
            );
        }
    }
    Ok(())
}

fn phantom(a: &[String]) -> anyhow::Result<()> {
    let (ntrain, ntest, size, width, epochs): (usize, usize, u32, usize, usize) =
        (arg(a, 2, 390), arg(a, 3, 90), arg(a, 4, 96), arg(a, 5, 16), arg(a, 6, 10));
    let minutes: Option<f64> = a.get(7).and_then(|s| s.parse().ok());
    let d = tempfile::tempdir()?;
    let pc = PhantomConfig { size, ..Default::default() };
    let t = Instant::now();
    write_phantom_set(&d.path().join("train"), &pc, 1, ntrain)?;
    write_phantom_set(&d.path().join("test"), &pc, 2, ntest)?;
    println!("phantoms drawn in {:.1} s", t.elapsed().as_secs_f64());
    let data = Dataset::open_dir(&d.path().join("train"), None, None)?;
    let test = Dataset::open_dir(&d.path().join("test"), None, None)?;
    let cfg = ClassifyConfig {
        model: ResNetConfig { base_width: width, zero_init_residual: true, ..ResNetConfig::resnet18(3) },
        input_size: size,
        resize: size,
        batch_size: 16,
        optim: OptimConfig { optimizer: OptimizerKind::adam(2e-3), ..Default::default() },
        train: LoopConfig { epochs, minutes, ..Default::default() },
        val_fraction: 0.23,
        balanced: true,
        augment: derm_data::augment::AugmentConfig {
            hflip: true,
            vflip: true,
            rot90: true,
            crop_scale: [0.8, 1.0],
            ..derm_data::augment::AugmentConfig::geometric()
        },
        ..Default::default()
    };
    println!("config: {}", serde_json::to_string(&cfg)?);
    run_and_score(cfg, &data, Some(&test), &d.path().join("run"))
}

fn isic(a: &[String]) -> anyhow::Result<()> {
    let root: String =
        a.get(2).cloned().ok_or_else(|| anyhow::anyhow!("usage: isic ROOT MINUTES SIZE WIDTH [freeze]"))?;
    let (minutes, size, width): (f64, u32, usize) = (arg(a, 3, 10.0), arg(a, 4, 112), arg(a, 5, 16));
    let freeze = a.get(6).map(|s| s == "freeze").unwrap_or(false);
    let data = Dataset::open_dir(std::path::Path::new(&root), Some("isic2017"), Some("train"))?;
    let d = tempfile::tempdir()?;
    let cfg = ClassifyConfig {
        model: ResNetConfig { base_width: width, zero_init_residual: true, ..ResNetConfig::resnet18(3) },
        input_size: size,
        resize: (size as f64 * 256.0 / 224.0).round() as u32,
        batch_size: 16,
        optim: OptimConfig { optimizer: OptimizerKind::adam(1e-3), ..Default::default() },
        train: LoopConfig { epochs: 1000, minutes: Some(minutes), eval_every: Some(50), ..Default::default() },
        val_fraction: 0.15,
        balanced: true,
        freeze_backbone: freeze,
        augment: derm_data::augment::AugmentConfig {
            hflip: true,
            vflip: true,
            rot90: true,
            crop_scale: [1.0, 1.0],
            ..derm_data::augment::AugmentConfig::geometric()
        },
        ..Default::default()
    };
    println!("config: {}", serde_json::to_string(&cfg)?);
    run_and_score(cfg, &data, None, &d.path().join("run"))?;
    let best = Classifier::load(&d.path().join("run"), &Device::Cpu)?;
    let (_, val) = data.filter(|s| s.label.is_some()).split_by_id(0.15, 0);
    for tta in [false, true] {
        let e = evaluate(&best, &val, None, tta, &mut |_| {})?;
        report(&format!("best checkpoint, validation part, tta {tta}"), &e.report);
    }
    Ok(())
}
