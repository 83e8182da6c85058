//! # derm-synth: synthetic dermoscopy for the rare classes
//!
//! The data-augmentation stage of derm (Bisla et al., "Towards Automated Melanoma Detection with
//! Deep Learning: Data Purification and Augmentation", CVPR workshops 2019): generative
//! adversarial networks that make new images of the under-represented classes.
//!
//! - **Decoupled** ([`RunKind::Decoupled`]): one DCGAN per rare class (the paper: melanoma and
//!   seborrheic keratosis of ISIC 2017), extended to the working resolution by adding layers;
//!   the authors' 256-pixel shape is [`GanConfig::paper`].
//! - **Coupled** ([`RunKind::Coupled`]): one model for all classes at once (the paper: the seven
//!   classes of ISIC 2018) whose generator and discriminator share their first layers and end
//!   in class-specific layers ([`model`]).
//!
//! Training ([`train`]) uses the stable binary cross-entropy with logits, Adam (lr 2e-4, betas
//! 0.5 and 0.999) for both networks, and the stabilisers of Salimans et al. 2016: one-sided
//! label smoothing, optional feature matching, extra generator steps per discriminator step,
//! and early stopping when the discriminator wins outright or sample quality stops improving.
//! Sampling ([`sample`]) writes a folder that opens as a data set, after a novelty check
//! ([`novelty`]) that drops near-copies of training images and reports the nearest-neighbour
//! distances (the paper's figure 5). [`audit`] trains a small real-versus-fake classifier.
//!
//! **Consumes:** a labelled data set (any derm-data manifest; phantoms included), images resized
//! to the working size (square, 4 * 2^k pixels). **Produces:** a run folder (per class for
//! decoupled runs): `synth.json` ([`RunInfo`]), checkpoints `last/` and `best/`
//! (`model.safetensors` with the generator under `g.` and the discriminator under `d.`,
//! `config.json` = [`SynthConfig`], `meta.json`, `optim.safetensors` (discriminator),
//! `optim_g.safetensors`, `state.json` = [`derm_core::train::TrainState`]), sample grids `samples/step_*.png`,
//! `history.json`; and sampled folders: PNG images, `labels.csv` (`image_id,label`),
//! `manifest.toml` with the training set's class names, and `novelty.json`.

#![forbid(unsafe_code)]

pub mod audit;
pub mod model;
pub mod novelty;
pub mod sample;
pub mod train;

use std::path::{Path, PathBuf};

use derm_core::image_io::Normalize;
use derm_core::nn::preset_label;
use derm_core::optim::{LrSchedule, OptimConfig, OptimizerKind};
use derm_core::{Error, Result};
use serde::{Deserialize, Serialize};

pub use audit::{real_vs_fake, RealFakeConfig, RealFakeReport};
pub use model::{Discriminator, GanConfig, Generator};
pub use novelty::{nearest_neighbours, Nearest, NoveltyReport};
pub use sample::{write_synthetic_set, Synthesizer};
pub use train::{train, GanTrainer};

/// When training stops before its epoch, step or time budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EarlyStop {
    /// The discriminator "wins" a check when its mean loss on generated images is below this
    /// (it calls them fake with more than about 95 % confidence at 0.05)...
    pub d_fake_loss_below: f64,
    /// ... and the generator's mean loss is above this.
    pub g_loss_above: f64,
    /// Stop after the discriminator wins this many consecutive checks (0: never).
    pub d_win_checks: usize,
    /// Stop after this many checks without a better sample-quality proxy (0: never).
    pub patience: usize,
}

impl Default for EarlyStop {
    fn default() -> Self {
        EarlyStop { d_fake_loss_below: 0.05, g_loss_above: 5.0, d_win_checks: 5, patience: 20 }
    }
}

