//! The classifier's data: extra training sources (purified and synthetic images), a cache of
//! images scaled to the working short side, lesion-centred windows cut with a lesion mask, and
//! the crops, flips and quarter turns of training, evaluation and test-time augmentation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use derm_core::image_io::{self, Crop};
use derm_core::{Error, Result, Rng};
use derm_data::augment::{augment_item, AugmentConfig};
use derm_data::cache::Item;
use derm_data::dataset::{Dataset, Sample};
use image::{GrayImage, RgbImage};
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
                    // The purified image has its original's geometry, so its lesion mask.
                    mask: s.mask.clone(),
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

/// Decoded images scaled so their short side is `short`, kept up to a byte budget; with a
/// lesion margin, each image is first cut to the window around its lesion ([`lesion_window`]).
#[derive(Debug)]
pub struct ScaledCache {
    short: u32,
    max_bytes: usize,
    lesion_margin: Option<f64>,
    inner: Mutex<(HashMap<PathBuf, Arc<RgbImage>>, usize)>,
    /// Lesion masks cut and scaled as their images ([`ScaledCache::get_with_mask`]), by image path.
    masks: Mutex<HashMap<PathBuf, Arc<GrayImage>>>,
}

impl ScaledCache {
    /// A cache for short side `short` holding up to `max_bytes` of pixels, of whole images
    /// (`lesion_margin` `None`) or of lesion windows with that margin.
    pub fn new(short: u32, max_bytes: usize, lesion_margin: Option<f64>) -> Self {
        ScaledCache {
            short,
            max_bytes,
            lesion_margin,
            inner: Mutex::new((HashMap::new(), 0)),
            masks: Mutex::new(HashMap::new()),
        }
    }

    /// A sample's image: cut to its lesion window when the cache has a margin and the sample a
    /// mask (a sample without one, such as a synthetic image, is read whole), then scaled.
    pub fn get(&self, sample: &Sample) -> Result<Arc<RgbImage>> {
        match self.cached_image(sample) {
            Some(img) => Ok(img),
            None => Ok(self.decode(sample, false)?.0),
        }
    }

    /// A sample's image as [`ScaledCache::get`] gives it, with its lesion mask (`None` for a
    /// sample without one) cut to the same window and scaled to the same size: what the auxiliary
    /// lesion-mask head ([`crate::aux`]) learns from. A mask of another size than its image is
    /// an error naming both files.
    pub fn get_with_mask(&self, sample: &Sample) -> Result<ScaledPair> {
        if sample.mask.is_none() {
            return Ok((self.get(sample)?, None));
        }
        let mask = self.masks.lock().ok().and_then(|m| m.get(&sample.image).cloned());
        match (self.cached_image(sample), mask) {
            (Some(img), Some(mask)) => Ok((img, Some(mask))),
            _ => self.decode(sample, true),
        }
    }

    fn cached_image(&self, sample: &Sample) -> Option<Arc<RgbImage>> {
        self.inner.lock().ok().and_then(|g| g.0.get(&sample.image).cloned())
    }

    /// Decodes a sample's image, and its mask where the lesion window or `with_mask` needs it
    /// (read once for both), cuts both to the window, scales both, and keeps them within the
    /// budget. The mask comes back only `with_mask`.
    fn decode(&self, sample: &Sample, with_mask: bool) -> Result<ScaledPair> {
        let img = image_io::load_rgb(&sample.image)?;
        let mask_path = sample.mask.as_deref().filter(|_| with_mask || self.lesion_margin.is_some());
        let mask = mask_path.map(|p| image_io::load_mask(p, Some(img.dimensions()))).transpose()?;
        let window = match (self.lesion_margin, &mask, mask_path) {
            (Some(m), Some(mask), Some(path)) => window_or_whole(mask, m, &sample.image, path),
            _ => None,
        };
        let (img, mask) = match window {
            Some(c) => (c.apply(&img), mask.map(|m| c.apply(&m))),
            None => (img, mask),
        };
        let img = Arc::new(scale_short(&img, self.short));
        if let Ok(mut g) = self.inner.lock() {
            let bytes = img.as_raw().len();
            // Already there when only its mask was missing: counted once.
            if !g.0.contains_key(&sample.image) && g.1 + bytes <= self.max_bytes {
                g.1 += bytes;
                g.0.insert(sample.image.clone(), img.clone());
            }
        }
        let mask = mask.filter(|_| with_mask).map(|m| Arc::new(image_io::resize_mask(&m, img.width(), img.height())));
        if let (Some(mask), Ok(mut m)) = (&mask, self.masks.lock()) {
            // A mask has a third of its image's bytes, so a third of the images' budget.
            if m.len() * mask.as_raw().len() <= self.max_bytes / 3 {
                m.insert(sample.image.clone(), mask.clone());
            }
        }
        Ok((img, mask))
    }

