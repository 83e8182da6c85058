//! GAN training: the joint step, the stabilisers, checks, sample grids, checkpoints and resume.
//!
//! One *step* is one discriminator update followed by `g_steps` generator updates:
//!
//! 1. a batch of real images per class (random flips), one latent batch through the generator
//!    (all heads); the discriminator's loss is `BCE(D(real), real_label) + BCE(D(fake), 0)`,
//!    averaged over the classes, with the generated images detached;
//! 2. the generator's loss is `BCE(D(fake), 1)` (the non-saturating loss), or with feature
//!    matching the squared distance between the mean features (the activations entering the
//!    discriminator's last layer) of the real batch and of the generated one; the first
//!    generator update reuses step 1's images, the others draw new latents.
//!
//! Every loss is the stable binary cross-entropy with logits (`derm_kernels::ops`), so a confident
//! discriminator gives large but finite losses. Every `eval_every` steps a *check* computes a
//! cheap quality proxy on a fixed latent batch (a diagonal Fréchet distance between real and
//! generated images' 8x8 colour layouts, see [`quality_distance`]), keeps `best/` at its lowest,
//! and stops the run when the discriminator has won `d_win_checks` checks in a row or the proxy
//! has not improved for `patience` checks. `last/` (both networks, both optimisers, config,
//! [`TrainState`]) is written every `checkpoint_every` steps and at the end; a run resumes from it
//! exactly, because each step's random draws depend only on (seed, step). The loop itself is
//! derm-core's ([`derm_core::train::run`]); [`GanTrainer`] is its [`Task`].

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use derm_core::checkpoint::{self, CheckpointData};
use derm_core::image_io::{self, Normalize};
use derm_core::optim::Optimizer;
use derm_core::train::{self, Direction, Event, StepLoss, Task, TrainState};
use derm_core::{Error, Result, Rng};
use derm_data::cache::ImageCache;
use derm_data::dataset::Dataset;
use derm_data::sampler::{Sampler, ShuffleSampler};
use image::RgbImage;

use crate::sample::{Synthesizer, OPTIM_G};
use crate::{DataSource, RunInfo, RunKind, SynthConfig};

/// The loss components a GAN adds to each history row ([`derm_core::train::HistoryPoint::parts`]):
/// means since the previous row of the discriminator's loss on real and on generated images, the
/// generator's loss, and whether the discriminator won that check (1) or not (0).
pub const PARTS: [&str; 4] = ["d_real", "d_fake", "g", "d_won"];

/// Losses of one step, as tensors left on the device (unread: a host read is a GPU sync).
#[derive(Debug, Clone)]
pub struct StepLosses {
    /// (3,) f32: the discriminator's loss on real images, on generated images, and the
    /// generator's loss of its last update.
    pub losses: Tensor,
    /// The discriminator's and the generator's gradient norms, summed (non-finite when either
    /// is).
    pub grad_norm: Tensor,
}

/// Summary statistics of a batch's 8x8 colour layouts, for [`quality_distance`].
#[derive(Debug, Clone)]
pub struct LayoutStats {
    mean: Vec<f32>,
    std: Vec<f32>,
}

/// Mean and standard deviation over the batch of each value of the images' 8x8 average-pooled
/// colour layouts (images (N, C, S, S), S a multiple of 8).
pub fn layout_stats(x: &Tensor) -> Result<LayoutStats> {
    let (n, c, h, w) = x.dims4()?;
    let (fh, fw) = (h / 8, w / 8);
    if fh == 0 || fw == 0 || h % 8 != 0 || w % 8 != 0 {
        return Err(Error::invalid(format!("layout_stats: {h}x{w} images are not a multiple of 8")));
    }
    let f = x.reshape((n, c, 8, fh, 8, fw))?.mean(5)?.mean(3)?.reshape((n, c * 64))?;
    let mean = f.mean(0)?;
    let var = f.broadcast_sub(&mean)?.sqr()?.mean(0)?;
    Ok(LayoutStats { mean: mean.to_vec1()?, std: var.sqrt()?.to_vec1()? })
}

