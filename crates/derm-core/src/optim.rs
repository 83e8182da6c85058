//! Optimisers with checkpointable state: Adam, AdamW and SGD with momentum, learning-rate
//! schedules, and gradient-norm clipping.
//!
//! candle-nn has only plain SGD and AdamW with private moment buffers, so an interrupted run could
//! not resume where it stopped. Here the state (moments, momentum buffers, step count) is a named
//! set of tensors, saved beside the weights and restored on resume: 5 steps, save, load, 5 more
//! steps give the same weights as 10 steps straight.

use std::collections::HashMap;
use std::path::Path;

use std::cell::RefCell;

use candle_core::{
    backend::BackendStorage, backprop::GradStore, CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor, Var,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which update rule, with its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum OptimizerKind {
    /// Adam (Kingma and Ba), no weight decay.
    Adam {
        /// Learning rate.
        lr: f64,
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Denominator epsilon.
        eps: f64,
    },
    /// AdamW: Adam with decoupled weight decay.
    AdamW {
        /// Learning rate.
        lr: f64,
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Denominator epsilon.
        eps: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
    /// Stochastic gradient descent with (optionally Nesterov) momentum and L2 weight decay.
    Sgd {
        /// Learning rate.
        lr: f64,
        /// Momentum (0 for plain SGD).
        momentum: f64,
        /// L2 weight decay added to the gradient.
        weight_decay: f64,
        /// Nesterov momentum.
        nesterov: bool,
    },
}

impl OptimizerKind {
    /// Adam with the given learning rate and betas (0.9, 0.999), eps 1e-8.
    pub fn adam(lr: f64) -> Self {
        OptimizerKind::Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
    /// AdamW with the given learning rate and decoupled weight decay, betas (0.9, 0.999), eps 1e-8.
    pub fn adamw(lr: f64, weight_decay: f64) -> Self {
        OptimizerKind::AdamW { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay }
    }
    /// SGD with momentum, no weight decay.
    pub fn sgd(lr: f64, momentum: f64) -> Self {
        OptimizerKind::Sgd { lr, momentum, weight_decay: 0.0, nesterov: false }
    }
    /// Sets the learning rate, keeping the kind and its other settings.
    pub fn set_lr(&mut self, new: f64) {
        match self {
            OptimizerKind::Adam { lr, .. } | OptimizerKind::AdamW { lr, .. } | OptimizerKind::Sgd { lr, .. } => {
                *lr = new
            }
        }
    }

    /// Sets the weight decay of AdamW (decoupled) or SGD (L2); false for Adam, which has none.
    pub fn set_weight_decay(&mut self, new: f64) -> bool {
        match self {
            OptimizerKind::AdamW { weight_decay, .. } | OptimizerKind::Sgd { weight_decay, .. } => {
                *weight_decay = new;
                true
            }
            OptimizerKind::Adam { .. } => false,
        }
    }

    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        match *self {
            OptimizerKind::Adam { lr, .. } | OptimizerKind::AdamW { lr, .. } | OptimizerKind::Sgd { lr, .. } => lr,
        }
    }

    /// The optimiser's name as the command line spells it: `adam`, `adamw` or `sgd`.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerKind::Adam { .. } => "adam",
            OptimizerKind::AdamW { .. } => "adamw",
            OptimizerKind::Sgd { .. } => "sgd",
        }
    }

    /// One phrase for a run's log: the name and learning rate, then what differs from the plain
    /// rule: betas other than Adam's usual (0.9, 0.999), weight decay, SGD's momentum.
    /// `adam lr 1e-3`, `adam lr 2e-4 betas (0.5, 0.999)`, `sgd lr 1e-3 momentum 0.9`.
    pub fn describe(&self) -> String {
        let mut s = format!("{} lr {:e}", self.name(), self.lr());
        match *self {
            OptimizerKind::Adam { beta1, beta2, .. } | OptimizerKind::AdamW { beta1, beta2, .. } => {
                if (beta1, beta2) != (0.9, 0.999) {
                    s.push_str(&format!(" betas ({beta1}, {beta2})"));
                }
            }
            OptimizerKind::Sgd { momentum, nesterov, .. } => {
                if momentum > 0.0 {
                    let kind = if nesterov { " nesterov" } else { "" };
                    s.push_str(&format!("{kind} momentum {momentum}"));
                }
            }
        }
        match *self {
            OptimizerKind::AdamW { weight_decay, .. } | OptimizerKind::Sgd { weight_decay, .. }
                if weight_decay > 0.0 =>
            {
                s.push_str(&format!(" weight decay {weight_decay:e}"))
            }
            _ => {}
        }
        s
    }
}

