//! The classifier's data: extra training sources (purified and synthetic images), a cache of
//! images scaled to the working short side, and the crops and flips of training, evaluation and
//! test-time augmentation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use derm_core::image_io::{self, Crop};
use derm_core::{Error, Result, Rng};
use derm_data::augment::{AugmentConfig, Geometry, Jitter};
use derm_data::dataset::{Dataset, Sample};
use image::RgbImage;
use rayon::prelude::*;

/// Extra training images beside the data set's originals.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExtraSources {
    /// A folder of `<id>_purified.png` written by the purify stage: each one found for a training
    /// id is added as another sample with that id's label.
    pub purified: Option<PathBuf>,
    /// A folder with its own `manifest.toml` and labels (as the synth stage writes): every
    /// labelled image is added to training. Its class names must be among the data set's.
    pub synthetic: Option<PathBuf>,
}

/// Adds the purified and synthetic samples to a training part. Validation is never touched:
/// purified versions of validation ids are not added. Returns the counts added.
pub fn add_sources(train: &mut Dataset, src: &ExtraSources) -> Result<(usize, usize)> {
    let mut added = Vec::new();
    let mut n_purified = 0;
    if let Some(dir) = &src.purified {
        if !dir.is_dir() {
            return Err(Error::invalid(format!("purified images: {} is not a folder", dir.display())));
        }
        for s in train.samples.iter().filter(|s| s.label.is_some()) {
            let p = dir.join(derm_data::handoff::purified(&s.id));
            if p.is_file() {
                added.push(Sample {
                    id: format!("{}_purified", s.id),
                    image: p,
                    mask: None,
                    label: s.label,
                    group: s.group.clone(),
                    extras: Default::default(),
                });
                n_purified += 1;
            }
        }
        if n_purified == 0 {
            return Err(Error::invalid(format!(
                "purified images: {} holds no <id>_purified.png for any of the {} training ids",
                dir.display(),
                train.len()
            )));
        }
    }
    let mut n_synth = 0;
    if let Some(dir) = &src.synthetic {
        let syn = Dataset::open_dir(dir, None, None)?;
        let map: Vec<Option<usize>> = syn.classes.iter().map(|c| train.classes.iter().position(|t| t == c)).collect();
        for s in syn.samples.iter() {
            let Some(l) = s.label else { continue };
            let Some(Some(k)) = map.get(l) else {
                return Err(Error::invalid(format!(
                    "synthetic images in {}: class {:?} is not one of {:?}",
                    dir.display(),
                    syn.classes.get(l),
                    train.classes
                )));
            };
            added.push(Sample {
                id: format!("synthetic_{}", s.id),
                image: s.image.clone(),
                mask: None,
                label: Some(*k),
                group: None,
                extras: Default::default(),
            });
            n_synth += 1;
        }
        if n_synth == 0 {
            return Err(Error::invalid(format!("synthetic images in {}: none is labelled", dir.display())));
        }
    }
    train.samples.extend(added);
    Ok((n_purified, n_synth))
}

/// Decoded images scaled so their short side is `short`, kept up to a byte budget.
#[derive(Debug)]
pub struct ScaledCache {
    short: u32,
    max_bytes: usize,
    inner: Mutex<(HashMap<PathBuf, Arc<RgbImage>>, usize)>,
}

impl ScaledCache {
    /// A cache for short side `short` holding up to `max_bytes` of pixels.
    pub fn new(short: u32, max_bytes: usize) -> Self {
        ScaledCache { short, max_bytes, inner: Mutex::new((HashMap::new(), 0)) }
    }

    /// The image at `path`, scaled.
    pub fn get(&self, path: &Path) -> Result<Arc<RgbImage>> {
        if let Ok(g) = self.inner.lock() {
            if let Some(img) = g.0.get(path) {
                return Ok(img.clone());
            }
        }
        let img = Arc::new(scale_short(&image_io::load_rgb(path)?, self.short));
        if let Ok(mut g) = self.inner.lock() {
            let bytes = img.as_raw().len();
            if g.1 + bytes <= self.max_bytes {
                g.1 += bytes;
                g.0.insert(path.to_path_buf(), img.clone());
            }
        }
        Ok(img)
    }

    /// Several samples' images, in parallel, in the order of `indices`.
    pub fn load(&self, data: &Dataset, indices: &[usize]) -> Result<Vec<Arc<RgbImage>>> {
        indices
            .par_iter()
            .map(|&i| {
                let s = data
                    .samples
                    .get(i)
                    .ok_or_else(|| Error::invalid(format!("sample {i} of {} samples", data.len())))?;
                self.get(&s.image)
            })
            .collect()
    }
}

