//! # derm-core: what every derm stage shares
//!
//! derm-core is the tensor core of derm, a system that turns dermoscopic images into clean images,
//! lesion masks, diagnoses and saliency maps (after Bisla et al., "Skin Lesion Segmentation and
//! Classification with Deep Learning System"). Every stage crate depends on it and on nothing else
//! of derm's but `derm-data`.
//!
//! - [`device`]: `cpu`, `cuda[:N]`, `metal` parsed into a candle device (no silent fall-back).
//! - [`image_io`]: images of any common format and depth to RGB8, masks to binary, resizing,
//!   crops, and NCHW f32 tensors with per-channel normalisation.
//! - [`ops`]: differentiable ops whose gradients are correct where candle 0.11's are wrong or
//!   missing (pooling, resizing, stable BCE, softmax, conv2d at any shape), each checked against
//!   finite differences.
//! - [`conv`]: GEMM convolution and transposed convolution (forward and both gradients), the
//!   convolution with its bias and ReLU as one op, and an AVX2 dot-product kernel for the stride-1
//!   weight gradient.
//! - [`fused`]: single-op CPU kernels with one- or two-pass backwards: batch norm (+ReLU,
//!   +residual), convolution followed by batch norm, ReLU, per-channel bias, parity interleave.
//! - [`optim`]: Adam, AdamW and SGD with momentum, learning-rate schedules, gradient clipping,
//!   and optimiser state that is saved with the checkpoint.
//! - [`checkpoint`]: `model.safetensors` + `config.json` + `meta.json` (+ optimiser and training
//!   state), written atomically; loading names the first mismatching tensor.
//! - [`metrics`]: Jaccard (per-image, global, ISIC 2018 thresholded), Dice, pixel scores, ROC AUC
//!   with average ranks, specificity at fixed sensitivities (ISIC 2017), confusion matrix,
//!   balanced accuracy (ISIC 2018).
//! - [`train`]: one training loop with evaluation, best-model keeping, periodic checkpoints,
//!   resume, a time budget, and a stop on a non-finite loss.
//! - [`rng`]: the one seeded generator.
//! - [`mutate`]: seeded byte mutations for the loaders' property tests and fuzz targets.
//! - [`profile`]: opt-in per-kernel timing (`DERM_PROFILE=1`).
//! - [`runtime`]: process settings for fast CPU training (heap reuse for large buffers).
//!
//! **Consumes:** image files, safetensors files, JSON configs. **Produces:** tensors, checkpoints,
//! metric values.

pub mod binary;
pub mod checkpoint;
pub mod conv;
mod cpu;
pub mod device;
pub mod error;
pub mod fsutil;
pub mod fused;
pub mod image_io;
pub mod metrics;
pub mod mutate;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod profile;
pub mod report;
pub mod rng;
pub mod runtime;
mod shifted_dots;
pub mod train;

pub use candle_core::{DType, Device, Module, ModuleT, Tensor, Var, D};
pub use candle_nn::{VarBuilder, VarMap};
pub use device::{parse_device, DeviceSpec};
pub use error::{Error, Result};
pub use rng::Rng;
