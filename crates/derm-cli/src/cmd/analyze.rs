//! `derm analyze`: one image through every stage, with the models of a pipeline run.
//!
//! The work is done by [`Analyzer`], which holds the loaded models (loaded once) and analyses one
//! decoded image at a time; `derm serve` shares it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use derm_core::image_io;
use image::{GrayImage, RgbImage};
use serde::Serialize;

use crate::cmd::common;
use crate::cmd::vbp::Saliency;
use crate::GlobalOpts;

/// Arguments of `derm analyze`.
#[derive(Debug, clap::Args)]
pub struct AnalyzeArgs {
    /// The image.
    pub image: PathBuf,
    /// A pipeline run folder (with segment/model, purify/model and classify/<variant>), or a
    /// folder holding `segment`, `purify` and `classify` model folders.
    #[arg(long)]
    pub models: PathBuf,
    /// Which classifier of the run (both, baseline, purified, synthetic).
    #[arg(long, default_value = "both")]
    pub classifier: String,
    /// Output folder (default: `analysis_<id>` beside the image's name in the working folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the JSON record.
    #[arg(long)]
    pub json: bool,
}

/// The first of `candidates` under `root` whose checkpoint `meta.json` says stage `what`.
fn model_dir(root: &Path, candidates: &[&str], what: &str) -> anyhow::Result<PathBuf> {
    let mut seen = Vec::new();
    for c in candidates {
        let p = root.join(c);
        if !p.is_dir() {
            continue;
        }
        match derm_core::checkpoint::stage_of(&p) {
            Ok(stage) if stage == what => return Ok(p),
            Ok(stage) => seen.push(format!("{c} holds a `{stage}` checkpoint")),
            Err(e) => seen.push(format!("{c}: {e}")),
        }
    }
    let found = if seen.is_empty() { String::new() } else { format!(" ({})", seen.join("; ")) };
    bail!(
        "no {what} model in {}: looked for {}{found} (train it with `derm {what} train`, or run `cargo xtask pipeline`)",
        root.display(),
        candidates.join(", ")
    )
}

/// The model folders of a run. Fields in alphabetical order, as `analysis.json` has always
/// listed them.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDirs {
    /// The classifier.
    pub classify: PathBuf,
    /// The purification network.
    pub purify: PathBuf,
    /// The segmenter.
    pub segment: PathBuf,
}

impl ModelDirs {
    /// Finds the segment, purify and classify model folders of a run folder (or of a folder that
    /// holds `segment`, `purify` and `classify`), naming what is missing.
    pub fn locate(models: &Path, classifier: &str) -> anyhow::Result<Self> {
        let segment = model_dir(models, &["segment/model", "segment"], "segment")?;
        let purify = model_dir(models, &["purify/model", "purify"], "purify")?;
        let classify =
            model_dir(models, &[&format!("classify/{classifier}"), "classify/baseline", "classify"], "classify")?;
        Ok(ModelDirs { classify, purify, segment })
    }
}

/// The record of one analysis (`analysis.json`). Fields in alphabetical order: the file's key
/// order is the one it had when it was written from a JSON map.
#[derive(Debug, Clone, Serialize)]
pub struct AnalysisRecord {
    /// The output files, in [`OUTPUT_FILES`] order.
    pub files: Vec<String>,
    /// The image's path (or, for an upload, its file name).
    pub image: PathBuf,
    /// Fraction of the image the segmenter marked as lesion.
    pub lesion_fraction: f64,
    /// The model folders used.
    pub models: ModelDirs,
    /// Fraction of the image marked as hair or ruler.
    pub occluded_fraction: f64,
    /// The class at the classifier's operating point: the most probable once its decision
    /// weights (chosen on validation and saved with it) scale the probabilities.
    pub predicted_class: Option<String>,
    /// Class name to probability.
    pub probabilities: BTreeMap<String, f64>,
    /// Seconds the analysis took.
    pub seconds: f64,
    /// Width and height of the input.
    pub size: [u32; 2],
}

/// The images [`Analysis::save`] writes, in this order.
pub const OUTPUT_FILES: [&str; 7] = [
    "input.png",
    "occlusion.png",
    "purified.png",
    "lesion_mask.png",
    "lesion_overlay.png",
    "saliency.png",
    "saliency_overlay.png",
];

/// Everything one analysis produced.
pub struct Analysis {
    /// The input.
    pub input: RgbImage,
    /// Hair and ruler mask (0/255).
    pub occlusion: GrayImage,
    /// The input with occlusions filled by the purification network.
    pub purified: RgbImage,
    /// Lesion mask (0/255).
    pub lesion_mask: GrayImage,
    /// The lesion outline over the purified image.
    pub lesion_overlay: RgbImage,
    /// Saliency map (gray, the classifier's view size).
    pub saliency: GrayImage,
    /// Saliency over the classifier's view.
    pub saliency_overlay: RgbImage,
    /// Class names in the classifier's order.
    pub classes: Vec<String>,
    /// Probabilities in the classifier's order.
    pub probs: Vec<f64>,
    /// The JSON record.
    pub record: AnalysisRecord,
}