/// The quality proxy: a diagonal Fréchet distance between two sets of layout statistics,
/// `mean((mu_a - mu_b)^2 + (sd_a - sd_b)^2)`. Zero for identical statistics; it grows as the
/// generated images' colours, layout or variety drift from the real ones (collapse to a few
/// images shrinks the standard deviations). Cheap, and blind to fine texture.
pub fn quality_distance(a: &LayoutStats, b: &LayoutStats) -> f64 {
    let n = a.mean.len().max(1) as f64;
    let m: f64 = a.mean.iter().zip(&b.mean).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let s: f64 = a.std.iter().zip(&b.std).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    (m + s) / n
}

/// The real images of each class `classes` (names of `data.classes`), resized to `size`, as
/// normalised tensors (N_c, 3, size, size).
pub fn load_class_images(
    data: &Dataset,
    classes: &[String],
    size: u32,
    norm: Normalize,
    device: &Device,
) -> Result<Vec<Tensor>> {
    let cache = ImageCache::new(0);
    let mut out = Vec::new();
    for name in classes {
        let idx = data.classes.iter().position(|c| c == name).ok_or_else(|| {
            Error::invalid(format!("{} has no class {name:?}; its classes are {}", data.name, data.classes.join(", ")))
        })?;
        let sub = data.filter(|s| s.label == Some(idx));
        if sub.len() < 2 {
            return Err(Error::invalid(format!(
                "{} split {}: {} image(s) of class {name}, at least 2 are needed",
                data.name,
                data.split,
                sub.len()
            )));
        }
        let mut parts = Vec::new();
        let all: Vec<usize> = (0..sub.len()).collect();
        for chunk in all.chunks(256) {
            let items = sub.load_items(chunk, Some((size, size)), &cache)?;
            let imgs: Vec<&RgbImage> = items.iter().map(|i| &i.image).collect();
            parts.push(image_io::images_to_tensor(&imgs, norm, device)?);
        }
        out.push(Tensor::cat(&parts, 0)?);
    }
    Ok(out)
}

/// A GAN being trained.
pub struct GanTrainer {
    /// The networks.
    pub synth: Synthesizer,
    opt_g: Optimizer,
    opt_d: Optimizer,
    reals: Vec<Tensor>,
    real_stats: Vec<LayoutStats>,
    fixed_z: Tensor,
    /// The steps' (3,) losses since the last check, unread.
    acc: Vec<Tensor>,
}

impl GanTrainer {
    /// Sets up training of `cfg` on real images per class (`reals[c]`: (N_c, C, S, S),
    /// normalised).
    pub fn new(cfg: SynthConfig, reals: Vec<Tensor>, device: &Device) -> Result<Self> {
        if reals.len() != cfg.classes.len() {
            return Err(Error::invalid(format!("{} classes but real images for {}", cfg.classes.len(), reals.len())));
        }
        let s = cfg.model.size;
        for (r, name) in reals.iter().zip(&cfg.classes) {
            let d = r.dims();
            if d.len() != 4 || d[1] != cfg.model.channels || d[2] != s || d[3] != s || d[0] < 2 {
                return Err(Error::invalid(format!(
                    "real images of {name}: shape {d:?}, expected (>=2, {}, {s}, {s})",
                    cfg.model.channels
                )));
            }
        }
        let synth = Synthesizer::new(cfg.clone(), device)?;
        let opt_g = Optimizer::from_varmap(&synth.varmap, cfg.optim_g, |n| n.starts_with("g."));
        let opt_d = Optimizer::from_varmap(&synth.varmap, cfg.optim_d, |n| n.starts_with("d."));
        let real_stats = reals.iter().map(layout_stats).collect::<Result<_>>()?;
        let nz = cfg.grid_images.max(cfg.quality_samples).max(2);
        let fixed_z = synth.latents(nz, cfg.train.seed ^ 0xf1ed)?;
        Ok(GanTrainer { synth, opt_g, opt_d, reals, real_stats, fixed_z, acc: Vec::new() })
    }

