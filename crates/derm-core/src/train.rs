//! The one training loop every stage uses.
//!
//! A stage implements [`Task`] (one optimiser step on one batch, an evaluation, a checkpoint
//! write) and [`fit`] drives it: epochs and batches, evaluation every N steps or each epoch,
//! keeping the best model (`<out>/best`; or the final one, [`Keep::Last`]), a checkpoint every N
//! steps and at the end (`<out>/last`, with optimiser and training state), resuming from
//! `<out>/last`, a time budget, and a stop with [`Error::NonFiniteLoss`] on a NaN or infinite
//! loss, in which case nothing is written after the last good checkpoint. The output folder is
//! locked while the loop runs ([`crate::fsutil::DirLock`]): a second run into it is refused.
//!
//! A step returns its loss and gradient norm as tensors ([`StepLoss`]); the loop reads them after
//! every step on the CPU and, on a GPU, every [`LoopConfig::read_every`] steps in one copy and
//! before every evaluation and checkpoint, so that a step never waits for the host and a
//! non-finite value is still seen before anything is written.
//!
//! Batch order is a function of (seed, epoch), and each step draws from a generator derived from
//! (seed, step), so a resumed run continues exactly as an uninterrupted one would.
//!
//! [`run`] is the entry every stage's `train` goes through: it checks that `<out>/last` was
//! written by a compatible model ([`Task::check_resumable`]), restores it when resuming, and fits.
//! The validation metric has a [`Direction`] (Jaccard and PSNR higher, a GAN's sample-quality
//! proxy lower); a task may add loss components to the history ([`Task::history_parts`]), stop
//! early ([`Task::stop_reason`]), write figures during training ([`Task::after_step`]) and at the
//! end ([`Task::finish`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, Rng};

/// Loop settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoopConfig {
    /// Passes over the training data.
    pub epochs: usize,
    /// Stop after this many optimiser steps in all (none: no limit).
    pub max_steps: Option<usize>,
    /// Stop after this many minutes of training in all, resumed runs included (none: no limit).
    pub minutes: Option<f64>,
    /// Evaluate every this many steps (none: at the end of each epoch).
    pub eval_every: Option<usize>,
    /// Write `<out>/last` every this many steps (none: at the end of each epoch).
    pub checkpoint_every: Option<usize>,
    /// Seed of the run's random draws.
    pub seed: u64,
    /// On a GPU, read the steps' losses and gradient norms back to the host every this many steps
    /// (one copy for all of them; always before an evaluation or a checkpoint). On the CPU they
    /// are read after every step, which costs nothing.
    pub read_every: usize,
    /// Which weights `<out>/best`, the model a run folder resolves to, holds.
    pub keep: Keep,
}

/// Which weights a run keeps as its model (`<out>/best`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// The checkpoint with the best validation metric, written at each evaluation that improves
    /// on it.
    #[default]
    Best,
    /// The final weights, written (and validated) when the loop ends; until then a run folder
    /// resolves to `<out>/last`. The maximum of many noisy evaluations on a small validation part
    /// is often a chance peak; the final weights of a smooth run (a moving average of the
    /// weights) generalise as well or better.
    Last,
}

impl std::str::FromStr for Keep {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "best" => Ok(Keep::Best),
            "last" => Ok(Keep::Last),
            _ => Err(format!("unknown model to keep {s:?} (best or last)")),
        }
    }
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            epochs: 10,
            max_steps: None,
            minutes: None,
            eval_every: None,
            checkpoint_every: None,
            seed: 0,
            read_every: 20,
            keep: Keep::Best,
        }
    }
}

/// What one training step reports: its loss and the global gradient norm, as scalar tensors
/// left where they were computed. A host read of either is a synchronising copy on a GPU, so
/// [`fit`] reads them in batches ([`LoopConfig::read_every`]); a non-finite one stops the run
/// with [`Error::NonFiniteLoss`] before anything else is written.
#[derive(Debug, Clone)]
pub struct StepLoss {
    /// The loss (a scalar of any float dtype).
    pub loss: Tensor,
    /// The gradient norm before clipping ([`crate::optim::Optimizer::step`]), when a step was
    /// taken.
    pub grad_norm: Option<Tensor>,
}

impl StepLoss {
    /// A step's loss and gradient norm.
    pub fn new(loss: Tensor, grad_norm: Tensor) -> Self {
        StepLoss { loss, grad_norm: Some(grad_norm) }
    }
}

