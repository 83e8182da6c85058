//! Lazy, parallel, cached decoding: a sample's files are decoded when first asked for, resized
//! to the working size, and kept in a cache bounded in bytes that forgets the least recently
//! used entries. 10015 HAM10000 images need not all be decoded, nor kept at full size.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use derm_core::image_io::{load_mask, load_rgb, resize_mask, resize_rgb};
use derm_core::Result;
use image::{GrayImage, RgbImage};
use rayon::prelude::*;

use crate::dataset::Dataset;
use crate::manifest::ExtraKind;

/// A decoded sample at the working size.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Item {
    /// Sample id.
    pub id: String,
    /// The image.
    pub image: RgbImage,
    /// Its lesion mask (0/255), when it has one.
    pub mask: Option<GrayImage>,
    /// Its class, when known.
    pub label: Option<usize>,
    /// Extra colour images by name (a phantom's `clean`).
    pub extra_images: BTreeMap<String, RgbImage>,
    /// Extra masks by name (a phantom's `occlusion`).
    pub extra_masks: BTreeMap<String, GrayImage>,
}

#[derive(Clone)]
enum Entry {
    Rgb(Arc<RgbImage>),
    Gray(Arc<GrayImage>),
}

impl Entry {
    fn bytes(&self) -> usize {
        match self {
            Entry::Rgb(i) => i.as_raw().len(),
            Entry::Gray(i) => i.as_raw().len(),
        }
    }
}

type Key = (PathBuf, Option<(u32, u32)>, bool);

#[derive(Default)]
struct Inner {
    map: HashMap<Key, (Entry, u64)>,
    bytes: usize,
    tick: u64,
    hits: u64,
    misses: u64,
}

/// A cache of decoded, resized images, bounded in bytes (least recently used entries go first).
/// Safe to share between threads.
pub struct ImageCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for ImageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (hits, misses, bytes) = self.stats();
        write!(f, "ImageCache({bytes}/{} bytes, {hits} hits, {misses} misses)", self.max_bytes)
    }
}

impl ImageCache {
    /// A cache holding at most `max_bytes` of pixels (0 disables caching).
    pub fn new(max_bytes: usize) -> ImageCache {
        ImageCache { max_bytes, inner: Mutex::new(Inner::default()) }
    }

    /// A cache of 1 GiB.
    pub fn default_size() -> ImageCache {
        ImageCache::new(1 << 30)
    }

    /// (hits, misses, bytes held).
    pub fn stats(&self) -> (u64, u64, usize) {
        self.inner.lock().map(|i| (i.hits, i.misses, i.bytes)).unwrap_or_default()
    }

    fn get(&self, key: &Key) -> Option<Entry> {
        let mut g = self.inner.lock().ok()?;
        g.tick += 1;
        let tick = g.tick;
        let found = g.map.get_mut(key).map(|(e, t)| {
            *t = tick;
            e.clone()
        });
        if found.is_some() {
            g.hits += 1;
        } else {
            g.misses += 1;
        }
        found
    }

    fn put(&self, key: Key, e: Entry) {
        let size = e.bytes();
        if size > self.max_bytes {
            return;
        }
        let Ok(mut g) = self.inner.lock() else { return };
        g.tick += 1;
        let tick = g.tick;
        if let Some((old, _)) = g.map.insert(key, (e, tick)) {
            g.bytes -= old.bytes();
        }
        g.bytes += size;
        while g.bytes > self.max_bytes {
            let Some(oldest) = g.map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| k.clone()) else {
                break;
            };
            if let Some((old, _)) = g.map.remove(&oldest) {
                g.bytes -= old.bytes();
            }
        }
    }

    /// The RGB image at `path`, resized to `size` when given.
    pub fn rgb(&self, path: &Path, size: Option<(u32, u32)>) -> Result<Arc<RgbImage>> {
        let key = (path.to_path_buf(), size, false);
        if let Some(Entry::Rgb(i)) = self.get(&key) {
            return Ok(i);
        }
        let mut img = load_rgb(path)?;
        if let Some((w, h)) = size {
            img = resize_rgb(&img, w, h);
        }
        let img = Arc::new(img);
        self.put(key, Entry::Rgb(img.clone()));
        Ok(img)
    }

    /// The binary mask at `path`, resized to `size` when given (re-binarised).
    pub fn mask(&self, path: &Path, size: Option<(u32, u32)>) -> Result<Arc<GrayImage>> {
        let key = (path.to_path_buf(), size, true);
        if let Some(Entry::Gray(i)) = self.get(&key) {
            return Ok(i);
        }
        let mut m = load_mask(path, None)?;
        if let Some((w, h)) = size {
            m = resize_mask(&m, w, h);
        }
        let m = Arc::new(m);
        self.put(key, Entry::Gray(m.clone()));
        Ok(m)
    }
}