    /// The configuration.
    pub fn config(&self) -> &SynthConfig {
        &self.synth.cfg
    }

    /// Steps per epoch: one pass over the largest class.
    pub fn steps_per_epoch(&self) -> usize {
        let bs = self.config().batch_size.max(1);
        self.reals.iter().map(|r| r.dim(0).unwrap_or(0) / bs).max().unwrap_or(0).max(1)
    }

    /// The real batch of class `head` for (epoch, batch): a seeded permutation per epoch and
    /// class, taken cyclically, with random flips.
    fn real_batch(&self, head: usize, epoch: usize, batch: usize, rng: &mut Rng) -> Result<Tensor> {
        let cfg = self.config();
        let r = &self.reals[head];
        let n = r.dim(0)?;
        let bs = cfg.batch_size;
        let perm = ShuffleSampler::stream(n, cfg.train.seed, head as u64).epoch_indices(epoch as u64);
        let idx: Vec<u32> = (0..bs).map(|j| perm[(batch * bs + j) % n] as u32).collect();
        let mut x = r.index_select(&Tensor::new(idx, r.device())?, 0)?;
        if cfg.flip {
            for dim in [3usize, 2] {
                let m: Vec<f32> = (0..bs).map(|_| if rng.bernoulli(0.5) { 1.0 } else { 0.0 }).collect();
                let m = Tensor::from_vec(m, (bs, 1, 1, 1), r.device())?;
                let flipped = x.flip(&[dim])?;
                x = (x.broadcast_mul(&m.affine(-1.0, 1.0)?)? + flipped.broadcast_mul(&m)?)?;
            }
        }
        Ok(x)
    }

    fn latent_batch(&self, rng: &mut Rng) -> Result<Tensor> {
        let (bs, l) = (self.config().batch_size, self.config().model.latent);
        Ok(Tensor::from_vec(rng.normal_vec(bs * l, 0.0, 1.0), (bs, l), &self.synth.device)?)
    }

