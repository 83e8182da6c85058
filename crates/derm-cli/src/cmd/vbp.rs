//! `derm vbp`: VisualBackProp saliency of a trained classifier or segmenter.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use derm_core::image_io;
use image::{GrayImage, RgbImage};

use crate::cmd::common::{self, collect_images};
use crate::GlobalOpts;

/// Arguments of `derm vbp`.
#[derive(Debug, clap::Args)]
pub struct VbpArgs {
    /// A trained classifier or segmenter (run folder or checkpoint folder).
    #[arg(long)]
    pub model: PathBuf,
    /// An image or a folder of images.
    #[arg(long)]
    pub input: PathBuf,
    /// Output folder: <id>_saliency.png (gray) and <id>_overlay.png (heat map on the image).
    #[arg(long)]
    pub out: PathBuf,
    /// Folder of lesion masks (<id>_segmentation.png, <id>.png, <id>_mask.png): report the share
    /// of saliency inside the lesion against the lesion's area. A classifier of lesion windows
    /// (`classify train --lesion-crop`) is shown the window around each lesion; without masks
    /// it sees whole images.
    #[arg(long)]
    pub lesion_masks: Option<PathBuf>,
    /// At most this many images (the first, sorted by name).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print a JSON summary.
    #[arg(long)]
    pub json: bool,
}

/// A model VisualBackProp can read.
pub enum Saliency {
    /// The classifier's ResNet.
    Classifier(Box<derm_classify::Classifier>),
    /// The segmentation U-Net.
    Segmenter(Box<derm_segment::Segmenter>),
}

impl Saliency {
    /// Loads the model the checkpoint's `meta.json` says it is (a classifier or a segmenter).
    pub fn load(dir: &Path, device: &derm_core::Device) -> anyhow::Result<Self> {
        let stage = derm_core::checkpoint::stage_of(dir).with_context(|| format!("reading {}", dir.display()))?;
        match stage.as_str() {
            "classify" => Ok(Saliency::Classifier(Box::new(
                derm_classify::Classifier::load(dir, device).with_context(|| format!("loading {}", dir.display()))?,
            ))),
            "segment" => Ok(Saliency::Segmenter(Box::new(
                derm_segment::Segmenter::load(dir, device).with_context(|| format!("loading {}", dir.display()))?,
            ))),
            other => {
                bail!("{}: a `{other}` checkpoint; VisualBackProp needs a classifier or a segmenter", dir.display())
            }
        }
    }

    /// The view of `img` the model sees (for a classifier of lesion windows, the window around
    /// the lesion of `mask`, when given), and its saliency map (row-major, view size).
    pub fn map(&self, img: &RgbImage, mask: Option<&GrayImage>) -> anyhow::Result<(RgbImage, Vec<f32>)> {
        match self {
            Saliency::Classifier(c) => {
                let view = match mask {
                    Some(m) => c.lesion_view(img, m)?,
                    None => c.view(img),
                };
                let x = image_io::images_to_tensor(&[&view], c.cfg.normalize, &c.device)?;
                let f = c.net.forward_features(&x, false)?;
                let mut stages = vec![f.stem];
                stages.extend(f.layers);
                let m = derm_vbp::visual_backprop(
                    &stages,
                    &derm_vbp::resnet_steps(c.cfg.model.space_to_depth),
                    (view.height() as usize, view.width() as usize),
                )?;
                Ok((view, m.into_iter().next().unwrap_or_default()))
            }
            Saliency::Segmenter(s) => {
                let n = s.cfg.size;
                let view = image_io::resize_rgb(img, n, n);
                let x = image_io::images_to_tensor(&[&view], s.cfg.normalize, &s.device)?;
                let f = s.net.forward_features(&x, false)?;
                let levels = s.cfg.model.widths.len();
                let stages: Vec<_> = f.stages.into_iter().take(levels + 1).collect();
                let m = derm_vbp::visual_backprop(&stages, &derm_vbp::unet_steps(levels), (n as usize, n as usize))?;
                Ok((view, m.into_iter().next().unwrap_or_default()))
            }
        }
    }

    /// The mask brought to the view's geometry (that of [`Saliency::map`] with the mask).
    pub fn mask_view(&self, mask: &GrayImage) -> GrayImage {
        let window = match self {
            Saliency::Classifier(c) => c.lesion_window(mask),
            Saliency::Segmenter(_) => None,
        };
        let mask = window.map(|w| w.apply(mask)).unwrap_or_else(|| mask.clone());
        let rgb = RgbImage::from_fn(mask.width(), mask.height(), |x, y| {
            let v = mask.get_pixel(x, y).0[0];
            image::Rgb([v, v, v])
        });
        let v = match self {
            Saliency::Classifier(c) => c.view(&rgb),
            Saliency::Segmenter(s) => image_io::resize_rgb(&rgb, s.cfg.size, s.cfg.size),
        };
        GrayImage::from_fn(v.width(), v.height(), |x, y| {
            image::Luma([if v.get_pixel(x, y).0[0] >= 128 { 255 } else { 0 }])
        })
    }
}

impl VbpArgs {
    /// Writes the maps and prints the summary.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let device = g.device()?;
        let model = Saliency::load(&self.model, &device)?;
        let mut files = collect_images(&self.input)?;
        if let Some(n) = self.limit {
            files.truncate(n);
        }
        let pb = crate::progress::bar(files.len() as u64, "vbp", g.quiet || self.json);
        let mut rows = Vec::new();
        for f in &files {
            let img = image_io::load_rgb(f)?;
            let id = common::file_id(f);
            let lesion = match &self.lesion_masks {
                Some(dir) => {
                    let Some(mp) = derm_data::handoff::find_mask(dir, &id) else {
                        bail!("no lesion mask for {id} in {}", dir.display());
                    };
                    Some(image_io::load_mask(&mp, Some(img.dimensions()))?)
                }
                None => None,
            };
            let (view, map) = model.map(&img, lesion.as_ref())?;
            let (w, h) = view.dimensions();
            image_io::save_png(&self.out.join(format!("{id}_saliency.png")), &derm_vbp::to_gray(&map, w, h))?;
            let mut over = derm_vbp::overlay(&view, &map);
            let mut row = derm_vbp::ImageSaliency { id: id.clone(), mass_inside: None, area_fraction: None };
            if let Some(lesion) = &lesion {
                let mask = model.mask_view(lesion);
                let (inside, area) = derm_vbp::mass_inside(&map, &mask);
                row.mass_inside = Some(inside);
                row.area_fraction = Some(area);
                over = derm_visual::plot::mask_overlay(&over, &mask, [40, 230, 60], true);
            }
            image_io::save_png(&self.out.join(derm_data::handoff::overlay(&id)), &over)?;
            rows.push(row);
            pb.inc(1);
        }
        pb.finish_and_clear();
        let doc = derm_vbp::SaliencySummary::new(rows);
        derm_core::fsutil::write_json(&self.out.join("vbp.json"), &doc)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            println!("wrote saliency maps of {} images to {}", doc.images, self.out.display());
            if let (Some(m), Some(a)) = (doc.mean_mass_inside, doc.mean_area_fraction) {
                println!("saliency inside the lesion: {m:.3} of the total, for a lesion area fraction of {a:.3}");
            }
        }
        Ok(())
    }
}