/// How the learning rate changes with the step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum LrSchedule {
    /// The base rate throughout.
    #[default]
    Constant,
    /// Multiply by `gamma` every `every` steps.
    Step {
        /// Steps between decays.
        every: usize,
        /// Factor applied at each decay.
        gamma: f64,
    },
    /// Cosine from the base rate to `min_lr` over `total` steps, then `min_lr`.
    Cosine {
        /// Steps of the cosine.
        total: usize,
        /// Final rate.
        min_lr: f64,
    },
    /// Cosine from the base rate to `floor` times it over the whole run, however long the run
    /// turns out to be: its step limit, or under a time budget the number of steps the budget is
    /// measured to allow (the training loop's horizon, [`Optimizer::set_horizon`]). The base
    /// rate until the horizon is known.
    CosineRun {
        /// Final rate as a fraction of the base rate.
        floor: f64,
    },
}

impl LrSchedule {
    /// The rate at `step` (0-based) for base rate `base`, in a run expected to last `horizon`
    /// steps (used by [`LrSchedule::CosineRun`] only; `None` while it is not known).
    pub fn rate(&self, base: f64, step: usize, horizon: Option<usize>) -> f64 {
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::Step { every, gamma } => base * gamma.powi((step / every.max(1)) as i32),
            LrSchedule::Cosine { total, min_lr } => cosine(base, min_lr, step, total),
            LrSchedule::CosineRun { floor } => match horizon {
                Some(total) => cosine(base, base * floor, step, total),
                None => base,
            },
        }
    }

    /// A short name for logs: `constant`, `step 2000 x0.5`, `cosine 1000 to 1e-5`, `cosine over
    /// the run to 0.02x`.
    pub fn describe(&self) -> String {
        match *self {
            LrSchedule::Constant => "constant".into(),
            LrSchedule::Step { every, gamma } => format!("step {every} x{gamma}"),
            LrSchedule::Cosine { total, min_lr } => format!("cosine {total} to {min_lr:e}"),
            LrSchedule::CosineRun { floor } => format!("cosine over the run to {floor}x"),
        }
    }
}

/// Step decay: halve the rate every 2000 steps (the segmenter's default schedule; `--schedule
/// step`).
pub const STEP_DECAY: LrSchedule = LrSchedule::Step { every: 2000, gamma: 0.5 };
/// Cosine over the whole run down to 0.02 of the rate (`--schedule cosine`).
pub const COSINE_OVER_RUN: LrSchedule = LrSchedule::CosineRun { floor: 0.02 };