    /// One step (a discriminator update and `g_steps` generator updates) on batch `batch` of
    /// epoch `epoch`.
    pub fn step(&mut self, epoch: usize, batch: usize, rng: &mut Rng) -> Result<StepLosses> {
        let cfg = self.synth.cfg.clone();
        let heads = cfg.classes.len();
        let reals: Vec<Tensor> = (0..heads).map(|h| self.real_batch(h, epoch, batch, rng)).collect::<Result<_>>()?;
        let z = self.latent_batch(rng)?;
        let fakes = self.synth.generator.forward_all(&z, true)?;
        let detached: Vec<Tensor> = fakes.iter().map(|f| f.detach()).collect();
        let d_real = self.synth.discriminator.forward_heads(&reals, true, None)?;
        let d_fake = self.synth.discriminator.forward_heads(&detached, true, None)?;
        let (mut lr, mut lf) = (Vec::new(), Vec::new());
        for (r, f) in d_real.iter().zip(&d_fake) {
            lr.push(derm_kernels::ops::bce_with_logits(
                &r.logits,
                &r.logits.ones_like()?.affine(cfg.real_label, 0.0)?,
            )?);
            lf.push(derm_kernels::ops::bce_with_logits(&f.logits, &f.logits.zeros_like()?)?);
        }
        let loss_real = (Tensor::stack(&lr, 0)?.mean_all()?).detach();
        let loss_fake = (Tensor::stack(&lf, 0)?.mean_all()?).detach();
        let loss_d = (Tensor::stack(&lr, 0)?.mean_all()? + Tensor::stack(&lf, 0)?.mean_all()?)?;
        let mut norm = self.opt_d.backward_step(&loss_d)?;
        let real_feats: Vec<Tensor> = if cfg.feature_matching {
            d_real.iter().map(|o| o.features.detach().mean(0)).collect::<candle_core::Result<_>>()?
        } else {
            Vec::new()
        };
        let mut lg = Tensor::zeros((), DType::F32, &self.synth.device)?;
        let mut fakes = Some(fakes);
        for _ in 0..cfg.g_steps {
            let xs = match fakes.take() {
                Some(f) => f,
                None => self.synth.generator.forward_all(&self.latent_batch(rng)?, true)?,
            };
            let out = self.synth.discriminator.forward_heads(&xs, true, None)?;
            let mut terms = Vec::new();
            for (c, o) in out.iter().enumerate() {
                terms.push(if cfg.feature_matching {
                    (o.features.mean(0)? - &real_feats[c])?.sqr()?.mean_all()?
                } else {
                    derm_kernels::ops::bce_with_logits(&o.logits, &o.logits.ones_like()?)?
                });
            }
            let loss_g = Tensor::stack(&terms, 0)?.mean_all()?;
            let g_norm = self.opt_g.backward_step(&loss_g)?.to_dtype(norm.dtype())?;
            norm = (norm + g_norm)?;
            lg = loss_g.detach();
        }
        let losses = Tensor::stack(
            &[loss_real, loss_fake, lg]
                .map(|t| t.to_dtype(DType::F32))
                .into_iter()
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        Ok(StepLosses { losses, grad_norm: norm })
    }

    /// The quality proxy averaged over the classes (lower is better).
    pub fn quality(&self) -> Result<f64> {
        let q = self.config().quality_samples.max(2);
        let z = self.fixed_z.narrow(0, 0, q.min(self.fixed_z.dim(0)?))?;
        let mut sum = 0.0;
        for (h, rs) in self.real_stats.iter().enumerate() {
            let x = self.synth.generate_tensor(h, &z)?;
            sum += quality_distance(rs, &layout_stats(&x)?);
        }
        Ok(sum / self.real_stats.len().max(1) as f64)
    }

    /// A grid of the fixed latents' images: one row block per class.
    pub fn grid(&self) -> Result<RgbImage> {
        let n = self.config().grid_images.max(1).min(self.fixed_z.dim(0)?);
        let z = self.fixed_z.narrow(0, 0, n)?;
        let cols = (n as f64).sqrt().ceil() as usize;
        let mut blocks = Vec::new();
        for h in 0..self.reals.len() {
            let x = self.synth.generate_tensor(h, &z)?;
            blocks.push(tile(
                &image_io::tensor_to_images(&x.to_device(&Device::Cpu)?, self.config().normalize)?,
                cols,
                2,
            ));
        }
        Ok(tile(&blocks, 1, 6))
    }

    fn write_grid(&self, out: &Path, step: usize, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        let p = out.join("samples").join(format!("step_{step:06}.png"));
        image_io::save_png(&p, &self.grid()?)?;
        on_event(&Event::Figure(p));
        Ok(())
    }
}

/// The GAN through derm-core's training loop: a step is [`GanTrainer::step`], the metric the
/// quality proxy (lower is better), and the early stops are the discriminator winning
/// `d_win_checks` checks in a row or the proxy not improving for `patience` checks.
impl Task for GanTrainer {
    fn batches_per_epoch(&self) -> usize {
        self.steps_per_epoch()
    }

    /// The generator's optimiser takes `g_steps` updates per step.
    fn set_horizon(&mut self, steps: usize) {
        self.opt_d.set_horizon(steps);
        self.opt_g.set_horizon(steps * self.synth.cfg.g_steps.max(1));
    }

    fn train_batch(&mut self, epoch: usize, batch: usize, rng: &mut Rng) -> Result<StepLoss> {
        let l = self.step(epoch, batch, rng)?;
        self.acc.push(l.losses.clone());
        // Any non-finite part makes the sum non-finite, which stops the loop.
        Ok(StepLoss { loss: l.losses.sum_all()?, grad_norm: Some(l.grad_norm) })
    }

    fn evaluate(&mut self) -> Result<Option<f64>> {
        self.quality().map(Some)
    }

