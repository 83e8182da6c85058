//! A batch loader that decodes, augments and stacks mini-batches in a background thread while
//! the caller trains on the previous ones.

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use derm_core::image_io::{images_to_tensor, masks_to_tensor, Normalize};
use derm_core::{Device, Error, Result, Rng, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::augment::{augment_item, AugmentConfig};
use crate::cache::{ImageCache, Item};
use crate::dataset::Dataset;
use crate::sampler::Sampler;

/// How batches are made.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Working size (width, height): images are resized to it on decoding (and cached so).
    pub size: (u32, u32),
    /// Per-channel normalisation of the image tensors.
    pub normalize: Normalize,
    /// Augmentation, if any.
    pub augment: Option<AugmentConfig>,
    /// Batches made ahead of the consumer.
    pub prefetch: usize,
    /// Drop a last batch smaller than `batch_size`.
    pub drop_last: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 16,
            size: (256, 256),
            normalize: Normalize::HALF,
            augment: None,
            prefetch: 2,
            drop_last: false,
        }
    }
}

/// One mini-batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Sample ids, in batch order.
    pub ids: Vec<String>,
    /// Images, (N, 3, H, W) f32, normalised.
    pub images: Tensor,
    /// Lesion masks, (N, 1, H, W) f32 of 0 and 1, when every sample has one.
    pub masks: Option<Tensor>,
    /// Labels, (N,) u32, when every sample has one.
    pub labels: Option<Tensor>,
    /// Extra colour images by name, (N, 3, H, W), normalised like `images`.
    pub extra_images: BTreeMap<String, Tensor>,
    /// Extra masks by name, (N, 1, H, W).
    pub extra_masks: BTreeMap<String, Tensor>,
}

/// Stacks decoded items into a batch.
pub fn collate(items: &[Item], norm: Normalize, device: &Device) -> Result<Batch> {
    let imgs: Vec<_> = items.iter().map(|i| &i.image).collect();
    let images = images_to_tensor(&imgs, norm, device)?;
    let masks = match items.iter().filter(|i| i.mask.is_some()).count() {
        0 => None,
        n if n == items.len() => {
            let m: Vec<_> = items.iter().filter_map(|i| i.mask.as_ref()).collect();
            Some(masks_to_tensor(&m, device)?)
        }
        _ => {
            let id = items.iter().find(|i| i.mask.is_none()).map(|i| i.id.as_str()).unwrap_or("?");
            return Err(Error::invalid(format!("batch mixes samples with and without masks: {id} has none")));
        }
    };
    let labels = items
        .iter()
        .map(|i| i.label.map(|l| l as u32))
        .collect::<Option<Vec<u32>>>()
        .map(|l| Tensor::new(l, device))
        .transpose()?;
    let mut extra_images = BTreeMap::new();
    let mut extra_masks = BTreeMap::new();
    if let Some(first) = items.first() {
        for name in first.extra_images.keys() {
            let v = items
                .iter()
                .map(|i| i.extra_images.get(name).ok_or_else(|| missing(&i.id, name)))
                .collect::<Result<Vec<_>>>()?;
            extra_images.insert(name.clone(), images_to_tensor(&v, norm, device)?);
        }
        for name in first.extra_masks.keys() {
            let v = items
                .iter()
                .map(|i| i.extra_masks.get(name).ok_or_else(|| missing(&i.id, name)))
                .collect::<Result<Vec<_>>>()?;
            extra_masks.insert(name.clone(), masks_to_tensor(&v, device)?);
        }
    }
    Ok(Batch { ids: items.iter().map(|i| i.id.clone()).collect(), images, masks, labels, extra_images, extra_masks })
}

fn missing(id: &str, name: &str) -> Error {
    Error::invalid(format!("sample {id} lacks extra {name:?} that others in its batch have"))
}

/// Yields batches made by a background thread. Dropping it stops the thread after the batch in
/// progress.
pub struct BatchLoader {
    rx: Receiver<Result<Batch>>,
    batches: usize,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for BatchLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BatchLoader({} batches)", self.batches)
    }
}

impl BatchLoader {
    /// Starts loading `indices` of `dataset` in order, `cfg.batch_size` at a time. The
    /// augmentation of the sample at position `p` of `indices` draws from
    /// `Rng::new(seed).fork(p)`, so batches do not depend on thread timing.
    pub fn new(
        dataset: Arc<Dataset>,
        cache: Arc<ImageCache>,
        indices: Vec<usize>,
        cfg: LoaderConfig,
        seed: u64,
        device: Device,
    ) -> BatchLoader {
        let bs = cfg.batch_size.max(1);
        let mut batches = indices.len() / bs;
        if !cfg.drop_last && !indices.len().is_multiple_of(bs) {
            batches += 1;
        }
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let worker = std::thread::spawn(move || {
            let root = Rng::new(seed);
            for (b, chunk) in indices.chunks(bs).take(batches).enumerate() {
                let made = dataset.load_items(chunk, Some(cfg.size), &cache).and_then(|mut items| {
                    if let Some(aug) = &cfg.augment {
                        items.par_iter_mut().enumerate().for_each(|(j, it)| {
                            augment_item(aug, it, Some(cfg.size), &mut root.fork((b * bs + j) as u64));
                        });
                    }
                    collate(&items, cfg.normalize, &device)
                });
                let failed = made.is_err();
                if tx.send(made).is_err() || failed {
                    break;
                }
            }
        });
        BatchLoader { rx, batches, worker: Some(worker) }
    }