/// Steps run but not yet read back, and the read.
#[derive(Default)]
struct Pending {
    /// (step, epoch, loss and gradient norm as f32 scalars).
    steps: Vec<(usize, usize, Tensor, Option<Tensor>)>,
}

impl Pending {
    fn push(&mut self, step: usize, epoch: usize, s: StepLoss) -> Result<()> {
        let norm = s.grad_norm.map(|n| n.to_dtype(DType::F32)).transpose()?;
        self.steps.push((step, epoch, s.loss.to_dtype(DType::F32)?, norm));
        Ok(())
    }

    /// Reads every pending loss and norm in one copy; fails on the first non-finite one, else
    /// returns (step, epoch, loss) per step.
    fn read(&mut self) -> Result<Vec<(usize, usize, f64)>> {
        if self.steps.is_empty() {
            return Ok(Vec::new());
        }
        let mut all = Vec::with_capacity(2 * self.steps.len());
        for (_, _, l, n) in &self.steps {
            all.push(l.flatten_all()?);
            if let Some(n) = n {
                all.push(n.flatten_all()?);
            }
        }
        let values = Tensor::cat(&all, 0)?.to_vec1::<f32>()?;
        let mut at = values.iter();
        let mut out = Vec::with_capacity(self.steps.len());
        for (step, epoch, _, n) in self.steps.drain(..) {
            let loss = at.next().copied().unwrap_or(f32::NAN) as f64;
            let norm = if n.is_some() { at.next().copied().unwrap_or(f32::NAN) as f64 } else { 0.0 };
            for (quantity, value) in [("loss", loss), ("gradient norm", norm)] {
                if !value.is_finite() {
                    return Err(Error::NonFiniteLoss { quantity, value, epoch, step });
                }
            }
            out.push((step + 1, epoch, loss));
        }
        Ok(out)
    }
}

/// One row of the training history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    /// Global step after which this was recorded.
    pub step: usize,
    /// Epoch (0-based).
    pub epoch: usize,
    /// Mean training loss since the previous row.
    pub loss: f64,
    /// Validation metric, when evaluated here.
    pub metric: Option<f64>,
    /// Seconds of training so far.
    pub elapsed_s: f64,
    /// The task's own loss components since the previous row (a GAN's discriminator and
    /// generator losses), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parts: BTreeMap<String, f64>,
}

/// Whether a larger or a smaller validation metric is better.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Larger is better (Jaccard, PSNR, AUC).
    #[default]
    Higher,
    /// Smaller is better (a distance, a loss).
    Lower,
}

impl Direction {
    /// Whether `new` improves on `best`.
    pub fn improves(self, new: f64, best: f64) -> bool {
        match self {
            Direction::Higher => new > best,
            Direction::Lower => new < best,
        }
    }
}

/// What a resumed run needs to continue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Batches of the current epoch already done.
    pub batch_in_epoch: usize,
    /// Optimiser steps done.
    pub step: usize,
    /// Best validation metric so far (in the task's [`Direction`]).
    pub best_metric: Option<f64>,
    /// Step of the best metric.
    pub best_step: Option<usize>,
    /// Evaluations since the metric last improved.
    #[serde(default)]
    pub evals_since_best: usize,
    /// Seconds of training so far.
    pub elapsed_s: f64,
    /// History rows.
    pub history: Vec<HistoryPoint>,
    /// True once the loop ended normally.
    pub finished: bool,
    /// Why it stopped (`epochs`, `max_steps`, `time_budget`, or the task's own reason).
    pub stop_reason: Option<String>,
    /// The task's own resumable counters (for example a GAN's early-stopping streak).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub task: serde_json::Value,
    /// Steps the whole run is expected to take, for schedules that span it ([`Task::set_horizon`]):
    /// under a time budget measured once, after a tenth of the budget, and kept when resuming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub horizon: Option<usize>,
}