    fn metric_direction(&self) -> Direction {
        Direction::Lower
    }

    fn history_parts(&mut self) -> BTreeMap<String, f64> {
        let acc = std::mem::take(&mut self.acc);
        // One read for all the steps since the last check.
        let mean = match acc.is_empty() {
            true => Ok(vec![0.0; 3]),
            false => Tensor::stack(&acc, 0).and_then(|t| t.mean(0)?.to_vec1::<f32>()),
        };
        let (d_real, d_fake, g) = match mean.as_deref() {
            Ok([a, b, c]) => (f64::from(*a), f64::from(*b), f64::from(*c)),
            other => {
                tracing::warn!("could not read the GAN losses for the history: {other:?}");
                return BTreeMap::new();
            }
        };
        let es = &self.config().early_stop;
        let d_won = d_fake < es.d_fake_loss_below && g > es.g_loss_above;
        PARTS.iter().map(|k| k.to_string()).zip([d_real, d_fake, g, f64::from(u8::from(d_won))]).collect()
    }

    fn stop_reason(&mut self, state: &mut TrainState) -> Option<String> {
        let es = &self.config().early_stop;
        let d_won = state.history.last().and_then(|h| h.parts.get("d_won")).is_some_and(|v| *v > 0.5);
        let streak = if d_won { state.task["d_win_streak"].as_u64().unwrap_or(0) + 1 } else { 0 };
        state.task = serde_json::json!({ "d_win_streak": streak });
        if es.d_win_checks > 0 && streak >= es.d_win_checks as u64 {
            tracing::warn!(step = state.step, "the discriminator won {streak} checks in a row; stopping");
            Some("discriminator_won".into())
        } else if es.patience > 0 && state.evals_since_best >= es.patience {
            tracing::info!(step = state.step, best_step = ?state.best_step, "sample quality stopped improving; stopping");
            Some("quality_plateau".into())
        } else {
            None
        }
    }

    fn after_step(&mut self, out: &Path, step: usize, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        let every = self.config().sample_every;
        if every > 0 && step.is_multiple_of(every) {
            self.write_grid(out, step, on_event)?;
        }
        Ok(())
    }

    fn finish(&mut self, out: &Path, state: &TrainState, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        self.write_grid(out, state.step, on_event)?;
        derm_core::fsutil::write_json(&out.join("history.json"), state)
    }

    /// Both networks, both optimisers (`optim.safetensors` for the discriminator,
    /// `optim_g.safetensors` for the generator), config, meta and `state`, atomically.
    fn save(&self, dir: &Path, state: &TrainState) -> Result<()> {
        let mut meta = self.synth.meta();
        meta.extra["step"] = serde_json::json!(state.step);
        meta.extra["quality"] = serde_json::json!(state.history.last().and_then(|h| h.metric));
        checkpoint::save(
            dir,
            &CheckpointData {
                extra_optimizers: &[(OPTIM_G, &self.opt_g)],
                ..CheckpointData::training(&self.synth.varmap, &self.synth.cfg, &meta, &self.opt_d, state)
            },
        )
    }

    fn restore(&mut self, dir: &Path, _state: &TrainState) -> Result<()> {
        let dir = checkpoint::restore_training(dir, &self.synth.varmap, &mut self.opt_d)?;
        checkpoint::load_optimizer(&dir, OPTIM_G, &mut self.opt_g)
    }

