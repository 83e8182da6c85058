//! Measurements for derm-synth (not a test; run in the dev or release profile):
//!
//! - `step [batch] [repeats]`: time per joint step (one discriminator update and one generator
//!   update) of the peer64 preset on random 64x64 images, like the peer's `dcgan_joint_step`;
//! - `phantoms [minutes] [count]`: trains the small preset on phantom melanomas for a time
//!   budget, samples images, and reports the real-versus-generated classifier's held-out
//!   accuracy against fresh phantoms of the same class.

use std::time::Instant;

use derm_core::image_io::Normalize;
use derm_core::{Device, Rng, Tensor};
use derm_data::dataset::Dataset;
use derm_data::phantom::{write_phantom_set, PhantomConfig};
use derm_synth::train::{load_class_images, GanTrainer};
use derm_synth::{GanConfig, RealFakeConfig, SynthConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: f64| args.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(d);
    match args.get(1).map(String::as_str) {
        Some("step") => step(arg(2, 64.0) as usize, arg(3, 3.0) as usize),
        Some("phantoms") => phantoms(arg(2, 10.0), arg(3, 900.0) as usize),
        _ => anyhow::bail!("usage: synth_measure step [batch] [repeats] | phantoms [minutes] [count]"),
    }
}

fn step(batch: usize, repeats: usize) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for g_steps in [1usize, 2] {
        let mut cfg = SynthConfig {
            model: GanConfig::peer64(),
            batch_size: batch,
            g_steps,
            classes: vec!["x".into()],
            ..Default::default()
        };
        cfg.flip = false;
        let mut r = Rng::new(0);
        let real = Tensor::from_vec(r.uniform_vec(batch * 3 * 64 * 64, -1.0, 1.0), (batch, 3, 64, 64), &dev)?;
        let mut t = GanTrainer::new(cfg, vec![real], &dev)?;
        let mut rng = Rng::new(1);
        t.step(0, 0, &mut rng)?; // warm-up
        let mut ms = Vec::new();
        for _ in 0..repeats {
            let s = Instant::now();
            t.step(0, 0, &mut rng)?;
            ms.push(s.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        println!(
            "peer64 b{batch} 64x64, g_steps {g_steps}: median {:.0} ms, samples {:?}",
            ms[ms.len() / 2],
            ms.iter().map(|v| v.round()).collect::<Vec<_>>()
        );
    }
    Ok(())
}

fn phantoms(minutes: f64, count: usize) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let d = std::env::temp_dir().join(format!("derm-synth-measure-{}", std::process::id()));
    let pc = PhantomConfig { size: 64, ..PhantomConfig::default() };
    write_phantom_set(&d.join("train"), &pc, 1, count)?;
    write_phantom_set(&d.join("fresh"), &pc, 2, count)?;
    let data = Dataset::open_dir(&d.join("train"), None, None)?;
    let mut cfg =
        SynthConfig { classes: vec!["melanoma".into()], dataset_classes: data.classes.clone(), ..Default::default() };
    cfg.train.minutes = Some(minutes);
    cfg.train.epochs = 100_000;
    cfg.early_stop.patience = 0;
    let out = d.join("run");
    let s = Instant::now();
    let (t, st) = derm_synth::train(cfg.clone(), &data, &dev, &out, false, &mut |_| {})?;
    println!(
        "trained {} steps in {:.1} s ({}); best quality proxy {:?} at {:?}",
        st.step,
        s.elapsed().as_secs_f64(),
        st.stop_reason.as_deref().unwrap_or(""),
        st.best_metric,
        st.best_step
    );
    for h in st.history.iter().step_by((st.history.len() / 10).max(1)) {
        println!(
            "  step {:5} D {:.3} (real {:.3} fake {:.3}) G {:.3} quality {:.5}",
            h.step,
            h.parts["d_real"] + h.parts["d_fake"],
            h.parts["d_real"],
            h.parts["d_fake"],
            h.parts["g"],
            h.metric.unwrap_or(f64::NAN)
        );
    }
    let fresh = Dataset::open_dir(&d.join("fresh"), None, None)?;
    let real_t = load_class_images(&fresh, &cfg.classes, 64, Normalize::HALF, &dev)?;
    let real = derm_core::image_io::tensor_to_images(&real_t[0], Normalize::HALF)?;
    for which in ["best", "last"] {
        let synth = derm_synth::Synthesizer::load(&out.join(which), &dev)?;
        let fake = synth.generate(0, real.len(), 99)?;
        let rep = derm_synth::real_vs_fake(&real, &fake, &RealFakeConfig::default(), &dev)?;
        println!(
            "{which}: real-vs-generated on {} + {} images: held-out accuracy {:.3} (train {:.3})",
            real.len(),
            fake.len(),
            rep.test_accuracy,
            rep.train_accuracy
        );
    }
    let _ = t;
    println!("run folder {}", out.display());
    Ok(())
}