/// Cosine from `base` at step 0 to `min` at step `total`, then `min`.
fn cosine(base: f64, min: f64, step: usize, total: usize) -> f64 {
    if step >= total {
        min
    } else {
        let t = step as f64 / total.max(1) as f64;
        min + (base - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// The optimiser's whole configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Update rule and hyper-parameters.
    pub optimizer: OptimizerKind,
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
    /// Clip the global gradient norm to this value (none when absent).
    pub clip_grad_norm: Option<f64>,
}

impl OptimConfig {
    /// One phrase for a run's log: the optimiser ([`OptimizerKind::describe`]), then its
    /// schedule and clipping in brackets: `adam lr 3e-4 (step 2000 x0.5)`.
    pub fn describe(&self) -> String {
        let clip = match self.clip_grad_norm {
            Some(c) => format!(", gradient norm clipped at {c}"),
            None => String::new(),
        };
        format!("{} ({}{clip})", self.optimizer.describe(), self.schedule.describe())
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig { optimizer: OptimizerKind::adam(1e-4), schedule: LrSchedule::Constant, clip_grad_norm: None }
    }
}

/// An optimiser over named variables, with state that can be saved and restored.
pub struct Optimizer {
    cfg: OptimConfig,
    params: Vec<(String, Var)>,
    /// First moments (Adam) or momentum buffers (SGD), by parameter index.
    m: Vec<Option<Tensor>>,
    /// Second moments (Adam).
    v: Vec<Option<Tensor>>,
    step: usize,
    /// Steps the whole run is expected to take ([`LrSchedule::CosineRun`]).
    horizon: Option<usize>,
    /// Whether CPU f32 parameters take the fused in-place update (off only to test it against
    /// the tensor-op path).
    in_place: bool,
}

/// True for the batch-norm running statistics, which are state, not trained parameters.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var") || name.ends_with("num_batches_tracked")
}

impl Optimizer {
    /// An optimiser over the given named variables (sorted by name for a stable order).
    pub fn new(mut params: Vec<(String, Var)>, cfg: OptimConfig) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let n = params.len();
        Optimizer { cfg, params, m: vec![None; n], v: vec![None; n], step: 0, horizon: None, in_place: true }
    }

    /// An optimiser over every trainable variable of a VarMap (batch-norm buffers excluded), or
    /// only those whose name `keep` accepts.
    pub fn from_varmap(vm: &candle_nn::VarMap, cfg: OptimConfig, keep: impl Fn(&str) -> bool) -> Self {
        let params = match vm.data().lock() {
            Ok(d) => d.iter().filter(|(k, _)| !is_buffer(k) && keep(k)).map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => Vec::new(),
        };
        Optimizer::new(params, cfg)
    }

    /// The configuration.
    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// Names of the optimised variables.
    pub fn param_names(&self) -> Vec<&str> {
        self.params.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The learning rate the next step will use.
    pub fn lr(&self) -> f64 {
        self.cfg.schedule.rate(self.cfg.optimizer.lr(), self.step, self.horizon)
    }

    /// Tells the schedule how many steps the whole run is expected to take (the training loop
    /// does, through [`crate::train::Task::set_horizon`]).
    pub fn set_horizon(&mut self, steps: usize) {
        self.horizon = Some(steps);
    }

    /// Switches to another configuration (for example Adam, then SGD for fine-tuning), dropping the
    /// moment buffers but keeping the step count and the run's horizon.
    pub fn switch(&mut self, cfg: OptimConfig) {
        self.cfg = cfg;
        self.m = vec![None; self.params.len()];
        self.v = vec![None; self.params.len()];
    }

    /// Computes gradients of `loss` and takes one step. Returns the global gradient norm before
    /// clipping (see [`Optimizer::step`]).
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<Tensor> {
        let grads = {
            let _span = derm_kernels::profile::span("backward (whole)");
            loss.backward()?
        };
        self.step(&grads)
    }

    /// One step of sharpness-aware minimisation (SAM, Foret et al., ICLR 2021) with radius `rho`.
    /// The gradient `g` of `loss_at()` at the current weights points where the loss rises
    /// fastest; the optimised variables move by `rho * g / |g|` (one step of that length over
    /// all of them), the gradient of `loss_at()` is taken again there, the variables go back, and
    /// [`Optimizer::step`] updates them with the second gradient: the step descends the highest
    /// loss within `rho` of the weights, not the loss at one point. Twice a plain step's work.
    /// `state`: variables a forward pass changes outside the gradient (batch-norm running
    /// statistics); they are put back after the second pass, so they follow the first only.
    /// Returns the first pass's loss and the norm of the gradient the step used. With `rho` 0 it
    /// is [`Optimizer::backward_step`] of one pass. The move is tensor arithmetic on the
    /// variables' device.
    pub fn sharpness_aware_step(
        &mut self,
        rho: f64,
        state: &[Var],
        mut loss_at: impl FnMut() -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let loss = loss_at()?;
        if rho <= 0.0 {
            let norm = self.backward_step(&loss)?;
            return Ok((loss, norm));
        }
        let grads = {
            let _span = derm_kernels::profile::span("backward (whole)");
            loss.backward()?
        };
        let pairs: Vec<(&Var, Tensor)> =
            self.params.iter().filter_map(|(_, var)| grads.get(var.as_tensor()).map(|g| (var, g.detach()))).collect();
        let saved_state = state.iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<Vec<_>>>()?;
        // rho / (|g| + 1e-12), a scalar on the device.
        let norm = global_norm(pairs.iter().map(|(_, g)| g), loss.device())?;
        let scale = norm.affine(1.0, 1e-12)?.recip()?.affine(rho, 0.0)?;
        let mut saved = Vec::with_capacity(pairs.len());
        for (var, g) in &pairs {
            let p = var.as_tensor();
            let step = g.broadcast_mul(&scale.to_dtype(g.dtype())?)?;
            saved.push(p.copy()?);
            var.set(&(p + step)?)?;
        }
        let second = loss_at().and_then(|l| Ok(l.backward()?));
        for ((var, _), p) in pairs.iter().zip(&saved) {
            var.set(p)?;
        }
        for (var, s) in state.iter().zip(&saved_state) {
            var.set(s)?;
        }
        let norm = self.step(&second?)?;
        Ok((loss, norm))
    }

    /// Takes one step with the given gradients. Returns the global gradient norm before clipping,
    /// as a scalar tensor on the parameters' device: reading it is a host copy on a GPU, so the
    /// training loop reads it with the loss only every few steps ([`crate::train::StepLoss`]).
    ///
    /// On the host path (CPU tensors, see [`derm_kernels::ops::host_kernels`]) the norm is summed
    /// on the host; when it is not finite the update is skipped and the weights stay as they were.
    /// f32 parameters are then updated in place by one fused pass each (moments, bias
    /// correction, weight decay and clipping together). On the device path (CUDA, Metal, or
    /// forced) the norm, the clipping factor and the update are tensor ops that never leave the
    /// device; a non-finite norm is not seen until the loop reads it, which it does before any
    /// checkpoint is written, so the run stops with the last good checkpoint kept.
    pub fn step(&mut self, grads: &GradStore) -> Result<Tensor> {
        let _span = derm_kernels::profile::span("optimiser-step");
        let mut gs: Vec<Option<Tensor>> = Vec::with_capacity(self.params.len());
        for (_, var) in &self.params {
            gs.push(match grads.get(var.as_tensor()) {
                Some(g) => Some(g.detach().contiguous()?),
                None => None,
            });
        }
        let device = self.params.first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let host = self.params.first().is_none_or(|(_, v)| derm_kernels::ops::host_kernels(v.as_tensor()));
        let lr = self.lr();
        let t = (self.step + 1) as i32;
        let norm = if host {
            let mut sq = 0f64;
            for g in gs.iter().flatten() {
                sq += sum_of_squares(g)?;
            }
            let norm = sq.sqrt();
            if !norm.is_finite() {
                return Ok(Tensor::new(norm, &device)?);
            }
            let clip = match self.cfg.clip_grad_norm {
                Some(max) if norm > max => Some(max / (norm + 1e-6)),
                _ => None,
            };
            for (i, g) in gs.into_iter().enumerate() {
                let Some(g) = g else { continue };
                if self.in_place && in_place_ok(&self.params[i].1, &g) {
                    self.update_in_place(i, &g, clip.unwrap_or(1.0), lr, t)?;
                } else {
                    let c = clip.map(|c| Tensor::new(c, &device)).transpose()?;
                    self.update_with_ops(i, g, c.as_ref(), lr, t)?;
                }
            }
            Tensor::new(norm, &device)?
        } else {
            let norm = global_norm(gs.iter().flatten(), &device)?;
            // min(1, max / (norm + 1e-6)): the host path's factor wherever it clips, 1 elsewhere.
            let clip = match self.cfg.clip_grad_norm {
                Some(max) => Some((norm.affine(1.0, 1e-6)?.recip()? * max)?.minimum(1f32)?),
                None => None,
            };
            for (i, g) in gs.into_iter().enumerate() {
                let Some(g) = g else { continue };
                self.update_with_ops(i, g, clip.as_ref(), lr, t)?;
            }
            norm
        };
        self.step += 1;
        Ok(norm)
    }

    /// The fused CPU f32 update of parameter `i`.
    fn update_in_place(&mut self, i: usize, g: &Tensor, clip: f64, lr: f64, t: i32) -> Result<()> {
        let var = &self.params[i].1;
        let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
        let (gs, gl) = g.storage_and_layout();
        let gv = match &*gs {
            Storage::Cpu(CpuStorage::F32(v)) => match gl.contiguous_offsets() {
                Some((a, b)) => &v[a..b],
                None => return Err(Error::invalid("optimiser: non-contiguous gradient")),
            },
            _ => return Err(Error::invalid("optimiser: gradient is not CPU f32")),
        };
        let clip = clip as f32;
        const CHUNK: usize = 1 << 14;
        match self.cfg.optimizer {
            OptimizerKind::Adam { beta1, beta2, eps, .. } | OptimizerKind::AdamW { beta1, beta2, eps, .. } => {
                let wd = match self.cfg.optimizer {
                    OptimizerKind::AdamW { weight_decay, .. } => weight_decay,
                    _ => 0.0,
                };
                let m = match &self.m[i] {
                    Some(m) => m.clone(),
                    None => zeros()?,
                };
                let v = match &self.v[i] {
                    Some(v) => v.clone(),
                    None => zeros()?,
                };
                let (b1, b2, eps) = (beta1 as f32, beta2 as f32, eps as f32);
                let (bc1, bc2) = ((1.0 - beta1.powi(t)) as f32, (1.0 - beta2.powi(t)) as f32);
                let (lr32, decay) = (lr as f32, (1.0 - lr * wd) as f32);
                with_f32_mut(var.as_tensor(), &mut |p| {
                    with_f32_mut(&m, &mut |m| {
                        with_f32_mut(&v, &mut |v| {
                            p.par_chunks_mut(CHUNK)
                                .zip(m.par_chunks_mut(CHUNK))
                                .zip(v.par_chunks_mut(CHUNK))
                                .zip(gv.par_chunks(CHUNK))
                                .for_each(|(((p, m), v), g)| {
                                    for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                                        let g = g * clip;
                                        *m = *m * b1 + g * (1.0 - b1);
                                        *v = *v * b2 + g * g * (1.0 - b2);
                                        let upd = (*m / bc1) / ((*v / bc2).sqrt() + eps);
                                        let q = if wd > 0.0 { *p * decay } else { *p };
                                        *p = q - upd * lr32;
                                    }
                                });
                            Ok(())
                        })
                    })
                })?;
                self.m[i] = Some(m);
                self.v[i] = Some(v);
            }
            OptimizerKind::Sgd { momentum, weight_decay, nesterov, .. } => {
                let (mu, wd, lr32) = (momentum as f32, weight_decay as f32, lr as f32);
                let first = self.m[i].is_none();
                let buf = match &self.m[i] {
                    Some(b) => b.clone(),
                    None => zeros()?,
                };
                with_f32_mut(var.as_tensor(), &mut |p| {
                    with_f32_mut(&buf, &mut |b| {
                        p.par_chunks_mut(CHUNK).zip(b.par_chunks_mut(CHUNK)).zip(gv.par_chunks(CHUNK)).for_each(
                            |((p, b), g)| {
                                for ((p, b), &g) in p.iter_mut().zip(b).zip(g) {
                                    let mut g = g * clip;
                                    if wd > 0.0 {
                                        g += *p * wd;
                                    }
                                    let d = if mu > 0.0 {
                                        *b = if first { g } else { *b * mu + g };
                                        if nesterov {
                                            g + *b * mu
                                        } else {
                                            *b
                                        }
                                    } else {
                                        g
                                    };
                                    *p -= d * lr32;
                                }
                            },
                        );
                        Ok(())
                    })
                })?;
                if momentum > 0.0 {
                    self.m[i] = Some(buf);
                }
            }
        }
        Ok(())
    }

    /// The update of parameter `i` through tensor ops (any device and dtype).
    /// `clip` is a scalar factor tensor on the parameter's device.
    fn update_with_ops(&mut self, i: usize, mut g: Tensor, clip: Option<&Tensor>, lr: f64, t: i32) -> Result<()> {
        let var = &self.params[i].1;
        if let Some(c) = clip {
            g = g.broadcast_mul(&c.to_dtype(g.dtype())?)?;
        }
        let p = var.as_tensor().detach();
        let new_p = match self.cfg.optimizer {
            OptimizerKind::Adam { beta1, beta2, eps, .. } | OptimizerKind::AdamW { beta1, beta2, eps, .. } => {
                let wd = match self.cfg.optimizer {
                    OptimizerKind::AdamW { weight_decay, .. } => weight_decay,
                    _ => 0.0,
                };
                let m = match &self.m[i] {
                    Some(m) => ((m * beta1)? + (&g * (1.0 - beta1))?)?,
                    None => (&g * (1.0 - beta1))?,
                };
                let v = match &self.v[i] {
                    Some(v) => ((v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?,
                    None => (g.sqr()? * (1.0 - beta2))?,
                };
                let mhat = (&m / (1.0 - beta1.powi(t)))?;
                let vhat = (&v / (1.0 - beta2.powi(t)))?;
                let upd = (mhat / (vhat.sqrt()? + eps)?)?;
                self.m[i] = Some(m);
                self.v[i] = Some(v);
                let p = if wd > 0.0 { (&p * (1.0 - lr * wd))? } else { p };
                (p - (upd * lr)?)?
            }
            OptimizerKind::Sgd { momentum, weight_decay, nesterov, .. } => {
                if weight_decay > 0.0 {
                    g = (g + (&p * weight_decay)?)?;
                }
                let d = if momentum > 0.0 {
                    let buf = match &self.m[i] {
                        Some(b) => ((b * momentum)? + &g)?,
                        None => g.clone(),
                    };
                    let d = if nesterov { (&g + (&buf * momentum)?)? } else { buf.clone() };
                    self.m[i] = Some(buf);
                    d
                } else {
                    g
                };
                (p - (d * lr)?)?
            }
        };
        var.set(&new_p)?;
        Ok(())
    }

    /// The state as named tensors: `m.<param>`, `v.<param>`, and `step`.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, var)) in self.params.iter().enumerate() {
            if let Some(m) = &self.m[i] {
                out.insert(format!("m.{name}"), m.clone());
            }
            if let Some(v) = &self.v[i] {
                out.insert(format!("v.{name}"), v.clone());
            }
            let _ = var;
        }
        out.insert("step".into(), Tensor::new(&[self.step as f64], &candle_core::Device::Cpu)?);
        Ok(out)
    }

    /// Restores the state from named tensors made by [`Optimizer::state_tensors`].
    pub fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>, origin: &Path) -> Result<()> {
        let bad = |msg: String| Error::Checkpoint { path: origin.into(), msg };
        let step = t.get("step").ok_or_else(|| bad("optimiser state has no `step`".into()))?;
        self.step = step.flatten_all()?.to_vec1::<f64>()?.first().copied().unwrap_or(0.0) as usize;
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (slot, prefix) in [(&mut self.m[i], "m"), (&mut self.v[i], "v")] {
                *slot = match t.get(&format!("{prefix}.{name}")) {
                    Some(x) => {
                        if x.shape() != var.shape() {
                            return Err(bad(format!(
                                "optimiser state `{prefix}.{name}` has shape {:?}, the parameter {:?}",
                                x.dims(),
                                var.dims()
                            )));
                        }
                        Some(x.to_device(var.device())?.to_dtype(var.dtype())?.copy()?)
                    }
                    None => None,
                };
            }
        }
        Ok(())
    }

    /// Saves the state to a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::checkpoint::save_tensors(&self.state_tensors()?, path)
    }

    /// Loads the state from a safetensors file written by [`Optimizer::save`].
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let t = crate::checkpoint::load_tensors(path, &candle_core::Device::Cpu)?;
        self.load_state_tensors(&t, path)
    }
}