    fn check_resumable(&self, dir: &Path) -> Result<()> {
        let cfg = self.config();
        train::check_saved(
            dir,
            |s: &SynthConfig| s.model == cfg.model && s.classes == cfg.classes,
            "model shape or classes",
        )
    }
}

/// Images side by side in a grid of `cols` columns with `pad` pixels of white between them
/// (cells as large as the largest image).
pub fn tile(images: &[RgbImage], cols: usize, pad: u32) -> RgbImage {
    let cols = cols.max(1);
    let rows = images.len().div_ceil(cols).max(1);
    let cw = images.iter().map(|i| i.width()).max().unwrap_or(1);
    let ch = images.iter().map(|i| i.height()).max().unwrap_or(1);
    let (w, h) = (cols as u32 * (cw + pad) + pad, rows as u32 * (ch + pad) + pad);
    let mut out = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    for (k, img) in images.iter().enumerate() {
        let (x, y) = ((k % cols) as u32 * (cw + pad) + pad, (k / cols) as u32 * (ch + pad) + pad);
        image::imageops::replace(&mut out, img, x as i64, y as i64);
    }
    out
}

/// Trains a GAN for `cfg.classes` of `data` into the model folder `out` (resuming from
/// `<out>/last` when `resume` is set and it exists).
pub fn train(
    cfg: SynthConfig,
    data: &Dataset,
    device: &Device,
    out: &Path,
    resume: bool,
    on_event: &mut dyn FnMut(&Event),
) -> Result<(GanTrainer, TrainState)> {
    cfg.validate()?;
    let reals = load_class_images(data, &cfg.classes, cfg.model.size as u32, cfg.normalize, device)?;
    for (c, r) in cfg.classes.iter().zip(&reals) {
        tracing::info!(class = %c, images = r.dim(0)?, "gan training data");
    }
    let mut trainer = GanTrainer::new(cfg.clone(), reals, device)?;
    let state = train::run(&mut trainer, &cfg.train, out, resume, on_event)?;
    Ok((trainer, state))
}

/// Trains a whole run into `out`: one GAN per class in `out/<class>` (decoupled) or one GAN with
/// a head per class in `out` (coupled), after writing `out/synth.json`. `cfg` gives everything
/// but the heads and classes, which follow from `kind` and `classes`. Returns each model's
/// final state.
#[allow(clippy::too_many_arguments)]
pub fn train_run(
    cfg: &SynthConfig,
    kind: RunKind,
    classes: &[String],
    data: &Dataset,
    source: Option<DataSource>,
    device: &Device,
    out: &Path,
    resume: bool,
    on_event: &mut dyn FnMut(&str, &Event),
) -> Result<Vec<(String, TrainState)>> {
    if classes.is_empty() {
        return Err(Error::invalid("synth: no class to train on"));
    }
    for c in classes {
        if !data.classes.contains(c) {
            return Err(Error::invalid(format!(
                "{} has no class {c:?}; its classes are {}",
                data.name,
                data.classes.join(", ")
            )));
        }
    }
    derm_core::fsutil::create_dir_all(out)?;
    let info = RunInfo { kind, classes: classes.to_vec(), dataset_classes: data.classes.clone(), data: source };
    info.write(out)?;
    let mut results = Vec::new();
    match kind {
        RunKind::Decoupled => {
            for class in classes {
                let mut c = cfg.clone();
                c.model.heads = 1;
                c.classes = vec![class.clone()];
                c.dataset_classes = data.classes.clone();
                let (_, st) = train(c, data, device, &out.join(class), resume, &mut |e| on_event(class, e))?;
                results.push((class.clone(), st));
            }
        }
        RunKind::Coupled => {
            let mut c = cfg.clone();
            c.model.heads = classes.len();
            c.classes = classes.to_vec();
            c.dataset_classes = data.classes.clone();
            let name = classes.join("+");
            let (_, st) = train(c, data, device, out, resume, &mut |e| on_event(&name, e))?;
            results.push((name, st));
        }
    }
    Ok(results)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::GanConfig;
    use derm_data::phantom::{write_phantom_set, PhantomConfig};

    pub(crate) fn tiny_cfg(classes: &[&str]) -> SynthConfig {
        let mut c = SynthConfig {
            model: GanConfig {
                latent: 8,
                size: 16,
                g_widths: vec![16, 8],
                d_widths: vec![8, 16],
                heads: classes.len(),
                ..GanConfig::small()
            },
            batch_size: 4,
            sample_every: 3,
            grid_images: 4,
            quality_samples: 8,
            classes: classes.iter().map(|s| s.to_string()).collect(),
            dataset_classes: derm_data::PHANTOM_CLASSES.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        c.train.epochs = 3;
        c.train.eval_every = Some(2);
        c.train.checkpoint_every = Some(2);
        c
    }

    #[test]
    fn losses_stay_finite_at_extreme_logits() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[-1e4f32, -110.0, -20.0, 0.0, 17.0, 20.0, 110.0, 1e4], &dev).unwrap();
        for t in [0.0f32, 0.9, 1.0] {
            let target = logits.ones_like().unwrap().affine(t as f64, 0.0).unwrap();
            let v = derm_kernels::ops::bce_with_logits_elementwise(&logits, &target).unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "target {t}: {v:?}");
            // A confident wrong answer costs about |logit|.
            if t == 0.0 {
                assert!((v[7] - 1e4).abs() < 1.0 && v[0] < 1e-6);
            }
            let x = candle_core::Var::from_tensor(&logits).unwrap();
            let l = derm_kernels::ops::bce_with_logits(x.as_tensor(), &target).unwrap();
            let g = l.backward().unwrap().get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            assert!(g.iter().all(|x| x.is_finite()), "target {t}: {g:?}");
        }
    }

    #[test]
    fn quality_proxy_is_zero_for_the_same_images_and_grows_with_collapse() {
        let mut r = Rng::new(1);
        let x = Tensor::from_vec(r.normal_vec(16 * 3 * 16 * 16, 0.0, 0.5), (16, 3, 16, 16), &Device::Cpu).unwrap();
        let a = layout_stats(&x).unwrap();
        assert!(quality_distance(&a, &a) < 1e-12);
        let collapsed = x.narrow(0, 0, 1).unwrap().repeat((16, 1, 1, 1)).unwrap();
        assert!(quality_distance(&a, &layout_stats(&collapsed).unwrap()) > 1e-3);
    }

    #[test]
    fn a_dcgan_training_step_on_the_device_path_reads_nothing_back() {
        let d = tempfile::tempdir().unwrap();
        write_phantom_set(&d.path().join("ph"), &PhantomConfig { size: 32, ..PhantomConfig::balanced() }, 3, 12)
            .unwrap();
        let data = Dataset::open_dir(&d.path().join("ph"), None, None).unwrap();
        let cfg = tiny_cfg(&["melanoma", "nevus"]);
        let reals = load_class_images(&data, &cfg.classes, 16, cfg.normalize, &Device::Cpu).unwrap();
        let mut t = GanTrainer::new(cfg, reals, &Device::Cpu).unwrap();
        let mut rng = Rng::new(3);
        let (steps, reads) = derm_kernels::ops::host_reads_on_device_path(|| {
            [t.train_batch(0, 0, &mut rng).unwrap(), t.train_batch(0, 1, &mut rng).unwrap()]
        });
        assert_eq!(reads, 0, "a DCGAN training step read data back to the host");
        for s in steps {
            assert!(s.loss.to_scalar::<f32>().unwrap().is_finite());
        }
        assert!(t.history_parts()["d_real"] > 0.0);
    }

    #[test]
    fn joint_steps_on_phantoms_change_the_generator_save_and_resume() {
        let d = tempfile::tempdir().unwrap();
        write_phantom_set(&d.path().join("ph"), &PhantomConfig { size: 32, ..PhantomConfig::balanced() }, 3, 18)
            .unwrap();
        let data = Dataset::open_dir(&d.path().join("ph"), None, None).unwrap();
        let out = d.path().join("run");
        let cfg = tiny_cfg(&["melanoma"]);
        let reals = load_class_images(&data, &cfg.classes, 16, cfg.normalize, &Device::Cpu).unwrap();
        let t0 = GanTrainer::new(cfg.clone(), reals, &Device::Cpu).unwrap();
        let w = |t: &GanTrainer, n: &str| {
            t.synth
                .varmap
                .data()
                .lock()
                .unwrap()
                .get(n)
                .unwrap()
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let g0 = w(&t0, "g.0.conv.weight");
        let (t, state) = train(cfg.clone(), &data, &Device::Cpu, &out, false, &mut |_| {}).unwrap();
        assert_eq!(state.step, 3 * t.steps_per_epoch());
        assert_ne!(w(&t, "g.0.conv.weight"), g0, "the generator did not change");
        assert!(state
            .history
            .iter()
            .all(|h| PARTS.iter().all(|k| h.parts[*k].is_finite()) && h.metric.is_some_and(f64::is_finite)));
        assert!(out.join("samples").join("step_000003.png").exists());
        assert!(out.join("best/model.safetensors").exists() && out.join("last/optim_g.safetensors").exists());
        // Resuming to more epochs continues from the saved step; the result equals a straight run.
        let mut more = cfg.clone();
        more.train.epochs = 4;
        let (t2, s2) = train(more.clone(), &data, &Device::Cpu, &out, true, &mut |_| {}).unwrap();
        assert_eq!(s2.step, 4 * t.steps_per_epoch());
        let (t3, _) = train(more, &data, &Device::Cpu, &d.path().join("straight"), false, &mut |_| {}).unwrap();
        assert_eq!(w(&t2, "g.1.conv.weight"), w(&t3, "g.1.conv.weight"));
        // The saved model loads and generates.
        let s = Synthesizer::load(&out, &Device::Cpu).unwrap();
        let imgs = s.generate(0, 3, 7).unwrap();
        assert_eq!(imgs.len(), 3);
        assert_eq!(imgs[0].dimensions(), (16, 16));
    }

    #[test]
    fn coupled_training_with_feature_matching_and_early_stop() {
        let d = tempfile::tempdir().unwrap();
        write_phantom_set(&d.path().join("ph"), &PhantomConfig { size: 32, ..PhantomConfig::balanced() }, 4, 18)
            .unwrap();
        let data = Dataset::open_dir(&d.path().join("ph"), None, None).unwrap();
        let mut cfg = tiny_cfg(&["melanoma", "seborrheic_keratosis"]);
        cfg.feature_matching = true;
        cfg.train.epochs = 2;
        let (t, state) = train(cfg, &data, &Device::Cpu, &d.path().join("run"), false, &mut |_| {}).unwrap();
        assert_eq!(state.stop_reason.as_deref(), Some("epochs"));
        assert!(state.history.iter().all(|h| h.parts["g"].is_finite() && h.parts["g"] >= 0.0));
        let grid = image::open(d.path().join("run/samples").join(format!("step_{:06}.png", state.step))).unwrap();
        assert!(grid.height() > grid.width(), "two class blocks stacked");
        // A proxy that does not beat the best for `patience` checks stops the run.
        let mut t = t;
        t.synth.cfg.early_stop.patience = 2;
        let mut st = TrainState { evals_since_best: 1, ..Default::default() };
        assert_eq!(t.stop_reason(&mut st), None);
        st.evals_since_best = 2;
        assert_eq!(t.stop_reason(&mut st).as_deref(), Some("quality_plateau"));
        // A discriminator that wins (low loss on fakes, high generator loss) two checks in a row
        // stops the run too; the streak survives in the saved state.
        t.synth.cfg.early_stop.patience = 0;
        t.synth.cfg.early_stop.d_win_checks = 2;
        let mut st = TrainState::default();
        for expect in [None, Some("discriminator_won")] {
            t.acc = vec![Tensor::new(&[0.3f32, 0.001, 9.0], &Device::Cpu).unwrap()];
            let parts = t.history_parts();
            assert_eq!(parts["d_won"], 1.0);
            st.history.push(train::HistoryPoint { step: 0, epoch: 0, loss: 0.0, metric: None, elapsed_s: 0.0, parts });
            assert_eq!(t.stop_reason(&mut st).as_deref(), expect);
        }
        assert_eq!(st.task["d_win_streak"], 2);
    }
}
