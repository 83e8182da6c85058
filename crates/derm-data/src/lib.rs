//! # derm-data: data sets, phantoms, augmentation and batching for derm
//!
//! derm turns dermoscopic skin-lesion images into clean images, lesion masks, diagnoses and
//! saliency maps (after Bisla et al., "Skin Lesion Segmentation and Classification with Deep
//! Learning System"). This crate is how every stage gets its data.
//!
//! - [`manifest`]: one TOML per public data set (ISIC 2016 tasks 1 and 3, ISIC 2017, ISIC 2018
//!   tasks 1 and 3, ISIC 2019, ISIC 2020, PH2, Dermofit, phantoms), embedded in the crate,
//!   describing the official download layout; users write their own in the same format
//!   (`data-manifests/README.md`).
//! - [`dataset`]: a split as a list of [`Sample`]s (image, mask, extra files, label, lesion or
//!   patient group), with deterministic hash splitting that keeps each group on one side.
//! - [`check`]: validates a folder against its manifest (counts per class and split, missing
//!   masks, unlabelled images, orphan labels, corrupt or truncated files, wrong-size masks,
//!   duplicate ids, missing columns), naming the files; [`check::screen`] decodes a split once
//!   before training and refuses it, or with `--skip-bad` leaves out and lists, unusable samples.
//! - [`handoff`]: the file names through which the stages hand images and masks to each other
//!   (`<id>_occlusion.png`, `_clean`, `_segmentation`, `_purified`), and the lesion-mask look-up.
//! - [`cache`]: lazy, parallel decoding through a byte-bounded LRU cache of resized images.
//! - [`phantom`]: procedural dermoscopy with exact ground truth (clean image, lesion mask,
//!   occlusion mask, class), the default data of every stage.
//! - [`augment`]: flips, quarter turns, random crops with rescaling and colour jitter, applied
//!   alike to an image and its masks and paired images.
//! - [`sampler`]: seeded, epoch-based shuffle and class-balanced samplers.
//! - [`loader`]: mini-batches assembled into tensors in a background thread.
//! - [`table`]: label and group tables (CSV with any delimiter, or `||` tables), read with
//!   named columns and clear errors for missing ones.
//!
//! **Consumes:** data-set folders in their official layout (JPEG, PNG, BMP, TIFF images; binary
//! masks; CSV or `||` label tables), or nothing at all (phantoms). **Produces:** [`Dataset`]s of
//! file paths, decoded RGB8 images and 0/255 masks, phantom folders (PNG + `labels.csv` +
//! `manifest.toml`), check reports (text or JSON), and batches: images (N, 3, H, W) f32
//! normalised, masks (N, 1, H, W) f32 in {0, 1}, labels (N,) u32.

#![forbid(unsafe_code)]

pub mod augment;
pub mod cache;
pub mod check;
pub mod dataset;
pub mod handoff;
pub mod loader;
pub mod manifest;
pub mod phantom;
pub mod sampler;
pub mod table;

pub use augment::{augment_item, AugmentConfig};
pub use cache::{ImageCache, Item};
pub use check::{check, screen, BadSample, CheckOptions, CheckReport};
pub use dataset::{Dataset, Sample};
pub use loader::{collate, Batch, BatchLoader, LoaderConfig};
pub use manifest::Manifest;
pub use phantom::{draw_phantom, draw_phantoms, write_phantom_set, Phantom, PhantomConfig, PHANTOM_CLASSES};
pub use sampler::{BalancedSampler, Sampler, ShuffleSampler};
