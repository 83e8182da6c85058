//! # derm-core: what every derm stage shares
//!
//! derm-core is the tensor core of derm, a system that turns dermoscopic images into clean images,
//! lesion masks, diagnoses and saliency maps (after Bisla et al., "Skin Lesion Segmentation and
//! Classification with Deep Learning System"). Every stage crate depends on it, on
//! `derm-data`, and where it needs them on `derm-kernels` (the CPU kernels and custom ops, every
//! `unsafe` block) and `derm-visual` (figures and HTML reports); a stage never depends on another.
//!
//! - [`device`]: `cpu`, `cuda[:N]`, `metal` parsed into a candle device (no silent fall-back).
//! - [`image_io`]: images of any common format and depth to RGB8, masks to binary, resizing,
//!   crops, and NCHW f32 tensors with per-channel normalisation.
//! - [`optim`]: Adam, AdamW and SGD with momentum, learning-rate schedules, gradient clipping,
//!   and optimiser state that is saved with the checkpoint.
//! - [`checkpoint`]: `model.safetensors` + `config.json` + `meta.json` (+ optimiser and training
//!   state), written atomically; loading names the first mismatching tensor.
//! - [`metrics`]: Jaccard (per-image, global, ISIC 2018 thresholded), Dice, pixel scores, ROC AUC
//!   with average ranks, specificity at fixed sensitivities (ISIC 2017), confusion matrix,
//!   balanced accuracy (ISIC 2018).
//! - [`ema`]: an exponential moving average of the weights, evaluated and saved as the model.
//! - [`train`]: one training loop with evaluation, best-model keeping, periodic checkpoints,
//!   resume, a time budget, and a stop on a non-finite loss.
//! - [`rng`]: the one seeded generator.
//! - [`nn`]: layers built on derm-kernels' ops (convolution, batch norm) with candle's
//!   `VarBuilder` names, seeded initialisation.
//! - [`fsutil`]: atomic writes (temp file, then rename), output-folder locks, stale temp removal.
//! - [`binary`]: binary mask post-processing (hole filling, connected components).
//! - [`symmetry`]: the eight symmetries of the square on images and tensors, and the ones an
//!   augmentation trains a model to ignore (test-time views).
//! - [`error`]: the [`Error`] every derm library returns.
//! - [`mutate`]: seeded byte mutations for the loaders' property tests and fuzz targets.
//!
//! **Consumes:** image files, safetensors files, JSON configs. **Produces:** tensors, checkpoints,
//! metric values.

#![forbid(unsafe_code)]

pub mod binary;
pub mod checkpoint;
pub mod device;
pub mod ema;
pub mod error;
pub mod fsutil;
pub mod image_io;
pub mod metrics;
pub mod mutate;
pub mod nn;
pub mod optim;
pub mod rng;
pub mod symmetry;
pub mod train;

pub use candle_core::{DType, Device, Module, ModuleT, Tensor, Var, D};
pub use candle_nn::{VarBuilder, VarMap};
pub use device::{parse_device, DeviceSpec};
pub use error::{Error, Result};
pub use rng::Rng;