/// Scales an image so its short side is `short` (unchanged when it already is).
pub fn scale_short(img: &RgbImage, short: u32) -> RgbImage {
    if img.width().min(img.height()) == short {
        img.clone()
    } else {
        image_io::resize_short_side(img, short)
    }
}

/// The evaluation view: short side scaled to `resize`, centred `size` x `size` crop.
pub fn center_view(img: &RgbImage, resize: u32, size: u32) -> RgbImage {
    let s = scale_short(img, resize.max(size));
    Crop::center(s.width(), s.height(), size, size).apply(&s)
}

/// One training view of an image already scaled to the working short side: a random (or
/// centred) `size` x `size` crop, then flips, quarter turns and colour jitter as `aug` says (its
/// `crop_scale` crops further, rescaling back to `size`).
pub fn train_view(img: &RgbImage, size: u32, random_crop: bool, aug: &AugmentConfig, rng: &mut Rng) -> RgbImage {
    let (w, h) = img.dimensions();
    let crop = if random_crop { Crop::random(w, h, size, size, rng) } else { Crop::center(w, h, size, size) };
    let mut c = crop.apply(img);
    if c.dimensions() != (size, size) {
        c = image_io::resize_rgb(&c, size, size);
    }
    let g = Geometry::draw(aug, c.dimensions(), Some((size, size)), rng);
    let mut out = g.rgb(&c);
    Jitter::draw(aug, rng).apply(&mut out);
    out
}

/// Flip `k` of the four test-time views: 0 none, 1 left-right, 2 top-bottom, 3 both.
pub fn flip_view(img: &RgbImage, k: usize) -> RgbImage {
    use image::imageops::{flip_horizontal, flip_vertical};
    match k % 4 {
        1 => flip_horizontal(img),
        2 => flip_vertical(img),
        3 => flip_vertical(&flip_horizontal(img)),
        _ => img.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use derm_data::phantom::{write_phantom_set, PhantomConfig};

    #[test]
    fn purified_and_synthetic_samples_join_training_only() {
        let d = tempfile::tempdir().unwrap();
        let pc = PhantomConfig { size: 32, ..PhantomConfig::balanced() };
        write_phantom_set(&d.path().join("ph"), &pc, 1, 12).unwrap();
        write_phantom_set(&d.path().join("syn"), &pc, 2, 5).unwrap();
        let data = Dataset::open_dir(&d.path().join("ph"), None, None).unwrap();
        let (mut train, val) = data.split_by_id(0.3, 0);
        let pur = d.path().join("pur");
        std::fs::create_dir_all(&pur).unwrap();
        let img = RgbImage::new(20, 30);
        for s in train.samples.iter().take(3).chain(val.samples.iter().take(1)) {
            img.save(pur.join(format!("{}_purified.png", s.id))).unwrap();
        }
        let n0 = train.len();
        let first_label = train.samples[0].label;
        let src = ExtraSources { purified: Some(pur.clone()), synthetic: Some(d.path().join("syn")) };
        let (np, ns) = add_sources(&mut train, &src).unwrap();
        assert_eq!((np, ns), (3, 5));
        assert_eq!(train.len(), n0 + 8);
        let p = train.samples.iter().find(|s| s.id.ends_with("_purified")).unwrap();
        assert_eq!(p.label, first_label);
        // A folder without any matching file is an error naming it.
        let empty = d.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let e = add_sources(&mut train.clone(), &ExtraSources { purified: Some(empty), synthetic: None })
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty") && e.contains("_purified.png"), "{e}");
    }

    #[test]
    fn views_have_the_working_size() {
        let img = RgbImage::from_fn(50, 40, |x, y| image::Rgb([x as u8, y as u8, 0]));
        assert_eq!(center_view(&img, 36, 32).dimensions(), (32, 32));
        let s = scale_short(&img, 36);
        assert_eq!(s.dimensions(), (45, 36));
        let mut r = Rng::new(0);
        let aug = AugmentConfig { crop_scale: [1.0, 1.0], ..AugmentConfig::geometric() };
        assert_eq!(train_view(&s, 32, true, &aug, &mut r).dimensions(), (32, 32));
        let f = flip_view(&img, 3);
        assert_eq!(f.get_pixel(0, 0), img.get_pixel(49, 39));
    }
}