/// Whether a parameter and its gradient take the fused in-place update: CPU f32, contiguous.
fn in_place_ok(var: &Var, g: &Tensor) -> bool {
    let t = var.as_tensor();
    derm_kernels::ops::host_kernels(t)
        && t.dtype() == DType::F32
        && g.dtype() == DType::F32
        && g.device().is_cpu()
        && t.is_contiguous()
        && g.is_contiguous()
        && t.shape() == g.shape()
}

/// The global norm of gradients, `sqrt` of the sum of their squares, as an f32 scalar tensor on
/// `device` (0 for none): tensor ops, nothing read back to the host.
fn global_norm<'a>(gs: impl Iterator<Item = &'a Tensor>, device: &candle_core::Device) -> Result<Tensor> {
    let parts = gs.map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()).collect::<candle_core::Result<Vec<_>>>()?;
    Ok(match parts.is_empty() {
        true => Tensor::zeros((), DType::F32, device)?,
        false => Tensor::stack(&parts, 0)?.sum_all()?.sqrt()?,
    })
}

/// The sum of squares of a tensor's elements, in f64 (one parallel pass on CPU f32).
fn sum_of_squares(g: &Tensor) -> Result<f64> {
    if derm_kernels::ops::host_kernels(g) && g.dtype() == DType::F32 {
        let (st, l) = g.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) = (&*st, l.contiguous_offsets()) {
            // Partial sums collected in order and added in order: rayon's parallel `sum` groups
            // them as work stealing happens to, and the clipped step would differ run to run.
            let parts: Vec<f64> = v[a..b].par_chunks(1 << 14).map(derm_kernels::fused::sum_of_squares).collect();
            return Ok(parts.iter().sum());
        }
    }
    Ok(g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?)
}

