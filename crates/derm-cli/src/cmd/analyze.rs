//! `derm analyze`: one image through every stage, with the models of a pipeline run.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use derm_core::image_io;

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

fn model_dir(root: &Path, candidates: &[&str], what: &str) -> anyhow::Result<PathBuf> {
    for c in candidates {
        let p = root.join(c);
        if p.is_dir() {
            return Ok(p);
        }
    }
    bail!(
        "no {what} model in {}: looked for {} (train it with `derm {what} train`, or run `cargo xtask pipeline`)",
        root.display(),
        candidates.join(", ")
    )
}

impl AnalyzeArgs {
    /// Runs hair masking, segmentation, purification, classification and VisualBackProp.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let device = g.device()?;
        let id = common::file_id(&self.image);
        let out = self.out.clone().unwrap_or_else(|| PathBuf::from(format!("analysis_{id}")));
        let seg_dir = model_dir(&self.models, &["segment/model", "segment"], "segment")?;
        let pur_dir = model_dir(&self.models, &["purify/model", "purify"], "purify")?;
        let cls_dir = model_dir(
            &self.models,
            &[&format!("classify/{}", self.classifier), "classify/baseline", "classify"],
            "classify",
        )?;
        let img = image_io::load_rgb(&self.image)?;
        let t = std::time::Instant::now();

        let seg = derm_segment::Segmenter::load(&seg_dir, &device)
            .with_context(|| format!("loading {}", seg_dir.display()))?;
        let lesion = seg.predict(&[&img])?.remove(0);
        let hair = derm_hair::clean(&img, Some(&lesion.mask), &derm_hair::HairConfig::default())?;
        let pur =
            derm_purify::Purifier::load(&pur_dir, &device).with_context(|| format!("loading {}", pur_dir.display()))?;
        let purified = derm_purify::purify_image(&pur, &img, &hair.occlusion)?;
        let clf = derm_classify::Classifier::load(&cls_dir, &device)
            .with_context(|| format!("loading {}", cls_dir.display()))?;
        let probs = clf.probabilities(&[&purified], false)?.remove(0);
        let classes = clf.class_names();
        let sal = Saliency::Classifier(Box::new(clf));
        let (view, map) = sal.map(&purified)?;
        let (vw, vh) = view.dimensions();

        image_io::save_png(&out.join("input.png"), &img)?;
        image_io::save_png(&out.join("occlusion.png"), &hair.occlusion)?;
        image_io::save_png(&out.join("purified.png"), &purified)?;
        image_io::save_png(&out.join("lesion_mask.png"), &lesion.mask)?;
        image_io::save_png(&out.join("lesion_overlay.png"), &common::mask_overlay(&purified, &lesion.mask, None))?;
        image_io::save_png(&out.join("saliency.png"), &derm_vbp::to_gray(&map, vw, vh))?;
        image_io::save_png(&out.join("saliency_overlay.png"), &derm_vbp::overlay(&view, &map))?;
        let best = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0);
        let lesion_fraction =
            lesion.mask.as_raw().iter().filter(|&&v| v != 0).count() as f64 / lesion.mask.as_raw().len().max(1) as f64;
        let doc = serde_json::json!({
            "image": self.image,
            "size": [img.width(), img.height()],
            "occluded_fraction": hair.masked_fraction,
            "lesion_fraction": lesion_fraction,
            "probabilities": classes.iter().cloned().zip(probs.iter().copied()).collect::<std::collections::BTreeMap<_, _>>(),
            "predicted_class": classes.get(best),
            "models": { "segment": seg_dir, "purify": pur_dir, "classify": cls_dir },
            "files": ["input.png", "occlusion.png", "purified.png", "lesion_mask.png", "lesion_overlay.png", "saliency.png", "saliency_overlay.png"],
            "seconds": t.elapsed().as_secs_f64(),
        });
        derm_core::fsutil::write_json(&out.join("analysis.json"), &doc)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            println!(
                "{}: {} ({:.1}% occluded, lesion {:.1}% of the image)",
                self.image.display(),
                classes.get(best).map(String::as_str).unwrap_or("?"),
                hair.masked_fraction * 100.0,
                lesion_fraction * 100.0
            );
            for (c, p) in classes.iter().zip(&probs) {
                println!("  {c:<24} {p:.3}");
            }
            println!("wrote {}", out.display());
        }
        Ok(())
    }
}
