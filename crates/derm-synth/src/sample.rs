//! A trained GAN as an image source, and generated images written as a data set.
//!
//! [`Synthesizer`] holds both networks (the discriminator is only needed to resume training);
//! [`Synthesizer::generate`] draws latents from a seed and returns RGB images at the working
//! size. [`write_synthetic_set`] writes images with `labels.csv` (`image_id,label`, the label a
//! class name) and a `manifest.toml` whose classes are the training set's, so the folder opens
//! with `Dataset::open_dir(dir, None, None)` and can be mixed into classifier training.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use derm_core::checkpoint::{self, Meta, TensorSpec};
use derm_core::image_io;
use derm_core::{Error, Result, Rng};
use derm_data::cache::ImageCache;
use derm_data::dataset::Dataset;
use derm_data::manifest::{LabelSpec, Manifest, SplitSpec};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::audit::{real_vs_fake, RealFakeConfig, RealFakeReport};
use crate::model::{Discriminator, Generator};
use crate::novelty::{image_rows, nearest_neighbours, pairs_figure, NoveltyReport};
use crate::{DataSource, RunInfo, SynthConfig};

/// Weights of the generator's optimiser inside a checkpoint folder (the discriminator's is
/// `optim.safetensors`).
pub const OPTIM_G: &str = "optim_g.safetensors";

/// A generator and discriminator with their weights.
pub struct Synthesizer {
    /// The configuration it was trained with.
    pub cfg: SynthConfig,
    /// The generator (variables under `g.`).
    pub generator: Generator,
    /// The discriminator (variables under `d.`).
    pub discriminator: Discriminator,
    /// All variables.
    pub varmap: VarMap,
    /// Where it runs.
    pub device: Device,
}

impl Synthesizer {
    /// Freshly initialised networks, drawn from `cfg.train.seed`.
    pub fn new(cfg: SynthConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let varmap = VarMap::new();
        let vb = derm_core::nn::seeded_var_builder(&varmap, cfg.train.seed, DType::F32, device);
        let generator = Generator::new(&cfg.model, vb.pp("g"))?;
        let discriminator = Discriminator::new(&cfg.model, vb.pp("d"))?;
        Ok(Synthesizer { cfg, generator, discriminator, varmap, device: device.clone() })
    }

    /// Loads a checkpoint folder, or a model folder (its `best/`, else its `last/`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let dir = derm_core::train::resolve_model_dir(dir);
        checkpoint::read_meta(&dir, "synth")?;
        let cfg: SynthConfig = checkpoint::read_config(&dir)?;
        let s = Synthesizer::new(cfg, device)?;
        checkpoint::load_varmap(&s.varmap, &dir.join(checkpoint::WEIGHTS), checkpoint::Strictness::Exact, |_| false)?;
        Ok(s)
    }

    /// Images (N, C, S, S) in [-1, 1] from head `head` for latents (N, L), generated in chunks
    /// of the training batch size (batch norm as `sample_batch_stats` says).
    ///
    /// Sampling with batch statistics leaves the generator's running averages as they were: a
    /// sample grid or quality check during training must not change the model (else a run
    /// resumed after a crash, which draws its grids at other steps, ends with other weights).
    pub fn generate_tensor(&self, head: usize, z: &Tensor) -> Result<Tensor> {
        let running: Vec<(candle_core::Var, Tensor)> = if self.cfg.sample_batch_stats {
            checkpoint::sorted_vars(&self.varmap)
                .into_iter()
                .filter(|(name, _)| name.starts_with("g.") && name.contains(".running_"))
                .map(|(_, v)| {
                    let saved = v.as_tensor().copy()?;
                    Ok((v, saved))
                })
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let out = self.generate_chunks(head, z);
        for (var, saved) in &running {
            var.set(saved)?;
        }
        out
    }

    fn generate_chunks(&self, head: usize, z: &Tensor) -> Result<Tensor> {
        let n = z.dim(0)?;
        let bs = self.cfg.batch_size.max(2);
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            // A last chunk of one image would give batch norm a single sample: take it with the
            // previous images and keep only the new ones.
            let len = (n - start).min(bs);
            let (from, take) = if len == 1 && start > 0 { (start - 1, 2) } else { (start, len) };
            let x = self.generator.forward_head(&z.narrow(0, from, take)?, head, self.cfg.sample_batch_stats)?.detach();
            parts.push(x.narrow(0, start - from, len)?);
            start += len;
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// `count` latents drawn from `seed`, (count, L).
    pub fn latents(&self, count: usize, seed: u64) -> Result<Tensor> {
        let l = self.cfg.model.latent;
        let v = Rng::new(seed).fork(0x1a7e).normal_vec(count * l, 0.0, 1.0);
        Ok(Tensor::from_vec(v, (count, l), &self.device)?)
    }

    /// `count` RGB images of head `head` from latents drawn from `seed`.
    pub fn generate(&self, head: usize, count: usize, seed: u64) -> Result<Vec<RgbImage>> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let x = self.generate_tensor(head, &self.latents(count, seed)?)?;
        image_io::tensor_to_images(&x.to_device(&Device::Cpu)?, self.cfg.normalize)
    }

    /// The checkpoint's `meta.json` record.
    pub fn meta(&self) -> Meta {
        let c = &self.cfg;
        let mut m = Meta::new("synth", if c.model.heads > 1 { "dcgan-coupled" } else { "dcgan" });
        m.inputs.push(TensorSpec {
            name: "latent".into(),
            shape: vec![None, Some(c.model.latent)],
            dtype: "f32".into(),
            range: None,
            description: "standard normal latent vectors".into(),
        });
        m.outputs.push(TensorSpec {
            name: "image".into(),
            shape: vec![None, Some(c.model.channels), Some(c.model.size), Some(c.model.size)],
            dtype: "f32".into(),
            range: Some((-1.0, 1.0)),
            description: format!(
                "RGB normalised with mean {:?} std {:?}, one head per class",
                c.normalize.mean, c.normalize.std
            ),
        });
        m.extra = serde_json::json!({ "classes": c.classes, "size": c.model.size });
        m
    }
}