impl Analysis {
    /// Writes every image of [`OUTPUT_FILES`] and `analysis.json` into `out`.
    pub fn save(&self, out: &Path) -> anyhow::Result<()> {
        image_io::save_png(&out.join("input.png"), &self.input)?;
        image_io::save_png(&out.join("occlusion.png"), &self.occlusion)?;
        image_io::save_png(&out.join("purified.png"), &self.purified)?;
        image_io::save_png(&out.join("lesion_mask.png"), &self.lesion_mask)?;
        image_io::save_png(&out.join("lesion_overlay.png"), &self.lesion_overlay)?;
        image_io::save_png(&out.join("saliency.png"), &self.saliency)?;
        image_io::save_png(&out.join("saliency_overlay.png"), &self.saliency_overlay)?;
        derm_core::fsutil::write_json(&out.join("analysis.json"), &self.record)?;
        Ok(())
    }
}

/// The models of a run, loaded once: hair masking, segmentation, purification, classification
/// and VisualBackProp of one image at a time. Shareable across threads.
pub struct Analyzer {
    dirs: ModelDirs,
    seg: derm_segment::Segmenter,
    pur: derm_purify::Purifier,
    sal: Saliency,
    classes: Vec<String>,
}

impl Analyzer {
    /// Loads the models of `dirs`.
    pub fn load(dirs: ModelDirs, device: &derm_core::Device) -> anyhow::Result<Self> {
        let seg = derm_segment::Segmenter::load(&dirs.segment, device)
            .with_context(|| format!("loading {}", dirs.segment.display()))?;
        let pur = derm_purify::Purifier::load(&dirs.purify, device)
            .with_context(|| format!("loading {}", dirs.purify.display()))?;
        let clf = derm_classify::Classifier::load(&dirs.classify, device)
            .with_context(|| format!("loading {}", dirs.classify.display()))?;
        let classes = clf.class_names();
        Ok(Analyzer { dirs, seg, pur, sal: Saliency::Classifier(Box::new(clf)), classes })
    }

    /// The model folders.
    pub fn dirs(&self) -> &ModelDirs {
        &self.dirs
    }

    /// The classifier's class names.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Runs every stage on `img`; `name` is what the record calls the image.
    pub fn analyze(&self, img: RgbImage, name: &Path) -> anyhow::Result<Analysis> {
        let t = std::time::Instant::now();
        let Saliency::Classifier(clf) = &self.sal else {
            bail!("the analyzer's saliency model is not a classifier");
        };
        let lesion = self.seg.predict(&[&img])?.remove(0);
        let hair = derm_hair::clean(&img, Some(&lesion.mask), &derm_hair::HairConfig::default())?;
        let purified = derm_purify::purify_image(&self.pur, &img, &hair.occlusion)?;
        // A classifier trained on lesion windows reads the window around the segmented lesion.
        let window = clf.lesion_view(&purified, &lesion.mask)?;
        let probs = clf.view_probabilities(&[window], clf.cfg.test_time_augmentation)?.remove(0);
        let (view, map) = self.sal.map(&purified, Some(&lesion.mask))?;
        let (vw, vh) = view.dimensions();
        let best = derm_classify::eval::decide(std::slice::from_ref(&probs), &clf.cfg.decision_weights)[0];
        let lesion_fraction =
            lesion.mask.as_raw().iter().filter(|&&v| v != 0).count() as f64 / lesion.mask.as_raw().len().max(1) as f64;
        let record = AnalysisRecord {
            files: OUTPUT_FILES.iter().map(|f| f.to_string()).collect(),
            image: name.to_path_buf(),
            lesion_fraction,
            models: self.dirs.clone(),
            occluded_fraction: hair.masked_fraction,
            predicted_class: self.classes.get(best).cloned(),
            probabilities: self.classes.iter().cloned().zip(probs.iter().copied()).collect(),
            seconds: 0.0,
            size: [img.width(), img.height()],
        };
        let lesion_overlay = common::mask_overlay(&purified, &lesion.mask, None);
        let mut a = Analysis {
            saliency: derm_vbp::to_gray(&map, vw, vh),
            saliency_overlay: derm_vbp::overlay(&view, &map),
            occlusion: hair.occlusion,
            lesion_mask: lesion.mask,
            lesion_overlay,
            purified,
            input: img,
            classes: self.classes.clone(),
            probs,
            record,
        };
        a.record.seconds = t.elapsed().as_secs_f64();
        Ok(a)
    }
}

impl AnalyzeArgs {
    /// Runs hair masking, segmentation, purification, classification and VisualBackProp.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let device = g.device()?;
        let id = common::file_id(&self.image);
        let out = self.out.clone().unwrap_or_else(|| PathBuf::from(format!("analysis_{id}")));
        let dirs = ModelDirs::locate(&self.models, &self.classifier)?;
        let img = image_io::load_rgb(&self.image)?;
        let t = std::time::Instant::now();
        let analyzer = Analyzer::load(dirs, &device)?;
        let mut a = analyzer.analyze(img, &self.image)?;
        // As before the analyzer existed: the time includes loading the models.
        a.record.seconds = t.elapsed().as_secs_f64();
        a.save(&out)?;
        let rec = &a.record;
        if self.json {
            println!("{}", serde_json::to_string_pretty(rec)?);
        } else {
            println!(
                "{}: {} ({:.1}% occluded, lesion {:.1}% of the image)",
                self.image.display(),
                rec.predicted_class.as_deref().unwrap_or("?"),
                rec.occluded_fraction * 100.0,
                rec.lesion_fraction * 100.0
            );
            for (c, p) in a.classes.iter().zip(&a.probs) {
                println!("  {c:<24} {p:.3}");
            }
            println!("wrote {}", out.display());
        }
        Ok(())
    }
}