/// Everything a GAN run is made of; saved as the checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    /// Network shapes (the working size is `model.size`).
    pub model: GanConfig,
    /// Real images per class per step; as many generated ones.
    pub batch_size: usize,
    /// The generator's optimiser (the paper: Adam 2e-4, betas 0.5 and 0.999).
    pub optim_g: OptimConfig,
    /// The discriminator's optimiser (the same).
    pub optim_d: OptimConfig,
    /// Target of real images in the discriminator's loss (one-sided label smoothing: 0.9).
    pub real_label: f64,
    /// Generator loss: the squared distance between the discriminator's mean intermediate
    /// features on real and generated images (Salimans et al.) instead of the adversarial loss.
    pub feature_matching: bool,
    /// Generator updates per discriminator update (the paper: 2). The first reuses the
    /// discriminator step's generated images; the others draw new latents.
    pub g_steps: usize,
    /// Epochs (an epoch is one pass over the largest class), step and time budget, check
    /// (`eval_every`) and checkpoint cadence, seed.
    pub train: derm_core::train::LoopConfig,
    /// Write a sample grid every this many steps (0: never).
    pub sample_every: usize,
    /// Images per class in a sample grid (a fixed latent batch).
    pub grid_images: usize,
    /// Fixed latents per class for the quality proxy at each check.
    pub quality_samples: usize,
    /// Early stopping.
    pub early_stop: EarlyStop,
    /// Random horizontal and vertical flips of the real images.
    pub flip: bool,
    /// Batch norm uses the batch's statistics when sampling, as during training (the reference
    /// DCGAN code never switches the generator to evaluation mode); otherwise the running ones.
    pub sample_batch_stats: bool,
    /// Pixel normalisation (mean and std 0.5: images in [-1, 1], matching the tanh).
    pub normalize: Normalize,
    /// The classes the heads generate, in head order (one for a decoupled run).
    pub classes: Vec<String>,
    /// The training set's class names, in label order (written into sampled manifests).
    pub dataset_classes: Vec<String>,
}

impl Default for SynthConfig {
    fn default() -> Self {
        let adam = OptimConfig {
            optimizer: OptimizerKind::Adam { lr: 2e-4, beta1: 0.5, beta2: 0.999, eps: 1e-8 },
            schedule: LrSchedule::Constant,
            clip_grad_norm: None,
        };
        SynthConfig {
            model: GanConfig::small(),
            batch_size: 32,
            optim_g: adam,
            optim_d: adam,
            real_label: 0.9,
            feature_matching: false,
            g_steps: 2,
            train: derm_core::train::LoopConfig {
                epochs: 200,
                eval_every: Some(100),
                checkpoint_every: Some(200),
                ..Default::default()
            },
            sample_every: 200,
            grid_images: 16,
            quality_samples: 64,
            early_stop: EarlyStop::default(),
            flip: true,
            sample_batch_stats: true,
            normalize: Normalize::HALF,
            classes: Vec::new(),
            dataset_classes: Vec::new(),
        }
    }
}

impl SynthConfig {
    /// Checks the configuration; the message says what is wrong.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if self.classes.is_empty() {
            return Err(Error::invalid("synth: no class to generate"));
        }
        if self.classes.len() != self.model.heads {
            return Err(Error::invalid(format!(
                "synth: {} classes but the model has {} heads",
                self.classes.len(),
                self.model.heads
            )));
        }
        if self.batch_size < 2 {
            return Err(Error::invalid("synth: batch size must be at least 2 (batch norm)"));
        }
        if self.g_steps == 0 {
            return Err(Error::invalid("synth: g_steps must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.real_label) {
            return Err(Error::invalid(format!("synth: real_label {} is not in [0, 1]", self.real_label)));
        }
        Ok(())
    }

    /// What a run of `kind` on `classes` trains, in one line for its log: the GANs and their
    /// shape, batch, both optimisers, and the stabilisers that are on.
    pub fn describe(&self, kind: RunKind, classes: &[String]) -> String {
        let m = &self.model;
        let net = preset_label(m.preset_name(), "custom networks");
        let gans = match kind {
            RunKind::Decoupled => format!("one DCGAN per class ({})", classes.join(", ")),
            RunKind::Coupled => format!(
                "a coupled DCGAN for {} (the generator's last {} and the discriminator's last {} layers per class)",
                classes.join(", "),
                m.g_private_layers,
                m.d_private_layers
            ),
        };
        let mut s = format!(
            "{gans}, {net} ({} px, latent {}, generator widths {:?}, discriminator widths {:?}), batch {} real per class, generator {}, discriminator {}, real label {}, {} generator step{} per discriminator step",
            m.size,
            m.latent,
            m.g_widths,
            m.d_widths,
            self.batch_size,
            self.optim_g.describe(),
            self.optim_d.describe(),
            self.real_label,
            self.g_steps,
            if self.g_steps == 1 { "" } else { "s" }
        );
        if self.feature_matching {
            s.push_str(", feature matching");
        }
        if self.flip {
            s.push_str(", flips");
        }
        s
    }

    /// The head of class `name`.
    pub fn head_of(&self, name: &str) -> Result<usize> {
        self.classes
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| Error::invalid(format!("this model generates {}, not {name:?}", self.classes.join(", "))))
    }
}