/// One image of a synthetic set.
#[derive(Debug, Clone)]
pub struct SyntheticImage {
    /// Its id (file stem).
    pub id: String,
    /// Its class name (one of the manifest's classes).
    pub class: String,
    /// The image.
    pub image: RgbImage,
}

/// Writes `images/<id>.png`, `labels.csv` and `manifest.toml` (classes `classes`, the training
/// set's; generator facts in `generator`) into `dir`. The folder then opens as a data set with
/// one split, `train`. Returns the manifest's path.
pub fn write_synthetic_set(
    dir: &Path,
    classes: &[String],
    images: &[SyntheticImage],
    generator: toml::Table,
) -> Result<PathBuf> {
    let mut csv = String::from("image_id,label\n");
    let mut counts = std::collections::BTreeMap::new();
    for im in images {
        if !classes.contains(&im.class) {
            return Err(Error::invalid(format!(
                "synthetic image {} is of class {:?}, not one of {}",
                im.id,
                im.class,
                classes.join(", ")
            )));
        }
        image_io::save_png(&dir.join("images").join(format!("{}.png", im.id)), &im.image)?;
        csv.push_str(&format!("{},{}\n", im.id, im.class));
        *counts.entry(im.class.clone()).or_insert(0usize) += 1;
    }
    derm_core::fsutil::write_atomic(&dir.join("labels.csv"), csv.as_bytes())?;
    let m = Manifest {
        name: "synthetic".into(),
        title: "derm synth: GAN-generated images".into(),
        homepage: String::new(),
        license: "generated".into(),
        citation: "derm-synth (after Bisla et al. 2019)".into(),
        notes: "images/ holds generated images that passed the novelty check; labels.csv gives each one's class."
            .into(),
        classes: classes.to_vec(),
        melanoma_class: None,
        splits: vec![SplitSpec {
            name: "train".into(),
            images: "images/{id}.png".into(),
            masks: None,
            exclude: Vec::new(),
            extras: Default::default(),
            labels: Some(LabelSpec {
                csv: Some("labels.csv".into()),
                id_column: Some("image_id".into()),
                column: Some("label".into()),
                ..Default::default()
            }),
            groups: None,
            count: Some(images.len()),
            class_counts: counts,
        }],
        generator: Some(generator),
    };
    let path = dir.join("manifest.toml");
    m.save(&path)?;
    Ok(path)
}

/// What [`sample_run`] is asked to do.
#[derive(Debug, Clone)]
pub struct SampleRequest {
    /// The training run folder (with `synth.json`).
    pub run: PathBuf,
    /// Classes to generate (each must be one of the run's).
    pub classes: Vec<String>,
    /// Images to write per class.
    pub count: usize,
    /// Generated images with a nearest-neighbour MSE below this are dropped as duplicates.
    pub min_mse: f64,
    /// Seed of the latents.
    pub seed: u64,
    /// The training data to compare against (default: the run's own record).
    pub data: Option<DataSource>,
    /// Give up after generating this many times `count` images per class.
    pub max_factor: usize,
    /// Also train the real-versus-generated classifier ([`crate::audit`]) on each class.
    pub real_vs_fake: Option<RealFakeConfig>,
    /// Output folder.
    pub out: PathBuf,
}