/// Runs `f` on the data of a CPU f32 contiguous tensor, in place (the optimiser's moments and
/// the parameters are updated without new allocations).
type UpdateFn<'a> = &'a mut dyn FnMut(&mut [f32]) -> candle_core::Result<()>;

struct MutF32<'a>(RefCell<UpdateFn<'a>>);

impl InplaceOp1 for MutF32<'_> {
    fn name(&self) -> &'static str {
        "derm-optimiser-update"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        derm_kernels::ops::note_cpu_kernel();
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("optimiser: parameter must be contiguous".into()))?;
        match s {
            CpuStorage::F32(v) => (self.0.borrow_mut())(&mut v[a..b]),
            other => candle_core::bail!("optimiser: in-place update needs f32, got {:?}", other.dtype()),
        }
    }
}

/// Runs `f` on the f32 values of a contiguous CPU tensor, in place.
pub(crate) fn with_f32_mut(
    t: &Tensor,
    f: &mut dyn FnMut(&mut [f32]) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    t.inplace_op1(&MutF32(RefCell::new(f)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn descriptions_name_the_rule_its_rate_and_only_the_settings_off_the_usual() {
        assert_eq!(OptimizerKind::adam(1e-3).describe(), "adam lr 1e-3");
        let gan = OptimizerKind::Adam { lr: 2e-4, beta1: 0.5, beta2: 0.999, eps: 1e-8 };
        assert_eq!(gan.describe(), "adam lr 2e-4 betas (0.5, 0.999)");
        assert_eq!(OptimizerKind::adamw(1e-3, 0.05).describe(), "adamw lr 1e-3 weight decay 5e-2");
        assert_eq!(OptimizerKind::sgd(1e-2, 0.9).describe(), "sgd lr 1e-2 momentum 0.9");
        let nesterov = OptimizerKind::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-4, nesterov: true };
        assert_eq!(nesterov.describe(), "sgd lr 1e-1 nesterov momentum 0.9 weight decay 1e-4");
        assert_eq!(OptimizerKind::sgd(5e-5, 0.0).describe(), "sgd lr 5e-5");
        let cfg = OptimConfig { optimizer: OptimizerKind::adam(3e-4), schedule: STEP_DECAY, clip_grad_norm: None };
        assert_eq!(cfg.describe(), "adam lr 3e-4 (step 2000 x0.5)");
        let clipped = OptimConfig { clip_grad_norm: Some(1.0), schedule: COSINE_OVER_RUN, ..cfg };
        assert_eq!(clipped.describe(), "adam lr 3e-4 (cosine over the run to 0.02x, gradient norm clipped at 1)");
    }

    fn problem() -> (Var, Tensor, Tensor) {
        let mut rng = crate::Rng::new(1);
        let w = Var::from_vec(rng.normal_vec(6, 0.0, 1.0), (3, 2), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(rng.normal_vec(8 * 3, 0.0, 1.0), (8, 3), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(rng.normal_vec(8 * 2, 0.0, 1.0), (8, 2), &Device::Cpu).unwrap();
        (w, x, y)
    }

    fn loss(w: &Var, x: &Tensor, y: &Tensor) -> Tensor {
        (x.matmul(w.as_tensor()).unwrap() - y).unwrap().sqr().unwrap().mean_all().unwrap()
    }

    fn configs() -> Vec<OptimConfig> {
        vec![
            OptimConfig {
                optimizer: OptimizerKind::adam(0.05),
                schedule: LrSchedule::Step { every: 4, gamma: 0.8 },
                clip_grad_norm: Some(1.0),
            },
            OptimConfig {
                optimizer: OptimizerKind::AdamW { lr: 0.05, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 },
                schedule: LrSchedule::Cosine { total: 10, min_lr: 0.001 },
                clip_grad_norm: None,
            },
            OptimConfig {
                optimizer: OptimizerKind::Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-3, nesterov: true },
                ..Default::default()
            },
        ]
    }

    #[test]
    fn each_optimiser_lowers_the_loss() {
        for cfg in configs() {
            let (w, x, y) = problem();
            let l0 = loss(&w, &x, &y).to_scalar::<f32>().unwrap();
            let mut opt = Optimizer::new(vec![("w".into(), w.clone())], cfg);
            for _ in 0..30 {
                opt.backward_step(&loss(&w, &x, &y)).unwrap();
            }
            let l1 = loss(&w, &x, &y).to_scalar::<f32>().unwrap();
            assert!(l1 < 0.7 * l0, "{cfg:?}: {l0} -> {l1}");
        }
    }

    #[test]
    fn sharpness_aware_step_uses_the_gradient_at_the_ascended_point() {
        // Hand computation on a least-squares problem, plain SGD: g1 at w, w' = w + rho g1 / |g1|,
        // g2 at w', then w - lr g2; the weights never keep w', and `state` keeps the first pass's value.
        let (w, x, y) = problem();
        let w0 = w.as_tensor().copy().unwrap();
        let grad_at = |p: &Tensor| {
            let v = Var::from_tensor(p).unwrap();
            loss(&v, &x, &y).backward().unwrap().get(v.as_tensor()).unwrap().clone()
        };
        let (rho, lr) = (0.3, 0.1);
        let g1 = grad_at(&w0);
        let n1 = g1.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap() as f64;
        let g2 = grad_at(&(&w0 + (&g1 * (rho / n1)).unwrap()).unwrap());
        let expected: Vec<f32> = (&w0 - (&g2 * lr).unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let passes = Var::new(0f32, &Device::Cpu).unwrap();
        let cfg = OptimConfig { optimizer: OptimizerKind::sgd(lr, 0.0), ..Default::default() };
        let mut opt = Optimizer::new(vec![("w".into(), w.clone())], cfg);
        let (l, norm) = opt
            .sharpness_aware_step(rho, std::slice::from_ref(&passes), || {
                passes.set(&(passes.as_tensor() + 1.0)?)?;
                Ok(loss(&w, &x, &y))
            })
            .unwrap();
        let got: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in got.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-5, "{got:?} against {expected:?}");
        }
        let n2 = g2.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
        assert!((norm.to_scalar::<f64>().unwrap() as f32 - n2).abs() < 1e-4, "the norm is the second gradient's");
        let l0 = loss(&Var::from_tensor(&w0).unwrap(), &x, &y).to_scalar::<f32>().unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - l0).abs() < 1e-6, "the loss is the first pass's");
        assert_eq!(passes.as_tensor().to_scalar::<f32>().unwrap(), 1.0, "state follows the first pass only");
        assert_eq!(opt.steps(), 1);

        // Radius 0 is one plain pass and step.
        let (w, x, y) = problem();
        let mut plain = Optimizer::new(vec![("w".into(), w.clone())], cfg);
        let mut calls = 0;
        plain
            .sharpness_aware_step(0.0, &[], || {
                calls += 1;
                Ok(loss(&w, &x, &y))
            })
            .unwrap();
        let (v, ..) = problem();
        let mut reference = Optimizer::new(vec![("w".into(), v.clone())], cfg);
        reference.backward_step(&loss(&v, &x, &y)).unwrap();
        assert_eq!(calls, 1);
        assert_eq!(
            w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn adam_first_step_matches_hand_computation() {
        // With bias correction the first Adam step moves each weight by lr * sign(g) (up to eps).
        let w = Var::from_vec(vec![1f32, -2.0], 2, &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(
            vec![("w".into(), w.clone())],
            OptimConfig { optimizer: OptimizerKind::adam(0.1), ..Default::default() },
        );
        let l = (w.as_tensor() * Tensor::new(&[3f32, -0.5], &Device::Cpu).unwrap()).unwrap().sum_all().unwrap();
        opt.backward_step(&l).unwrap();
        let v: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        assert!((v[0] - 0.9).abs() < 1e-5 && (v[1] + 1.9).abs() < 1e-5, "{v:?}");
    }

    #[test]
    fn save_load_resume_equals_straight_run() {
        for cfg in configs() {
            let (w, x, y) = problem();
            let mut opt = Optimizer::new(vec![("w".into(), w.clone())], cfg);
            for _ in 0..10 {
                opt.backward_step(&loss(&w, &x, &y)).unwrap();
            }
            let straight: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();

            let d = tempfile::tempdir().unwrap();
            let (w2, x, y) = problem();
            let mut opt = Optimizer::new(vec![("w".into(), w2.clone())], cfg);
            for _ in 0..5 {
                opt.backward_step(&loss(&w2, &x, &y)).unwrap();
            }
            opt.save(&d.path().join("optim.safetensors")).unwrap();
            let saved = w2.as_tensor().copy().unwrap();
            // A fresh process: new variable with the saved weights, new optimiser loading the state.
            let w3 = Var::from_tensor(&saved).unwrap();
            let mut opt = Optimizer::new(vec![("w".into(), w3.clone())], cfg);
            opt.load(&d.path().join("optim.safetensors")).unwrap();
            assert_eq!(opt.steps(), 5);
            for _ in 0..5 {
                opt.backward_step(&loss(&w3, &x, &y)).unwrap();
            }
            let resumed: Vec<f32> = w3.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(straight, resumed, "{cfg:?}");
        }
    }

    #[test]
    fn in_place_update_equals_the_tensor_op_and_device_paths() {
        for cfg in configs() {
            let mut finals = Vec::new();
            let mut norms = Vec::new();
            // The fused host update, the host path through tensor ops, and the device path (norm,
            // clipping factor and update as tensors; forced on the CPU).
            for (in_place, device) in [(true, false), (false, false), (true, true)] {
                let (w, x, y) = problem();
                let mut opt = Optimizer::new(vec![("w".into(), w.clone())], cfg);
                opt.in_place = in_place;
                let mut run = || {
                    let reads = derm_kernels::ops::host_reads();
                    let mut last = None;
                    for _ in 0..7 {
                        last = Some(opt.backward_step(&loss(&w, &x, &y)).unwrap());
                    }
                    (derm_kernels::ops::host_reads() - reads, last.unwrap())
                };
                let (reads, norm) = if device { derm_kernels::ops::with_device_path(run) } else { run() };
                if device {
                    assert_eq!(reads, 0, "{cfg:?}: the device path read data back to the host");
                }
                norms.push(norm.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap());
                finals.push(w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            for f in &finals[1..] {
                for (a, b) in finals[0].iter().zip(f) {
                    assert!((a - b).abs() < 1e-5, "{cfg:?}: {a} vs {b}");
                }
            }
            for n in &norms[1..] {
                assert!((n - norms[0]).abs() <= 1e-5 * norms[0].max(1.0), "{cfg:?}: norms {norms:?}");
            }
        }
    }

    #[test]
    fn a_non_finite_gradient_leaves_the_weights_and_reports_its_norm() {
        let w = Var::from_vec(vec![1f32, -2.0], 2, &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(vec![("w".into(), w.clone())], OptimConfig::default());
        let l = (w.as_tensor() * Tensor::new(&[f32::NAN, 1.0], &Device::Cpu).unwrap()).unwrap().sum_all().unwrap();
        let norm = opt.backward_step(&l).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        assert!(norm.is_nan());
        assert_eq!(w.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, -2.0]);
        assert_eq!(opt.steps(), 0);
    }

    #[test]
    fn schedules() {
        assert_eq!(LrSchedule::Step { every: 2, gamma: 0.1 }.rate(1.0, 3, None), 0.1);
        let c = LrSchedule::Cosine { total: 10, min_lr: 0.0 };
        assert!(
            (c.rate(1.0, 5, None) - 0.5).abs() < 1e-12 && c.rate(1.0, 0, None) == 1.0 && c.rate(1.0, 11, None) == 0.0
        );
        // Over the run: the base rate until the horizon is known, then the cosine down to the floor.
        let r = LrSchedule::CosineRun { floor: 0.1 };
        assert_eq!((r.rate(2.0, 50, None), r.rate(2.0, 0, Some(100)), r.rate(2.0, 100, Some(100))), (2.0, 2.0, 0.2));
        assert!((r.rate(2.0, 50, Some(100)) - 1.1).abs() < 1e-12);
        let s: OptimConfig = serde_json::from_str(
            r#"{"optimizer":{"kind":"sgd","lr":0.001,"momentum":0.9,"weight_decay":0,"nesterov":false}}"#,
        )
        .unwrap();
        assert_eq!(s.optimizer.lr(), 0.001);
    }
}