    /// Several samples' images, in parallel, in the order of `indices`.
    pub fn load(&self, data: &Dataset, indices: &[usize]) -> Result<Vec<Arc<RgbImage>>> {
        indices.par_iter().map(|&i| self.get(sample_at(data, i)?)).collect()
    }

    /// Several samples' images with their lesion masks ([`ScaledCache::get_with_mask`]), in
    /// parallel, in the order of `indices`.
    pub fn load_with_masks(&self, data: &Dataset, indices: &[usize]) -> Result<Vec<ScaledPair>> {
        indices.par_iter().map(|&i| self.get_with_mask(sample_at(data, i)?)).collect()
    }
}

/// A scaled image and its lesion mask, scaled alike (`None`: the sample has no mask).
pub type ScaledPair = (Arc<RgbImage>, Option<Arc<GrayImage>>);

fn sample_at(data: &Dataset, i: usize) -> Result<&Sample> {
    data.samples.get(i).ok_or_else(|| Error::invalid(format!("sample {i} of {} samples", data.len())))
}

/// The window lesion-centred classification reads: the bounding box of the mask's foreground,
/// its longer side widened by `margin` of itself on each side (and at least a quarter of the
/// image's short side, so a speck does not become the whole view), centred on the box and moved
/// inside the image. A side longer than the image's is cut to the image's, so the window is
/// square unless the lesion spans the short side. `None` when the mask is empty.
pub fn lesion_window(mask: &GrayImage, margin: f64) -> Option<Crop> {
    let (w, h) = mask.dimensions();
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0u32, 0u32);
    for (x, y, p) in mask.enumerate_pixels() {
        if p[0] >= 128 {
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
    }
    if x0 == u32::MAX {
        return None;
    }
    let long = (x1 - x0 + 1).max(y1 - y0 + 1) as f64;
    let side = (long * (1.0 + 2.0 * margin.max(0.0))).max(w.min(h) as f64 / 4.0).round() as u32;
    let (cw, ch) = (side.clamp(1, w), side.clamp(1, h));
    // Centred on the box (twice the centre keeps it in integers), then moved inside.
    let place = |lo: u32, hi: u32, len: u32, full: u32| ((lo + hi + 1).saturating_sub(len) / 2).min(full - len);
    Some(Crop { x: place(x0, x1, cw, w), y: place(y0, y1, ch, h), w: cw, h: ch })
}

/// `img` (read from `origin`) cut to the lesion window of the mask at `mask_path`, which must
/// have the image's size. An empty mask (no lesion found) leaves the image whole, with a warning.
pub fn lesion_crop(img: &RgbImage, origin: &Path, mask_path: &Path, margin: f64) -> Result<RgbImage> {
    let mask = image_io::load_mask(mask_path, Some(img.dimensions()))?;
    Ok(match window_or_whole(&mask, margin, origin, mask_path) {
        Some(c) => c.apply(img),
        None => img.clone(),
    })
}

/// [`lesion_window`], warning (with both files) that the whole image is read when the mask is
/// empty.
fn window_or_whole(mask: &GrayImage, margin: f64, origin: &Path, mask_path: &Path) -> Option<Crop> {
    let w = lesion_window(mask, margin);
    if w.is_none() {
        tracing::warn!(image = %origin.display(), mask = %mask_path.display(), "empty lesion mask: the whole image is classified");
    }
    w
}