impl Dataset {
    /// Decodes sample `index` through `cache`, resized to `size` (width, height) when given.
    /// Without `size`, masks and extras must have the image's size.
    pub fn load_item(&self, index: usize, size: Option<(u32, u32)>, cache: &ImageCache) -> Result<Item> {
        let s = self
            .samples
            .get(index)
            .ok_or_else(|| derm_core::Error::invalid(format!("sample {index} of {} samples", self.samples.len())))?;
        let image = cache.rgb(&s.image, size)?;
        let dims = Some(size.unwrap_or(image.dimensions()));
        let check = |m: Arc<GrayImage>, p: &Path| -> Result<GrayImage> {
            if Some(m.dimensions()) != dims {
                let (w, h) = image.dimensions();
                return Err(derm_core::Error::Mask {
                    path: p.into(),
                    msg: format!("mask is {}x{} but its image is {w}x{h}", m.width(), m.height()),
                });
            }
            Ok((*m).clone())
        };
        let mask = match &s.mask {
            Some(p) => Some(check(cache.mask(p, dims)?, p)?),
            None => None,
        };
        let mut extra_images = BTreeMap::new();
        let mut extra_masks = BTreeMap::new();
        for (name, (kind, p)) in &s.extras {
            match kind {
                ExtraKind::Image => {
                    extra_images.insert(name.clone(), (*cache.rgb(p, dims)?).clone());
                }
                ExtraKind::Mask => {
                    extra_masks.insert(name.clone(), check(cache.mask(p, dims)?, p)?);
                }
            }
        }
        Ok(Item { id: s.id.clone(), image: (*image).clone(), mask, label: s.label, extra_images, extra_masks })
    }

    /// Decodes several samples in parallel (rayon), in the order of `indices`.
    pub fn load_items(&self, indices: &[usize], size: Option<(u32, u32)>, cache: &ImageCache) -> Result<Vec<Item>> {
        indices.par_iter().map(|&i| self.load_item(i, size, cache)).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::dataset::tests::isic2017_tree;
    use crate::Manifest;

    #[test]
    fn items_decode_resize_and_the_cache_stays_bounded() {
        let d = tempfile::tempdir().unwrap();
        isic2017_tree(d.path(), 6);
        let ds = Dataset::open(&Manifest::builtin("isic2017").unwrap(), d.path(), "train").unwrap();
        // Room for about two 8x8 RGB images plus their masks.
        let cache = ImageCache::new(2 * (8 * 8 * 3 + 8 * 8));
        let items = ds.load_items(&[0, 1, 2, 3, 4, 5], Some((8, 8)), &cache).unwrap();
        assert_eq!(items.len(), 6);
        assert_eq!(items[3].id, "ISIC_0000003");
        assert_eq!(items[0].image.dimensions(), (8, 8));
        assert_eq!(items[0].mask.as_ref().unwrap().dimensions(), (8, 8));
        assert!(cache.stats().2 <= 2 * (8 * 8 * 3 + 8 * 8));
        let big = ImageCache::new(1 << 20);
        ds.load_item(1, None, &big).unwrap();
        let again = ds.load_item(1, None, &big).unwrap();
        assert_eq!(again.image.dimensions(), (12, 9));
        assert_eq!(big.stats().0, 2, "{big:?}");
        assert!(ds.load_item(99, None, &big).is_err());
    }
}
