//! # derm-kernels: the CPU kernels and custom ops under derm's models
//!
//! candle 0.11 computes some gradients wrongly (pooling, strided and dilated convolution,
//! upsampling) and is slow on the CPU where derm's networks spend their time. This crate holds
//! derm's replacements, each a candle custom op whose forward and backward are checked against
//! finite differences, and every `unsafe` block of derm (the other crates forbid `unsafe`).
//! Facts about candle that motivate them: `docs/candle-notes.md`.
//!
//! - [`ops`]: differentiable ops with correct gradients (max/avg pooling, nearest and bilinear
//!   resizing, stable BCE, softmax, convolution at any shape); off the CPU, and under
//!   [`ops::with_device_path`], they are composed from candle ops that stay on the device.
//! - [`conv`]: GEMM convolution and transposed convolution (forward and both gradients), the
//!   convolution with its bias and ReLU as one op, and an AVX2 dot-product kernel for the stride-1
//!   weight gradient.
//! - [`fused`]: single-op kernels with one- or two-pass backwards: batch norm (+ReLU, +residual),
//!   convolution followed by batch norm, ReLU, per-channel bias, parity interleave; batch
//!   statistics kept on the device off the CPU ([`fused::BatchStats`]).
//! - [`profile`]: opt-in per-kernel timing (`DERM_PROFILE=1`).
//! - [`runtime`]: process settings for fast CPU training (heap reuse for large buffers).
//! - [`sys`]: the operating-system and dynamic-library calls that need `unsafe`.
//!
//! Benchmarks of the kernels alone: `cargo run -p derm-kernels --release --example conv_bench`
//! (also `conv_phases`, `fused_bw`); the whole-model rows are in `cargo xtask bench`.
//!
//! **Consumes:** candle tensors (f32 or f64; CPU storage for the hand-written kernels).
//! **Produces:** tensors and their gradients, equal to candle's where candle is right.

pub mod conv;
mod cpu;
pub mod fused;
pub mod ops;
pub mod profile;
pub mod runtime;
mod shifted_dots;
pub mod sys;