/// One class's part of `novelty.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassSample {
    /// The class.
    pub class: String,
    /// Images written.
    pub written: usize,
    /// The novelty check of every generated image.
    pub novelty: NoveltyReport,
    /// The real-versus-generated classifier, when asked for.
    pub real_vs_fake: Option<RealFakeReport>,
}

/// `novelty.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SampleSummary {
    /// The run sampled.
    pub run: PathBuf,
    /// Seed of the latents.
    pub seed: u64,
    /// Per class.
    pub classes: Vec<ClassSample>,
}

/// Generates `count` novel images per class from a run, writes them as a data set into
/// `out` (see [`write_synthetic_set`]) with `novelty.json`, `novelty_hist.png` (the nearest-
/// neighbour MSE histogram with the threshold) and `novelty_pairs.png` (generated and nearest
/// real images at the lowest, median and highest MSE).
pub fn sample_run(
    req: &SampleRequest,
    device: &Device,
    progress: &mut dyn FnMut(&str, usize),
) -> Result<SampleSummary> {
    let info = RunInfo::read(&req.run)?;
    let src = req.data.clone().or(info.data.clone()).ok_or_else(|| {
        Error::invalid(format!("run {} does not record its training data; give it explicitly", req.run.display()))
    })?;
    let data = Dataset::open_dir(&src.root, src.manifest.as_deref(), src.split.as_deref())?;
    if data.classes != info.dataset_classes {
        return Err(Error::invalid(format!(
            "{} has classes {} but the run was trained on {}",
            src.root.display(),
            data.classes.join(", "),
            info.dataset_classes.join(", ")
        )));
    }
    let cache = ImageCache::new(0);
    let mut written = Vec::new();
    let mut summary = SampleSummary { run: req.run.clone(), seed: req.seed, classes: Vec::new() };
    let mut figure_rows = Vec::new();
    let mut hist_values = Vec::new();
    for (ci, class) in req.classes.iter().enumerate() {
        let synth = Synthesizer::load(&info.model_dir(&req.run, class)?, device)?;
        let head = synth.cfg.head_of(class)?;
        let size = synth.cfg.model.size as u32;
        let label = data
            .classes
            .iter()
            .position(|c| c == class)
            .ok_or_else(|| Error::invalid(format!("no class {class:?} in {}", data.name)))?;
        let sub = data.filter(|s| s.label == Some(label));
        let idx: Vec<usize> = (0..sub.len()).collect();
        let items = sub.load_items(&idx, Some((size, size)), &cache)?;
        if items.is_empty() {
            return Err(Error::invalid(format!("{}: no training image of class {class}", data.name)));
        }
        let ids: Vec<String> = items.iter().map(|i| i.id.clone()).collect();
        let train_imgs: Vec<RgbImage> = items.into_iter().map(|i| i.image).collect();
        let train_rows = image_rows(&train_imgs.iter().collect::<Vec<_>>(), (size, size));
        let dim = (size * size * 3) as usize;
        let (mut generated, mut nearest, mut kept) = (Vec::new(), Vec::new(), 0usize);
        let mut round = 0u64;
        while kept < req.count && generated.len() < req.count * req.max_factor.max(1) {
            let want = (req.count - kept).max(synth.cfg.batch_size.min(req.count));
            let seed = Rng::new(req.seed).fork(((ci as u64) << 32) | round).next_u64();
            let imgs = synth.generate(head, want, seed)?;
            let rows = image_rows(&imgs.iter().collect::<Vec<_>>(), (size, size));
            let nn = nearest_neighbours(&rows, &train_rows, dim, 512, device)?;
            for (im, n) in imgs.into_iter().zip(nn) {
                if n.mse >= req.min_mse && kept < req.count {
                    kept += 1;
                    written.push(SyntheticImage {
                        id: format!("synth_{class}_{:05}", generated.len()),
                        class: class.clone(),
                        image: im.clone(),
                    });
                }
                generated.push(im);
                nearest.push(n);
            }
            round += 1;
            progress(class, kept);
        }
        if kept < req.count {
            tracing::warn!(class = %class, kept, wanted = req.count, "too many generated images were near-copies of training images");
        }
        let report = NoveltyReport::new(class, req.min_mse, &ids, &nearest);
        hist_values.extend(report.entries.iter().map(|e| e.mse));
        let real_vs_fake = match &req.real_vs_fake {
            Some(c) => Some(real_vs_fake(&train_imgs, &generated, c, device)?),
            None => None,
        };
        summary.classes.push(ClassSample {
            class: class.clone(),
            written: kept,
            novelty: report.clone(),
            real_vs_fake,
        });
        figure_rows.push((report, generated, train_imgs));
    }
    let mut gen = toml::Table::new();
    gen.insert("kind".into(), "derm-synth".into());
    gen.insert("run".into(), req.run.display().to_string().into());
    gen.insert("seed".into(), req.seed.to_string().into());
    gen.insert("min_mse".into(), toml::Value::Float(req.min_mse));
    write_synthetic_set(&req.out, &info.dataset_classes, &written, gen)?;
    derm_core::fsutil::write_json(&req.out.join("novelty.json"), &summary)?;
    let title = format!("nearest-training-image MSE of {} generated images", hist_values.len());
    let hist = derm_visual::plot::histogram(
        &title,
        "MSE (pixels in [0, 1])",
        &hist_values,
        30,
        Some((req.min_mse, "drop below")),
    );
    image_io::save_png(&req.out.join("novelty_hist.png"), &hist)?;
    let rows: Vec<(&NoveltyReport, &[RgbImage], &[RgbImage])> =
        figure_rows.iter().map(|(r, g, t)| (r, g.as_slice(), t.as_slice())).collect();
    image_io::save_png(&req.out.join("novelty_pairs.png"), &pairs_figure(&rows))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use derm_data::dataset::Dataset;

    #[test]
    fn synthetic_set_opens_as_a_data_set() {
        let d = tempfile::tempdir().unwrap();
        let classes: Vec<String> =
            ["melanoma", "seborrheic_keratosis", "nevus"].iter().map(|s| s.to_string()).collect();
        let imgs: Vec<SyntheticImage> = (0..3)
            .map(|i| SyntheticImage {
                id: format!("synth_{i}"),
                class: classes[i % 2].clone(),
                image: RgbImage::from_pixel(8, 8, image::Rgb([i as u8 * 50, 0, 0])),
            })
            .collect();
        write_synthetic_set(d.path(), &classes, &imgs, toml::Table::new()).unwrap();
        let ds = Dataset::open_dir(d.path(), None, None).unwrap();
        assert_eq!(ds.classes, classes);
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.class_counts(), vec![2, 1, 0]);
        let bad = [SyntheticImage { class: "other".into(), ..imgs[0].clone() }];
        assert!(write_synthetic_set(d.path(), &classes, &bad, toml::Table::new()).is_err());
    }

    #[test]
    fn trained_run_samples_into_a_data_set_with_a_novelty_report() {
        let d = tempfile::tempdir().unwrap();
        let ph = d.path().join("ph");
        derm_data::phantom::write_phantom_set(
            &ph,
            &derm_data::PhantomConfig { size: 32, ..derm_data::PhantomConfig::balanced() },
            3,
            18,
        )
        .unwrap();
        let data = Dataset::open_dir(&ph, None, None).unwrap();
        let mut cfg = crate::train::tests::tiny_cfg(&["melanoma"]);
        cfg.train.epochs = 1;
        let classes = vec!["melanoma".to_string(), "seborrheic_keratosis".to_string()];
        let src = DataSource { manifest: None, root: ph.clone(), split: None };
        let run = d.path().join("run");
        let res = crate::train::train_run(
            &cfg,
            crate::RunKind::Decoupled,
            &classes,
            &data,
            Some(src),
            &Device::Cpu,
            &run,
            false,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(res.len(), 2);
        assert!(
            run.join("melanoma/last/model.safetensors").exists()
                && run.join("seborrheic_keratosis/best/model.safetensors").exists()
        );
        let out = d.path().join("synth");
        let req = SampleRequest {
            run: run.clone(),
            classes: classes.clone(),
            count: 5,
            min_mse: 1e-4,
            seed: 1,
            data: None,
            max_factor: 2,
            real_vs_fake: Some(RealFakeConfig { widths: vec![4], steps: 5, size: 16, ..Default::default() }),
            out: out.clone(),
        };
        let s = sample_run(&req, &Device::Cpu, &mut |_, _| {}).unwrap();
        assert_eq!(s.classes.len(), 2);
        assert_eq!(s.classes[0].written, 5);
        assert!(s.classes[0].real_vs_fake.is_some());
        let ds = Dataset::open_dir(&out, None, None).unwrap();
        assert_eq!(ds.classes, data.classes);
        assert_eq!(ds.class_counts(), vec![5, 5, 0]);
        for f in ["novelty.json", "novelty_hist.png", "novelty_pairs.png"] {
            assert!(out.join(f).exists(), "{f}");
        }
        // A class the run does not generate is a clear error.
        let bad = SampleRequest { classes: vec!["nevus".into()], ..req };
        let e = sample_run(&bad, &Device::Cpu, &mut |_, _| {}).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("nevus"), "{e}");
    }
}