/// What [`fit`] needs from a stage.
pub trait Task {
    /// Batches per epoch.
    fn batches_per_epoch(&self) -> usize;
    /// One optimiser step on batch `batch` of epoch `epoch`; returns its loss and gradient norm
    /// as tensors (not read: see [`StepLoss`]). `rng` is derived from (seed, step) for
    /// augmentation and sampling.
    fn train_batch(&mut self, epoch: usize, batch: usize, rng: &mut Rng) -> Result<StepLoss>;
    /// Validation metric (better in [`Task::metric_direction`]), or `None` when there is no
    /// validation data.
    fn evaluate(&mut self) -> Result<Option<f64>>;
    /// Writes a checkpoint folder (weights, config, meta, optimiser state, `state`).
    fn save(&self, dir: &Path, state: &TrainState) -> Result<()>;
    /// Loads the weights and optimiser state of a checkpoint written by [`Task::save`], to
    /// continue from it.
    fn restore(&mut self, dir: &Path, state: &TrainState) -> Result<()>;
    /// Fails, naming what differs, when the checkpoint in `dir` was written by a model this task
    /// cannot continue (another architecture, input size or class list); see [`check_saved`].
    fn check_resumable(&self, dir: &Path) -> Result<()>;
    /// Which way the metric improves.
    fn metric_direction(&self) -> Direction {
        Direction::Higher
    }
    /// Loss components since the previous call, recorded with each history row.
    fn history_parts(&mut self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
    /// After each evaluation: a reason to stop now (recorded as the stop reason), if any. May
    /// keep counters in `state.task` so that they survive a resume.
    fn stop_reason(&mut self, _state: &mut TrainState) -> Option<String> {
        None
    }
    /// After each step (for example to write a sample grid into `out`).
    fn after_step(&mut self, _out: &Path, _step: usize, _on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        Ok(())
    }
    /// The number of steps the whole run is expected to take, for a learning-rate schedule that
    /// spans the run ([`crate::optim::LrSchedule::CosineRun`]): the step limit, or under a time
    /// budget the steps the budget allows at the speed measured over its first tenth. Called
    /// before the first step when it is known, else once when it is measured.
    fn set_horizon(&mut self, _steps: usize) {}
    /// After the last checkpoint of a run that ended normally.
    fn finish(&mut self, _out: &Path, _state: &TrainState, _on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        Ok(())
    }
}

/// For [`Task::check_resumable`]: reads the config saved in `dir` and fails, naming the
/// checkpoint and `what` differs, unless `compatible` accepts it.
pub fn check_saved<C: serde::de::DeserializeOwned>(
    dir: &Path,
    compatible: impl Fn(&C) -> bool,
    what: &str,
) -> Result<()> {
    let saved: C = crate::checkpoint::read_config(dir)?;
    if compatible(&saved) {
        Ok(())
    } else {
        Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: format!("cannot resume: the saved run has another {what}"),
        })
    }
}

/// A run folder resolves to its `best` checkpoint (else `last`); a checkpoint folder to itself.
pub fn resolve_model_dir(dir: &Path) -> PathBuf {
    if crate::checkpoint::resolve(dir).is_ok() {
        dir.to_path_buf()
    } else if crate::checkpoint::resolve(&best_dir(dir)).is_ok() {
        best_dir(dir)
    } else {
        last_dir(dir)
    }
}

/// Trains `task` into `out` from scratch, or, when `resume` is set and `<out>/last` exists,
/// continues from it (after [`Task::check_resumable`] and [`Task::restore`]).
pub fn run(
    task: &mut dyn Task,
    cfg: &LoopConfig,
    out: &Path,
    resume: bool,
    on_event: &mut dyn FnMut(&Event),
) -> Result<TrainState> {
    let last = last_dir(out);
    let state = if resume && crate::checkpoint::resolve(&last).is_ok() {
        task.check_resumable(&last)?;
        let state: TrainState = crate::checkpoint::read_state(&last)?.unwrap_or_default();
        task.restore(&last, &state)?;
        tracing::info!(step = state.step, "resuming");
        state
    } else {
        TrainState::default()
    };
    fit(task, cfg, out, state, on_event)
}

/// Progress reports from [`fit`].
#[derive(Debug, Clone)]
pub enum Event {
    /// A step finished.
    Step {
        /// Global step.
        step: usize,
        /// Epoch.
        epoch: usize,
        /// Its loss.
        loss: f64,
        /// Steps the run will take (for a progress bar): the step limit, or under a time budget
        /// the length measured after its first tenth ([`TrainState::horizon`]) once known.
        total: usize,
    },
    /// An evaluation finished.
    Eval {
        /// Global step.
        step: usize,
        /// The metric.
        metric: f64,
        /// Whether it is the best so far.
        best: bool,
    },
    /// A checkpoint was written.
    Saved(PathBuf),
    /// A figure (for example a sample grid) was written.
    Figure(PathBuf),
}