    /// Loads epoch `epoch` in the order `sampler` gives; augmentation draws from a stream of
    /// `seed` forked by the epoch.
    pub fn epoch(
        dataset: Arc<Dataset>,
        cache: Arc<ImageCache>,
        sampler: &dyn Sampler,
        epoch: u64,
        cfg: LoaderConfig,
        seed: u64,
        device: Device,
    ) -> BatchLoader {
        let epoch_seed = Rng::new(seed).fork(epoch).next_u64();
        BatchLoader::new(dataset, cache, sampler.epoch_indices(epoch), cfg, epoch_seed, device)
    }

    /// Number of batches this loader yields (fewer if one fails).
    pub fn len(&self) -> usize {
        self.batches
    }

    /// True when it yields no batch.
    pub fn is_empty(&self) -> bool {
        self.batches == 0
    }
}

impl Iterator for BatchLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        match self.rx.recv() {
            Ok(b) => Some(b),
            Err(_) => {
                if let Some(w) = self.worker.take() {
                    if w.join().is_err() {
                        return Some(Err(Error::invalid("batch loader thread panicked")));
                    }
                }
                None
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::dataset::tests::isic2017_tree;
    use crate::sampler::ShuffleSampler;
    use crate::Manifest;

    fn setup() -> (tempfile::TempDir, Arc<Dataset>) {
        let d = tempfile::tempdir().unwrap();
        isic2017_tree(d.path(), 7);
        let ds = Dataset::open(&Manifest::builtin("isic2017").unwrap(), d.path(), "train").unwrap();
        (d, Arc::new(ds))
    }

    #[test]
    fn batches_have_the_right_shapes_and_labels() {
        let (_d, ds) = setup();
        let cache = Arc::new(ImageCache::new(1 << 20));
        let cfg = LoaderConfig { batch_size: 3, size: (10, 8), ..Default::default() };
        let loader = BatchLoader::new(ds.clone(), cache, (0..7).collect(), cfg, 0, Device::Cpu);
        assert_eq!(loader.len(), 3);
        let batches: Vec<Batch> = loader.collect::<Result<_>>().unwrap();
        assert_eq!(batches.len(), 3);
        assert_eq!(batches[0].images.dims(), &[3, 3, 8, 10]);
        assert_eq!(batches[0].masks.as_ref().unwrap().dims(), &[3, 1, 8, 10]);
        assert_eq!(batches[2].images.dims()[0], 1);
        let l: Vec<u32> = batches[0].labels.as_ref().unwrap().to_vec1().unwrap();
        assert_eq!(l, [0, 1, 2]);
        assert_eq!(batches[1].ids, ["ISIC_0000003", "ISIC_0000004", "ISIC_0000005"]);
    }

    #[test]
    fn augmented_epochs_are_reproducible_and_drop_last_works() {
        let (_d, ds) = setup();
        let cache = Arc::new(ImageCache::new(1 << 20));
        let cfg = LoaderConfig {
            batch_size: 2,
            size: (8, 8),
            augment: Some(AugmentConfig::default()),
            drop_last: true,
            ..Default::default()
        };
        let s = ShuffleSampler::new(ds.len(), 3);
        let run = |epoch| -> Vec<Vec<f32>> {
            BatchLoader::epoch(ds.clone(), cache.clone(), &s, epoch, cfg, 11, Device::Cpu)
                .map(|b| b.unwrap().images.flatten_all().unwrap().to_vec1().unwrap())
                .collect()
        };
        let a = run(0);
        assert_eq!(a.len(), 3);
        assert_eq!(a, run(0));
        assert_ne!(a, run(1));
    }

    #[test]
    fn a_broken_file_ends_the_epoch_with_an_error() {
        let (d, ds) = setup();
        std::fs::write(d.path().join("ISIC-2017_Training_Data/ISIC_0000004.jpg"), b"junk").unwrap();
        let cfg = LoaderConfig { batch_size: 2, size: (8, 8), ..Default::default() };
        let out: Vec<Result<Batch>> =
            BatchLoader::new(ds, Arc::new(ImageCache::new(0)), (0..7).collect(), cfg, 0, Device::Cpu).collect();
        assert_eq!(out.len(), 3);
        let e = out[2].as_ref().unwrap_err().to_string();
        assert!(e.contains("ISIC_0000004.jpg"), "{e}");
    }
}