/// Checks that every sample of `data` has a lesion mask, as lesion-centred classification needs;
/// the error names how many lack one and the first of them.
pub fn require_masks(data: &Dataset, what: &str) -> Result<()> {
    let missing: Vec<&Sample> = data.samples.iter().filter(|s| s.mask.is_none()).collect();
    match missing.first() {
        None => Ok(()),
        Some(s) => Err(Error::invalid(format!(
            "{what}: the model classifies lesion windows, but {} of {} images of {} have no lesion mask (first: {}, {}); \
             give a data set with masks or a folder of <id>_segmentation.png (`derm segment predict` writes them)",
            missing.len(),
            data.len(),
            data.name,
            s.id,
            s.image.display()
        ))),
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
/// centred) `size` x `size` crop, then flips, quarter turns, free rotations and elastic warps,
/// colour jitter and random erasing as `aug` says (its `crop_scale` crops further, rescaling back
/// to `size`).
pub fn train_view(img: &RgbImage, size: u32, random_crop: bool, aug: &AugmentConfig, rng: &mut Rng) -> RgbImage {
    train_view_with_mask(img, None, size, random_crop, aug, rng).0
}

/// [`train_view`] of an image and its lesion mask (of the image's size), the mask moved with the
/// image (same crop, flips, turns and warps; no colour jitter, no erasing): the crop, then
/// [`augment_item`]. The random draws are those of [`train_view`], so a mask changes nothing in the
/// image's view.
pub fn train_view_with_mask(
    img: &RgbImage,
    mask: Option<&GrayImage>,
    size: u32,
    random_crop: bool,
    aug: &AugmentConfig,
    rng: &mut Rng,
) -> (RgbImage, Option<GrayImage>) {
    let (w, h) = img.dimensions();
    let crop = if random_crop { Crop::random(w, h, size, size, rng) } else { Crop::center(w, h, size, size) };
    let mut c = crop.apply(img);
    let mut m = mask.map(|m| crop.apply(m));
    if c.dimensions() != (size, size) {
        c = image_io::resize_rgb(&c, size, size);
        m = m.map(|m| image_io::resize_mask(&m, size, size));
    }
    let mut item = Item { image: c, mask: m, ..Default::default() };
    augment_item(aug, &mut item, Some((size, size)), rng);
    (item.image, item.mask)
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

    fn boxed(w: u32, h: u32, x: std::ops::RangeInclusive<u32>, y: std::ops::RangeInclusive<u32>) -> GrayImage {
        GrayImage::from_fn(w, h, |px, py| image::Luma([if x.contains(&px) && y.contains(&py) { 255 } else { 0 }]))
    }

    #[test]
    fn the_lesion_window_is_the_widened_square_around_the_mask_inside_the_image() {
        // A 10 x 10 lesion widened by half its side each way: a 20 x 20 window on its centre.
        assert_eq!(lesion_window(&boxed(100, 60, 40..=49, 20..=29), 0.5), Some(Crop { x: 35, y: 15, w: 20, h: 20 }));
        // Near a corner the window moves inside the image instead of shrinking.
        assert_eq!(lesion_window(&boxed(100, 60, 95..=99, 0..=9), 1.0), Some(Crop { x: 70, y: 0, w: 30, h: 30 }));
        // A lesion across the image: the window is cut to the image's short side.
        assert_eq!(lesion_window(&boxed(100, 60, 0..=99, 10..=49), 0.1), Some(Crop { x: 0, y: 0, w: 100, h: 60 }));
        // A one-pixel speck gets a quarter of the short side, not a one-pixel view.
        assert_eq!(lesion_window(&boxed(100, 60, 50..=50, 30..=30), 0.0), Some(Crop { x: 43, y: 23, w: 15, h: 15 }));
        assert_eq!(lesion_window(&GrayImage::new(100, 60), 0.2), None);
    }

    #[test]
    fn lesion_crops_need_a_mask_of_the_images_size() {
        let d = tempfile::tempdir().unwrap();
        let img = RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 90]));
        let (ip, mp, bad) = (d.path().join("a.png"), d.path().join("a_mask.png"), d.path().join("b_mask.png"));
        img.save(&ip).unwrap();
        boxed(40, 30, 10..=19, 5..=14).save(&mp).unwrap();
        boxed(30, 30, 10..=19, 5..=14).save(&bad).unwrap();
        let c = lesion_crop(&img, &ip, &mp, 0.25).unwrap();
        assert_eq!(c, Crop { x: 7, y: 2, w: 15, h: 15 }.apply(&img));
        let e = lesion_crop(&img, &ip, &bad, 0.25).unwrap_err().to_string();
        assert!(e.contains("b_mask.png") && e.contains("30x30") && e.contains("40x30"), "{e}");
        // The cache cuts the window before scaling; a sample without a mask is read whole.
        let s = Sample {
            id: "a".into(),
            image: ip.clone(),
            mask: Some(mp),
            label: Some(0),
            group: None,
            extras: Default::default(),
        };
        let cache = ScaledCache::new(30, 1 << 20, Some(0.25));
        assert_eq!(*cache.get(&s).unwrap(), scale_short(&c, 30));
        let whole = Sample { mask: None, image: d.path().join("a.png"), ..s.clone() };
        assert_eq!(ScaledCache::new(30, 0, Some(0.25)).get(&whole).unwrap().dimensions(), (40, 30));
        let data = Dataset {
            name: "t".into(),
            split: "train".into(),
            root: d.path().into(),
            classes: vec!["x".into()],
            melanoma_class: None,
            samples: vec![s, Sample { id: "b".into(), ..whole }],
        };
        let e = require_masks(&data, "check").unwrap_err().to_string();
        assert!(e.contains("1 of 2") && e.contains("first: b"), "{e}");
    }

    #[test]
    fn a_mask_moves_with_its_image_and_leaves_the_view_as_it_was() {
        // The image's red channel is the mask, so the view's red channel must be the view's mask.
        let mask = boxed(60, 44, 10..=33, 5..=30);
        let img = RgbImage::from_fn(60, 44, |x, y| image::Rgb([mask.get_pixel(x, y)[0], (x * 4) as u8, 7]));
        let aug = AugmentConfig { crop_scale: [0.6, 1.0], ..AugmentConfig::geometric() };
        for seed in 0..6 {
            let (v, m) = train_view_with_mask(&img, Some(&mask), 40, true, &aug, &mut Rng::new(seed));
            assert_eq!(v, train_view(&img, 40, true, &aug, &mut Rng::new(seed)), "the same draws");
            let m = m.unwrap();
            assert_eq!(m.dimensions(), (40, 40));
            let agree = v.pixels().zip(m.pixels()).filter(|(p, q)| (p[0] >= 128) == (q[0] >= 128)).count();
            assert!(agree as f64 >= 0.97 * 1600.0, "seed {seed}: {agree} of 1600 pixels agree");
        }
        // The cache cuts the mask to the image's lesion window and scales it to the image's size.
        let d = tempfile::tempdir().unwrap();
        let (ip, mp, bad) = (d.path().join("a.png"), d.path().join("a_mask.png"), d.path().join("b_mask.png"));
        img.save(&ip).unwrap();
        mask.save(&mp).unwrap();
        boxed(30, 44, 1..=3, 1..=3).save(&bad).unwrap();
        let s = Sample {
            id: "a".into(),
            image: ip,
            mask: Some(mp),
            label: Some(0),
            group: None,
            extras: Default::default(),
        };
        let cache = ScaledCache::new(20, 1 << 20, Some(0.1));
        let (i, m) = cache.get_with_mask(&s).unwrap();
        let m = m.unwrap();
        assert_eq!(m.dimensions(), i.dimensions());
        assert_eq!(*i, *cache.get(&s).unwrap());
        assert!(i.pixels().zip(m.pixels()).filter(|(p, q)| (p[0] >= 128) != (q[0] >= 128)).count() <= 8);
        let fresh = ScaledCache::new(20, 1 << 20, None);
        let e = fresh.get_with_mask(&Sample { mask: Some(bad), ..s }).unwrap_err().to_string();
        assert!(e.contains("b_mask.png") && e.contains("30x44"), "{e}");
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
        let f = derm_core::symmetry::Symmetry::from_index(3).image(&img);
        assert_eq!(f.get_pixel(0, 0), img.get_pixel(49, 39));
    }
}