/// The run's length a progress bar shows at `step`: the step limit `total`, or under a time
/// budget the measured length once known (never below the step reached).
fn shown_total(state: &TrainState, total: usize, step: usize) -> usize {
    state.horizon.map_or(total, |h| h.max(step))
}

/// Formats seconds for progress lines: `1h02m`, `3m05s` or `12s`.
pub fn format_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// `<out>/last`: the latest checkpoint, for resuming.
pub fn last_dir(out: &Path) -> PathBuf {
    out.join("last")
}

/// `<out>/best`: the model a run keeps ([`LoopConfig::keep`]): the checkpoint with the best
/// validation metric, or the final weights.
pub fn best_dir(out: &Path) -> PathBuf {
    out.join("best")
}

/// Runs the loop from `state` (default for a new run, or the state read from `<out>/last`).
pub fn fit(
    task: &mut dyn Task,
    cfg: &LoopConfig,
    out: &Path,
    mut state: TrainState,
    on_event: &mut dyn FnMut(&Event),
) -> Result<TrainState> {
    let _lock = crate::fsutil::DirLock::acquire(out)?;
    let per_epoch = task.batches_per_epoch();
    if per_epoch == 0 {
        return Err(Error::invalid("training set gives no batches (is it empty, or smaller than one batch?)"));
    }
    let total = cfg.max_steps.unwrap_or(usize::MAX).min(cfg.epochs * per_epoch);
    let start = Instant::now();
    let elapsed0 = state.elapsed_s;
    let elapsed = |s: &Instant| elapsed0 + s.elapsed().as_secs_f64();
    let base = Rng::new(cfg.seed);
    let (mut loss_sum, mut loss_n) = (0f64, 0usize);
    let mut pending = Pending::default();
    state.finished = false;
    state.stop_reason = None;
    // The run's length in steps: the step limit, or under a time budget the steps it allows at the
    // speed of its first tenth (measured once; a resumed run keeps the saved value).
    let step0 = state.step;
    if cfg.minutes.is_none() {
        state.horizon = Some(total);
    }
    if let Some(h) = state.horizon {
        task.set_horizon(h);
    }

    let direction = task.metric_direction();
    let evaluate = |task: &mut dyn Task,
                    state: &mut TrainState,
                    on_event: &mut dyn FnMut(&Event),
                    loss: f64|
     -> Result<()> {
        let el = state.elapsed_s;
        let metric = task.evaluate()?;
        let best = match (metric, state.best_metric) {
            (Some(m), Some(b)) => direction.improves(m, b),
            (Some(_), None) => true,
            _ => false,
        };
        let parts = task.history_parts();
        state.history.push(HistoryPoint { step: state.step, epoch: state.epoch, loss, metric, elapsed_s: el, parts });
        if let Some(m) = metric {
            if best {
                state.best_metric = Some(m);
                state.best_step = Some(state.step);
                state.evals_since_best = 0;
            } else {
                state.evals_since_best += 1;
            }
            on_event(&Event::Eval { step: state.step, metric: m, best });
        }
        if cfg.keep == Keep::Best && (best || (metric.is_none() && state.best_step.is_none())) {
            task.save(&best_dir(out), state)?;
        }
        if let Some(reason) = task.stop_reason(state) {
            state.stop_reason = Some(reason);
        }
        Ok(())
    };

    'outer: while state.epoch < cfg.epochs {
        while state.batch_in_epoch < per_epoch {
            if state.step >= total {
                state.stop_reason = Some("max_steps".into());
                break 'outer;
            }
            if let Some(m) = cfg.minutes {
                let (budget, now) = (m * 60.0, elapsed(&start));
                if now >= budget {
                    state.stop_reason = Some("time_budget".into());
                    break 'outer;
                }
                let here = start.elapsed().as_secs_f64();
                if state.horizon.is_none() && now >= 0.1 * budget && state.step > step0 && here > 0.0 {
                    let per_s = (state.step - step0) as f64 / here;
                    let h = (state.step + ((budget - now) * per_s).round() as usize).min(total);
                    state.horizon = Some(h);
                    task.set_horizon(h);
                }
            }
            let mut rng = base.fork(state.step as u64);
            let step = task.train_batch(state.epoch, state.batch_in_epoch, &mut rng)?;
            let on_host = derm_kernels::ops::host_kernels(&step.loss);
            pending.push(state.step, state.epoch, step)?;
            state.step += 1;
            state.batch_in_epoch += 1;
            let end_of_epoch = state.batch_in_epoch == per_epoch;
            let eval_now = match cfg.eval_every {
                Some(n) => state.step.is_multiple_of(n.max(1)),
                None => end_of_epoch,
            };
            let save_now = match cfg.checkpoint_every {
                Some(n) => state.step.is_multiple_of(n.max(1)),
                None => end_of_epoch,
            };
            if on_host || eval_now || save_now || pending.steps.len() >= cfg.read_every.max(1) {
                for (step, epoch, loss) in pending.read()? {
                    loss_sum += loss;
                    loss_n += 1;
                    on_event(&Event::Step { step, epoch, loss, total: shown_total(&state, total, step) });
                }
            }
            task.after_step(out, state.step, on_event)?;
            if end_of_epoch {
                state.epoch += 1;
                state.batch_in_epoch = 0;
            }
            if eval_now {
                let l = loss_sum / loss_n.max(1) as f64;
                (loss_sum, loss_n) = (0.0, 0);
                state.elapsed_s = elapsed(&start);
                evaluate(task, &mut state, on_event, l)?;
            }
            if save_now {
                state.elapsed_s = elapsed(&start);
                task.save(&last_dir(out), &state)?;
                on_event(&Event::Saved(last_dir(out)));
            }
            if state.stop_reason.is_some() {
                break 'outer;
            }
            if end_of_epoch {
                break;
            }
        }
    }
    if state.stop_reason.is_none() {
        state.stop_reason = Some("epochs".into());
    }
    for (step, epoch, loss) in pending.read()? {
        loss_sum += loss;
        loss_n += 1;
        on_event(&Event::Step { step, epoch, loss, total: shown_total(&state, total, step) });
    }
    if loss_n > 0 {
        let l = loss_sum / loss_n as f64;
        state.elapsed_s = elapsed(&start);
        evaluate(task, &mut state, on_event, l)?;
    }
    // The final weights are kept when this call trained them (a resumed run that had nothing left
    // to do leaves the kept model, and what was chosen for it, as it was).
    let trained = state.step > step0 || !best_dir(out).exists();
    if (cfg.keep == Keep::Last && trained) || (state.best_step.is_none() && !best_dir(out).exists()) {
        task.save(&best_dir(out), &state)?;
    }
    state.finished = true;
    state.elapsed_s = elapsed(&start);
    task.save(&last_dir(out), &state)?;
    on_event(&Event::Saved(last_dir(out)));
    task.finish(out, &state, on_event)?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{self, CheckpointData, Meta};
    use crate::optim::{OptimConfig, Optimizer, OptimizerKind};
    use candle_core::{Device, Tensor, Var};
    use candle_nn::VarMap;

    /// Linear regression on fixed data, with an optional step at which the loss becomes NaN.
    struct Toy {
        vm: VarMap,
        w: Var,
        opt: Optimizer,
        x: Tensor,
        y: Tensor,
        nan_at: Option<usize>,
        steps: usize,
        /// Report the loss itself (lower is better) instead of its negative.
        lower: bool,
        /// Ask to stop after this many evaluations.
        stop_after: Option<usize>,
        evals: usize,
        /// What the loop said the run's length is ([`Task::set_horizon`]), with the step then.
        horizon: Option<(usize, usize)>,
        /// Report a metric that worsens at every evaluation (the first is the best).
        worsening: bool,
    }

    impl Toy {
        fn new(nan_at: Option<usize>) -> Self {
            let vm = VarMap::new();
            let vb = crate::nn::seeded_var_builder(&vm, 1, candle_core::DType::F32, &Device::Cpu);
            vb.get_with_hints((3, 1), "w", candle_nn::Init::Const(0.0)).unwrap();
            let w = vm.data().lock().unwrap().get("w").unwrap().clone();
            let opt = Optimizer::from_varmap(
                &vm,
                OptimConfig { optimizer: OptimizerKind::adam(0.2), ..Default::default() },
                |_| true,
            );
            let mut r = Rng::new(2);
            let x = Tensor::from_vec(r.normal_vec(16 * 3, 0.0, 1.0), (16, 3), &Device::Cpu).unwrap();
            let y = x.matmul(&Tensor::new(&[[1f32], [-2.0], [0.5]], &Device::Cpu).unwrap()).unwrap();
            Toy {
                vm,
                w,
                opt,
                x,
                y,
                nan_at,
                steps: 0,
                lower: false,
                stop_after: None,
                evals: 0,
                horizon: None,
                worsening: false,
            }
        }
        fn loss(&self, b: usize) -> Tensor {
            let xb = self.x.narrow(0, b * 4, 4).unwrap();
            let yb = self.y.narrow(0, b * 4, 4).unwrap();
            (xb.matmul(self.w.as_tensor()).unwrap() - yb).unwrap().sqr().unwrap().mean_all().unwrap()
        }
    }

    impl Task for Toy {
        fn batches_per_epoch(&self) -> usize {
            4
        }
        fn train_batch(&mut self, _e: usize, b: usize, _rng: &mut Rng) -> Result<StepLoss> {
            self.steps += 1;
            let mut l = self.loss(b);
            if Some(self.steps) == self.nan_at {
                l = (l * f64::NAN)?;
            }
            let norm = self.opt.backward_step(&l)?;
            Ok(StepLoss::new(l, norm))
        }
        fn evaluate(&mut self) -> Result<Option<f64>> {
            let l = (self.x.matmul(self.w.as_tensor())? - &self.y)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
            self.evals += 1;
            if self.worsening {
                return Ok(Some(-(self.evals as f64)));
            }
            Ok(Some(if self.lower { l } else { -l }))
        }
        fn metric_direction(&self) -> Direction {
            if self.lower {
                Direction::Lower
            } else {
                Direction::Higher
            }
        }
        fn history_parts(&mut self) -> BTreeMap<String, f64> {
            BTreeMap::from([("evals".to_string(), self.evals as f64)])
        }
        fn stop_reason(&mut self, state: &mut TrainState) -> Option<String> {
            state.task = serde_json::json!({ "evals": self.evals });
            (Some(self.evals) == self.stop_after).then(|| "enough".to_string())
        }
        fn save(&self, dir: &Path, state: &TrainState) -> Result<()> {
            checkpoint::save(
                dir,
                &CheckpointData::training(&self.vm, &0, &Meta::new("toy", "linear"), &self.opt, state),
            )
        }
        fn restore(&mut self, dir: &Path, _state: &TrainState) -> Result<()> {
            checkpoint::restore_training(dir, &self.vm, &mut self.opt).map(drop)
        }
        fn check_resumable(&self, dir: &Path) -> Result<()> {
            check_saved(dir, |c: &i32| *c == 0, "config")
        }
        fn set_horizon(&mut self, steps: usize) {
            self.horizon = Some((steps, self.steps));
            self.opt.set_horizon(steps);
        }
    }

    fn weights(t: &Toy) -> Vec<f32> {
        t.w.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn loop_trains_keeps_best_and_resumes_exactly() {
        let d = tempfile::tempdir().unwrap();
        let cfg = LoopConfig { epochs: 6, ..Default::default() };
        let mut straight = Toy::new(None);
        let st = fit(&mut straight, &cfg, &d.path().join("a"), TrainState::default(), &mut |_| {}).unwrap();
        assert_eq!(st.step, 24);
        assert_eq!(st.stop_reason.as_deref(), Some("epochs"));
        let h = &st.history;
        assert!(h.last().unwrap().loss < 0.2 * h[0].loss, "{h:?}");
        assert!(best_dir(&d.path().join("a")).join("model.safetensors").exists());

        // Stop after 9 steps, then resume from <out>/last in a "new process".
        let out = d.path().join("b");
        let mut first = Toy::new(None);
        let cfg9 = LoopConfig { max_steps: Some(9), checkpoint_every: Some(1), ..cfg.clone() };
        fit(&mut first, &cfg9, &out, TrainState::default(), &mut |_| {}).unwrap();
        let mut resumed = Toy::new(None);
        let last = last_dir(&out);
        checkpoint::load_varmap(&resumed.vm, &last.join("model.safetensors"), checkpoint::Strictness::Exact, |_| false)
            .unwrap();
        resumed.opt.load(&last.join("optim.safetensors")).unwrap();
        let state: TrainState = checkpoint::read_state(&last).unwrap().unwrap();
        assert_eq!((state.step, state.epoch, state.batch_in_epoch), (9, 2, 1));
        let st2 = fit(&mut resumed, &cfg, &out, state, &mut |_| {}).unwrap();
        assert_eq!(st2.step, 24);
        assert_eq!(weights(&straight), weights(&resumed));
    }

    #[test]
    fn nan_loss_stops_and_keeps_last_good_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("run");
        let mut t = Toy::new(Some(7));
        let cfg = LoopConfig { epochs: 5, checkpoint_every: Some(2), ..Default::default() };
        let e = fit(&mut t, &cfg, &out, TrainState::default(), &mut |_| {}).unwrap_err();
        assert!(matches!(e, Error::NonFiniteLoss { step: 6, .. }), "{e}");
        assert!(e.to_string().contains("last good checkpoint"));
        let state: TrainState = checkpoint::read_state(&last_dir(&out)).unwrap().unwrap();
        assert_eq!(state.step, 6);
    }

    #[test]
    fn on_a_device_losses_are_read_in_batches_and_a_nan_still_stops_before_a_save() {
        // The device path (forced on the CPU): the same run, with every step's loss reported.
        let d = tempfile::tempdir().unwrap();
        let cfg = LoopConfig { epochs: 3, eval_every: Some(6), read_every: 5, ..Default::default() };
        let mut host = Toy::new(None);
        let (mut host_losses, mut device_losses) = (Vec::new(), Vec::new());
        let record = |v: &mut Vec<(usize, f64)>, e: &Event| {
            if let Event::Step { step, loss, .. } = e {
                v.push((*step, *loss));
            }
        };
        let a = fit(&mut host, &cfg, &d.path().join("a"), TrainState::default(), &mut |e| record(&mut host_losses, e))
            .unwrap();
        let mut dev = Toy::new(None);
        let b = derm_kernels::ops::with_device_path(|| {
            fit(&mut dev, &cfg, &d.path().join("b"), TrainState::default(), &mut |e| record(&mut device_losses, e))
        })
        .unwrap();
        assert_eq!(host_losses.len(), 12);
        assert_eq!(
            host_losses.iter().map(|s| s.0).collect::<Vec<_>>(),
            device_losses.iter().map(|s| s.0).collect::<Vec<_>>()
        );
        // The fused f32 Adam update and the tensor-op one round differently (1e-5 after a few
        // steps at this learning rate).
        for ((_, x), (_, y)) in host_losses.iter().zip(&device_losses) {
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{x} vs {y}");
        }
        assert_eq!(a.history.len(), b.history.len());
        for (x, y) in weights(&host).iter().zip(weights(&dev)) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }

        // A NaN at step 6 is read at the checkpoint after step 8: the run stops there, naming
        // step 6, and the checkpoint on disk is the one of step 4.
        let out = d.path().join("nan");
        let mut t = Toy::new(Some(7));
        let cfg = LoopConfig { epochs: 5, checkpoint_every: Some(4), read_every: 20, ..Default::default() };
        let e = derm_kernels::ops::with_device_path(|| fit(&mut t, &cfg, &out, TrainState::default(), &mut |_| {}))
            .unwrap_err();
        assert!(matches!(e, Error::NonFiniteLoss { step: 6, quantity: "loss", .. }), "{e}");
        let state: TrainState = checkpoint::read_state(&last_dir(&out)).unwrap().unwrap();
        assert_eq!(state.step, 4);
    }

    #[test]
    fn lower_is_better_metrics_early_stops_and_resume_checks() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("run");
        let mut t = Toy::new(None);
        t.lower = true;
        t.stop_after = Some(3);
        let cfg = LoopConfig { epochs: 10, ..Default::default() };
        let st = run(&mut t, &cfg, &out, false, &mut |_| {}).unwrap();
        // The task's stop after its third evaluation ends the run after epoch 3.
        assert_eq!(st.stop_reason.as_deref(), Some("enough"));
        assert_eq!(st.step, 12);
        // The loss falls, so with a lower-is-better metric the last evaluation is the best.
        assert_eq!(st.best_step, Some(12));
        assert_eq!(st.evals_since_best, 0);
        assert_eq!(st.history[2].parts["evals"], 3.0);
        let saved: TrainState = checkpoint::read_state(&last_dir(&out)).unwrap().unwrap();
        assert_eq!(saved.task["evals"], 3);
        assert_eq!(resolve_model_dir(&out), best_dir(&out));
        // Resuming into a run saved with another config is refused, naming the checkpoint.
        checkpoint::save(
            &last_dir(&out),
            &CheckpointData::training(&t.vm, &1, &Meta::new("toy", "linear"), &t.opt, &saved),
        )
        .unwrap();
        let e = run(&mut Toy::new(None), &cfg, &out, true, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("cannot resume") && e.contains("last"), "{e}");
    }

    #[test]
    fn keep_last_keeps_the_final_weights_instead_of_the_best_evaluation() {
        let d = tempfile::tempdir().unwrap();
        for keep in [Keep::Best, Keep::Last] {
            let out = d.path().join(format!("{keep:?}"));
            let mut t = Toy::new(None);
            t.worsening = true;
            let cfg = LoopConfig { epochs: 3, keep, ..Default::default() };
            let st = fit(&mut t, &cfg, &out, TrainState::default(), &mut |_| {}).unwrap();
            // The first evaluation (after epoch 1) is the best either way.
            assert_eq!(st.best_step, Some(4));
            let kept: TrainState = checkpoint::read_state(&best_dir(&out)).unwrap().unwrap();
            let model = |dir: PathBuf| std::fs::read(dir.join("model.safetensors")).unwrap();
            let same_as_last = model(best_dir(&out)) == model(last_dir(&out));
            match keep {
                Keep::Best => assert!(kept.step == 4 && !same_as_last, "{keep:?}: step {}", kept.step),
                Keep::Last => assert!(kept.step == 12 && same_as_last, "{keep:?}: step {}", kept.step),
            }
            assert_eq!(resolve_model_dir(&out), best_dir(&out));
            // Resuming the finished run trains nothing and leaves the kept model as it was.
            let written = || std::fs::metadata(best_dir(&out).join("model.safetensors")).unwrap().modified().unwrap();
            let before = written();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let again = run(&mut Toy::new(None), &cfg, &out, true, &mut |_| {}).unwrap();
            assert_eq!(again.step, 12);
            assert_eq!(written(), before, "{keep:?}: best/ was rewritten by a resume that trained nothing");
        }
        assert_eq!("last".parse::<Keep>(), Ok(Keep::Last));
        assert!("final".parse::<Keep>().unwrap_err().contains("best or last"));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(12.2), "12s");
        assert_eq!(format_duration(185.0), "3m05s");
        assert_eq!(format_duration(3720.0), "1h02m");
    }

    #[test]
    fn time_budget_stops_the_run() {
        let d = tempfile::tempdir().unwrap();
        let mut t = Toy::new(None);
        let cfg = LoopConfig { epochs: 1000, minutes: Some(0.0), ..Default::default() };
        let st = fit(&mut t, &cfg, d.path(), TrainState::default(), &mut |_| {}).unwrap();
        assert_eq!(st.stop_reason.as_deref(), Some("time_budget"));
        assert_eq!(st.step, 0);
    }

    #[test]
    fn the_run_length_is_the_step_limit_or_measured_under_a_time_budget() {
        let d = tempfile::tempdir().unwrap();
        // A step limit is known before the first step.
        let mut t = Toy::new(None);
        let cfg = LoopConfig { epochs: 6, max_steps: Some(10), ..Default::default() };
        let st = fit(&mut t, &cfg, &d.path().join("steps"), TrainState::default(), &mut |_| {}).unwrap();
        assert_eq!((t.horizon, st.horizon), (Some((10, 0)), Some(10)));

        // Under a time budget it is measured after a tenth of it, from the speed so far: far
        // below the epochs' limit, and saved for a resumed run.
        let mut t = Toy::new(None);
        let cfg = LoopConfig { epochs: 1_000_000, minutes: Some(0.02), ..Default::default() };
        let mut totals = Vec::new();
        let st = fit(&mut t, &cfg, &d.path().join("time"), TrainState::default(), &mut |e| {
            if let Event::Step { step, total, .. } = e {
                totals.push((*step, *total));
            }
        })
        .unwrap();
        let (h, at) = t.horizon.expect("no horizon was measured");
        assert!(at > 0 && h > at && h < 4_000_000 && st.horizon == Some(h), "{h} at {at}, {:?}", st.horizon);
        // The progress bar's length: the epochs' limit until then, the measured length after.
        let &(last, total) = totals.last().unwrap();
        assert_eq!(total, h.max(last));
        assert!(totals.iter().any(|&(_, t)| t >= 4_000_000), "{:?}", totals.first());
        let saved: TrainState = checkpoint::read_state(&last_dir(&d.path().join("time"))).unwrap().unwrap();
        assert_eq!(saved.horizon, Some(h));
    }
}
