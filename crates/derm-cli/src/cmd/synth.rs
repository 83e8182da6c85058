//! `derm synth train|sample`: GANs that make new images of the rare classes, and their sampling
//! with a novelty check.

use super::common::set;
use std::path::PathBuf;

use anyhow::Context;
use derm_core::train::Event;
use derm_synth::sample::{sample_run, SampleRequest};
use derm_synth::train::train_run;
use derm_synth::{DataSource, GanConfig, RealFakeConfig, RunKind, SynthConfig};

use crate::cmd::common;
use crate::GlobalOpts;

/// The synthesis subcommands.
// Parsed once per process: the size of the training arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, clap::Subcommand)]
pub enum SynthCommand {
    /// Train one DCGAN per class (or one coupled GAN for all classes) on a labelled data set.
    ///
    /// The per-class GANs train one after the other, each with the whole budget: `--minutes 6`
    /// on two classes takes 12 minutes.
    Train(TrainArgs),
    /// Generate images of a class from a trained run, drop near-copies of training images, and
    /// write them as a data set folder with a novelty report.
    Sample(SampleArgs),
}

/// Arguments of `derm synth train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: common::DataArgs,
    #[command(flatten)]
    pub run: common::TrainFlags,
    /// Classes to generate, comma separated (names of the data set's classes).
    #[arg(long, value_delimiter = ',', default_value = "melanoma,seborrheic_keratosis")]
    pub classes: Vec<String>,
    /// One GAN for all classes, sharing its first layers (the paper's ISIC 2018 model), instead
    /// of one GAN per class.
    #[arg(long)]
    pub coupled: bool,
    /// Network preset: small (CPU, 64 px), paper (the authors' 256 px DCGAN) or peer64 (the peer
    /// reference's 64 px DCGAN). [config default: small]
    #[arg(long)]
    pub preset: Option<String>,
    /// Working size in pixels, 4 * 2^k (default: the preset's); layers are added or removed.
    #[arg(long)]
    pub size: Option<usize>,
    /// Generator updates per discriminator update. [config default: 2]
    #[arg(long)]
    pub g_steps: Option<usize>,
    /// Feature matching as the generator's loss.
    #[arg(long)]
    pub feature_matching: bool,
    /// Target of real images in the discriminator's loss (one-sided label smoothing). [config default: 0.9]
    #[arg(long)]
    pub real_label: Option<f64>,
    /// Write a sample grid every N steps. [config default: 200]
    #[arg(long)]
    pub sample_every: Option<usize>,
}

impl TrainArgs {
    pub(crate) fn config(&self, g: &GlobalOpts) -> anyhow::Result<SynthConfig> {
        let mut c: SynthConfig = self.run.base_config()?;
        if let Some(p) = &self.preset {
            c.model =
                GanConfig::preset(p).with_context(|| format!("unknown preset {p:?}: use small, paper or peer64"))?;
        }
        set(&mut c.model.size, self.size);
        set(&mut c.g_steps, self.g_steps);
        c.feature_matching |= self.feature_matching;
        set(&mut c.real_label, self.real_label);
        set(&mut c.sample_every, self.sample_every);
        self.run.apply(g, &mut c.train, &mut c.batch_size);
        Ok(c)
    }