/// Whether a run trained one GAN per class or one coupled GAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    /// One sub-run folder per class, each with its own GAN.
    Decoupled,
    /// One GAN with a head per class, in the run folder itself.
    Coupled,
}

/// Where the training images came from, so that sampling can compare against them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSource {
    /// Manifest name or file (none: the folder's own `manifest.toml`).
    pub manifest: Option<String>,
    /// The data set folder.
    pub root: PathBuf,
    /// The split.
    pub split: Option<String>,
}

/// `synth.json` at the top of a run folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// Decoupled or coupled.
    pub kind: RunKind,
    /// The generated classes.
    pub classes: Vec<String>,
    /// The training set's class names, in label order.
    pub dataset_classes: Vec<String>,
    /// The training data.
    pub data: Option<DataSource>,
}

/// Name of the run description file.
pub const RUN_INFO: &str = "synth.json";

impl RunInfo {
    /// Reads `<run>/synth.json`.
    pub fn read(run: &Path) -> Result<RunInfo> {
        let p = run.join(RUN_INFO);
        if !p.exists() {
            return Err(Error::Checkpoint {
                path: run.into(),
                msg: format!("no {RUN_INFO}: not a derm synth run folder"),
            });
        }
        derm_core::fsutil::read_json(&p)
    }

    /// Writes `<run>/synth.json`.
    pub fn write(&self, run: &Path) -> Result<()> {
        derm_core::fsutil::write_json(&run.join(RUN_INFO), self)
    }

    /// The folder holding the model that generates `class`: `<run>/<class>` for a decoupled
    /// run, `<run>` for a coupled one.
    pub fn model_dir(&self, run: &Path, class: &str) -> Result<PathBuf> {
        if !self.classes.iter().any(|c| c == class) {
            return Err(Error::invalid(format!(
                "run {} generates {}, not {class:?}",
                run.display(),
                self.classes.join(", ")
            )));
        }
        Ok(match self.kind {
            RunKind::Decoupled => run.join(class),
            RunKind::Coupled => run.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_round_trip_and_reject_unknown_fields() {
        let c = SynthConfig { classes: vec!["melanoma".into()], ..Default::default() };
        c.validate().unwrap();
        let s = serde_json::to_string(&c).unwrap();
        let back: SynthConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
        let partial: SynthConfig = serde_json::from_str(r#"{"g_steps": 3, "model": {"size": 128}}"#).unwrap();
        assert_eq!(partial.g_steps, 3);
        assert_eq!(partial.model.size, 128);
        assert_eq!(partial.model.latent, 10);
        assert!(serde_json::from_str::<SynthConfig>(r#"{"gsteps": 3}"#).is_err());
        match c.optim_g.optimizer {
            OptimizerKind::Adam { lr, beta1, beta2, .. } => assert_eq!((lr, beta1, beta2), (2e-4, 0.5, 0.999)),
            _ => panic!("not adam"),
        }
        assert!(SynthConfig::default().validate().is_err());
    }

    #[test]
    fn the_run_description_names_the_gans_their_shape_and_the_stabilisers_on() {
        let classes = ["melanoma".to_string(), "seborrheic_keratosis".to_string()];
        let c = SynthConfig::default();
        let d = c.describe(RunKind::Decoupled, &classes);
        for part in [
            "one DCGAN per class (melanoma, seborrheic_keratosis), small preset (64 px, latent 32",
            "generator widths [128, 64, 32, 16], discriminator widths [16, 32, 64, 128]",
            "batch 32 real per class, generator adam lr 2e-4 betas (0.5, 0.999)",
            "real label 0.9, 2 generator steps per discriminator step, flips",
        ] {
            assert!(d.contains(part), "{part:?} missing from {d:?}");
        }
        assert!(!d.contains("feature matching"));
        // A coupled run keeps its preset's name with one head per class.
        let coupled = SynthConfig {
            model: GanConfig { heads: 2, ..GanConfig::paper() },
            feature_matching: true,
            g_steps: 1,
            ..Default::default()
        };
        let d = coupled.describe(RunKind::Coupled, &classes);
        assert!(d.starts_with("a coupled DCGAN for melanoma, seborrheic_keratosis (the generator's last 2"), "{d}");
        assert!(d.contains("paper preset (256 px, latent 10") && d.contains("1 generator step per"), "{d}");
        assert!(d.contains("feature matching"), "{d}");
        let custom = SynthConfig { model: GanConfig { latent: 7, ..GanConfig::small() }, ..Default::default() };
        assert!(custom.describe(RunKind::Decoupled, &classes).contains("custom networks (64 px, latent 7"));
    }
}