    /// Trains and writes the run folder.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let cfg = self.config(g)?;
        let device = g.device()?;
        let data = self.data.open(g.quiet)?;
        let source = DataSource {
            manifest: self.data.manifest.clone(),
            root: self.data.root.clone(),
            split: self.data.split.clone(),
        };
        let kind = if self.coupled { RunKind::Coupled } else { RunKind::Decoupled };
        let described = cfg.describe(kind, &self.classes);
        if !g.quiet {
            eprintln!("synth: training {described}");
        }
        // One bar per GAN (decoupled runs train one per class, each for the whole budget), so
        // its elapsed time and ETA are the current model's and its label says which it is.
        let mut progress: Option<(String, super::common::StageProgress)> = None;
        let mut on_event = |name: &str, e: &Event| {
            if let Event::Eval { step, metric, .. } = e {
                tracing::debug!(model = name, step, quality = metric, "check");
            }
            if progress.as_ref().is_none_or(|(current, _)| current != name) {
                if let Some((_, done)) = &progress {
                    done.finish();
                }
                progress =
                    Some((name.to_string(), super::common::StageProgress::new(&format!("synth {name}"), g.quiet)));
            }
            if let Some((_, bar)) = &mut progress {
                bar.event(e)
            }
        };
        let results = train_run(
            &cfg,
            kind,
            &self.classes,
            &data,
            Some(source),
            &device,
            &self.run.out,
            self.run.resume,
            &mut on_event,
        )
        .with_context(|| format!("training the GAN run {}", self.run.out.display()))?;
        if let Some((_, bar)) = &progress {
            bar.finish();
        }
        for (name, st) in &results {
            println!(
                "{name}: {} steps in {:.1} min ({}); best quality proxy {} at step {}",
                st.step,
                st.elapsed_s / 60.0,
                st.stop_reason.as_deref().unwrap_or("done"),
                st.best_metric.map(|v| format!("{v:.5}")).unwrap_or_else(|| "n/a".into()),
                st.best_step.unwrap_or(0)
            );
        }
        println!("trained {described}; run folder {}", self.run.out.display());
        Ok(())
    }
}

/// Arguments of `derm synth sample`.
#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// A run folder written by `derm synth train`.
    #[arg(long)]
    pub model: PathBuf,
    /// Class(es) to generate, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub class: Vec<String>,
    /// Images to write per class.
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Drop generated images whose MSE (pixels in [0, 1]) to some training image is below this.
    #[arg(long, default_value_t = 1e-3)]
    pub min_mse: f64,
    /// Also train a small real-versus-generated classifier per class and report its held-out
    /// accuracy in novelty.json (0.5 = the generated images cannot be told apart).
    #[arg(long)]
    pub real_vs_fake: bool,
    /// The training data set folder, when it moved since training (default: the run's record).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Its manifest (with --root).
    #[arg(long)]
    pub manifest: Option<String>,
    /// Its split (with --root).
    #[arg(long)]
    pub split: Option<String>,
    /// Output folder: images/, labels.csv, manifest.toml, novelty.json, novelty_hist.png,
    /// novelty_pairs.png.
    #[arg(long)]
    pub out: PathBuf,
}

impl SampleArgs {
    /// Generates, checks and writes the images.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let device = g.device()?;
        let req = SampleRequest {
            run: self.model.clone(),
            classes: self.class.clone(),
            count: self.count,
            min_mse: self.min_mse,
            seed: g.seed,
            data: self.root.as_ref().map(|r| DataSource {
                manifest: self.manifest.clone(),
                root: r.clone(),
                split: self.split.clone(),
            }),
            max_factor: 4,
            real_vs_fake: self.real_vs_fake.then(|| RealFakeConfig { seed: g.seed, ..Default::default() }),
            out: self.out.clone(),
        };
        let bar = crate::progress::bar((self.count * self.class.len()) as u64, "sample", g.quiet);
        let mut done = std::collections::BTreeMap::new();
        let summary = sample_run(&req, &device, &mut |class, kept| {
            done.insert(class.to_string(), kept);
            bar.set_position(done.values().sum::<usize>() as u64);
        })
        .with_context(|| format!("sampling {} into {}", self.model.display(), self.out.display()))?;
        bar.finish_and_clear();
        for c in &summary.classes {
            let n = &c.novelty;
            print!(
                "{}: wrote {} of {} generated (dropped {} with MSE < {}); nearest-real MSE min {:.5} median {:.5} max {:.5}",
                c.class,
                c.written,
                n.generated,
                n.generated - n.kept,
                n.min_mse,
                n.mse_min,
                n.mse_median,
                n.mse_max
            );
            match &c.real_vs_fake {
                Some(r) => println!("; real-vs-generated held-out accuracy {:.3} (0.5 = chance)", r.test_accuracy),
                None => println!(),
            }
        }
        println!("data set folder {}", self.out.display());
        Ok(())
    }
}

impl SynthCommand {
    /// Runs it.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        match self {
            SynthCommand::Train(a) => a.run(g),
            SynthCommand::Sample(a) => a.run(g),
        }
    }
}
