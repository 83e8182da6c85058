//! Checkpoints: a folder with `model.safetensors`, `config.json` (the stage's full config),
//! `meta.json` (stage, architecture, input/output contract, crate version), and for resuming
//! `optim.safetensors` and `state.json`.
//!
//! A checkpoint is written whole into a temporary sibling folder and then swapped in by rename, so
//! a crash at any moment leaves either the previous checkpoint or the new one, never a mix. While
//! the swap is under way the previous one sits at `<dir>.old`, which [`resolve`] falls back to.
//! Loading weights checks every variable of the model against the file and names the first
//! missing or mis-shaped tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::fsutil::{read_json, temp_sibling, write_json};
use crate::{Error, Result};

/// Weights file name inside a checkpoint folder.
pub const WEIGHTS: &str = "model.safetensors";
/// Stage config file name.
pub const CONFIG: &str = "config.json";
/// Metadata file name.
pub const META: &str = "meta.json";
/// Optimiser state file name.
pub const OPTIM: &str = "optim.safetensors";
/// Training state file name.
pub const STATE: &str = "state.json";
/// The weights being trained, when the checkpoint's weights are their running average
/// ([`crate::ema`]): read only to resume training.
pub const TRAINING_WEIGHTS: &str = "training_weights.safetensors";

/// One input or output of a model, as recorded in `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Name (for example `image` or `logits`).
    pub name: String,
    /// Shape with `null` for free dimensions (batch, height, width).
    pub shape: Vec<Option<usize>>,
    /// Data type, for example `f32`.
    pub dtype: String,
    /// Value range, for example [-1, 1] for images normalised with mean and std 0.5.
    pub range: Option<(f64, f64)>,
    /// What the values mean.
    pub description: String,
}

/// `meta.json`: what the checkpoint holds and how to feed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Stage that wrote it (`segment`, `purify`, `synth`, `classify`).
    pub stage: String,
    /// Architecture name (for example `unet-dilated`, `resnet50`).
    pub arch: String,
    /// derm version that wrote it.
    pub derm_version: String,
    /// Inputs.
    pub inputs: Vec<TensorSpec>,
    /// Outputs.
    pub outputs: Vec<TensorSpec>,
    /// Free-form extra facts (class names, image size, metrics at save time).
    #[serde(default)]
    pub extra: serde_json::Value,
}

impl Meta {
    /// A meta record for `stage` and `arch` with the current derm version.
    pub fn new(stage: &str, arch: &str) -> Self {
        Meta {
            stage: stage.into(),
            arch: arch.into(),
            derm_version: env!("CARGO_PKG_VERSION").into(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            extra: serde_json::Value::Null,
        }
    }
}

/// Writes named tensors to a safetensors file atomically.
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        crate::fsutil::create_dir_all(parent)?;
    }
    let tmp = temp_sibling(path);
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&cpu, &tmp).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Checkpoint { path: path.into(), msg: format!("cannot write: {e}") }
    })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Reads all tensors of a safetensors file.
pub fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::Checkpoint { path: path.into(), msg: "file not found".into() });
    }
    candle_core::safetensors::load(path, device)
        .map_err(|e| Error::Checkpoint { path: path.into(), msg: format!("not a readable safetensors file: {e}") })
}

/// The variables of a VarMap, sorted by name.
pub fn sorted_vars(vm: &VarMap) -> Vec<(String, candle_core::Var)> {
    let mut v: Vec<_> = match vm.data().lock() {
        Ok(d) => d.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Err(_) => Vec::new(),
    };
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Writes a VarMap's weights to a safetensors file atomically.
pub fn save_varmap(vm: &VarMap, path: &Path) -> Result<()> {
    let t: HashMap<String, Tensor> = sorted_vars(vm).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
    save_tensors(&t, path)
}

/// How strictly [`load_varmap`] matches names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// Every model variable must be in the file and every file tensor in the model, except
    /// PyTorch's batch-norm counters (see [`is_torch_bookkeeping`]), which are always ignored.
    Exact,
    /// Every model variable must be in the file; extra tensors in the file are ignored.
    AllowExtra,
}

/// Whether a file tensor is PyTorch bookkeeping that derm ignores on purpose whatever the
/// [`Strictness`]: `*.num_batches_tracked`, the int64 count of training batches every
/// `BatchNorm2d` of a torchvision state dict carries. It only matters to PyTorch when
/// `momentum=None` (a cumulative average); derm's batch norm uses a fixed momentum (0.1, as
/// torchvision's default) and the running statistics themselves (`running_mean`, `running_var`),
/// which are loaded.
pub fn is_torch_bookkeeping(name: &str) -> bool {
    name == "num_batches_tracked" || name.ends_with(".num_batches_tracked")
}

/// Fills a VarMap's variables from a safetensors file. `skip` names tensors that are neither
/// loaded nor required, on either side: a model variable it names is left as initialised (for
/// example a replaced classifier head), and a file tensor it names is not "unexpected" under
/// [`Strictness::Exact`] (for example a training-only head the model was built without). Errors
/// name the first missing or mis-shaped tensor (in name order).
pub fn load_varmap(vm: &VarMap, path: &Path, strict: Strictness, skip: impl Fn(&str) -> bool) -> Result<()> {
    let vars = sorted_vars(vm);
    let device = vars.first().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
    let file = load_tensors(path, &device)?;
    let bad = |msg: String| Error::Checkpoint { path: path.into(), msg };
    for (name, var) in &vars {
        if skip(name) {
            continue;
        }
        let t = file.get(name).ok_or_else(|| {
            bad(format!("tensor `{name}` is missing: the checkpoint is of another architecture or configuration"))
        })?;
        if t.shape() != var.shape() {
            return Err(bad(format!(
                "tensor `{name}` has shape {:?} in the file but {:?} in the model: the checkpoint is of another architecture or configuration",
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    if strict == Strictness::Exact {
        let mut extra: Vec<&String> = file
            .keys()
            .filter(|k| !is_torch_bookkeeping(k) && !skip(k) && !vars.iter().any(|(n, _)| n == *k))
            .collect();
        extra.sort();
        if let Some(k) = extra.first() {
            return Err(bad(format!(
                "tensor `{k}` is in the file but not in the model ({} unexpected): the checkpoint is of another architecture",
                extra.len()
            )));
        }
    }
    Ok(())
}

/// What one checkpoint write contains.
pub struct CheckpointData<'a, C: Serialize, S: Serialize> {
    /// The weights.
    pub varmap: &'a VarMap,
    /// The stage's config.
    pub config: &'a C,
    /// The metadata.
    pub meta: &'a Meta,
    /// The optimiser, for resuming.
    pub optimizer: Option<&'a crate::optim::Optimizer>,
    /// The training state, for resuming.
    pub state: Option<&'a S>,
    /// Further optimisers by file name (a GAN's generator optimiser beside the discriminator's).
    pub extra_optimizers: &'a [(&'a str, &'a crate::optim::Optimizer)],
    /// The weights being trained when `varmap` holds their running average
    /// ([`TRAINING_WEIGHTS`]).
    pub training_weights: Option<&'a VarMap>,
}

impl<'a, C: Serialize, S: Serialize> CheckpointData<'a, C, S> {
    /// A training checkpoint: weights, config, meta, the optimiser and the training state.
    pub fn training(
        varmap: &'a VarMap,
        config: &'a C,
        meta: &'a Meta,
        optimizer: &'a crate::optim::Optimizer,
        state: &'a S,
    ) -> Self {
        CheckpointData {
            varmap,
            config,
            meta,
            optimizer: Some(optimizer),
            state: Some(state),
            extra_optimizers: &[],
            training_weights: None,
        }
    }
}

/// Loads a training checkpoint back for resuming: the weights into `varmap` (every tensor, same
/// shapes) and, when the folder has one, the optimiser state into `optimizer`. Returns the
/// resolved folder.
pub fn restore_training(dir: &Path, varmap: &VarMap, optimizer: &mut crate::optim::Optimizer) -> Result<PathBuf> {
    let dir = resolve(dir)?;
    load_varmap(varmap, &dir.join(WEIGHTS), Strictness::Exact, |_| false)?;
    load_optimizer(&dir, OPTIM, optimizer)?;
    Ok(dir)
}

/// Loads `<dir>/<file>` into `optimizer` when the checkpoint has it (a checkpoint written without
/// optimiser state resumes with fresh moments).
pub fn load_optimizer(dir: &Path, file: &str, optimizer: &mut crate::optim::Optimizer) -> Result<()> {
    let o = dir.join(file);
    if o.exists() {
        optimizer.load(&o)?;
    }
    Ok(())
}

/// Writes a whole checkpoint folder at `dir`, atomically.
pub fn save<C: Serialize, S: Serialize>(dir: &Path, data: &CheckpointData<'_, C, S>) -> Result<()> {
    let tmp = temp_sibling(dir);
    crate::fsutil::remove_stale_temps(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    crate::fsutil::create_dir_all(&tmp)?;
    save_varmap(data.varmap, &tmp.join(WEIGHTS))?;
    write_json(&tmp.join(CONFIG), data.config)?;
    write_json(&tmp.join(META), data.meta)?;
    if let Some(o) = data.optimizer {
        o.save(&tmp.join(OPTIM))?;
    }
    for (name, o) in data.extra_optimizers {
        o.save(&tmp.join(name))?;
    }
    if let Some(vm) = data.training_weights {
        save_varmap(vm, &tmp.join(TRAINING_WEIGHTS))?;
    }
    if let Some(s) = data.state {
        write_json(&tmp.join(STATE), s)?;
    }
    swap_in(&tmp, dir)
}

/// Replaces `dir` by the complete folder `tmp`: the old one is moved to `<dir>.old` first and
/// removed only after the new one is in place.
fn swap_in(tmp: &Path, dir: &Path) -> Result<()> {
    let old = old_path(dir);
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(tmp, dir).map_err(|e| Error::io(dir, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

fn old_path(dir: &Path) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.with_file_name(format!("{name}.old"))
}

/// The folder to read a checkpoint from: `dir` itself, or `<dir>.old` when a swap was cut short.
pub fn resolve(dir: &Path) -> Result<PathBuf> {
    if dir.join(WEIGHTS).exists() {
        return Ok(dir.to_path_buf());
    }
    let old = old_path(dir);
    if old.join(WEIGHTS).exists() {
        tracing::warn!("{} is incomplete; using {}", dir.display(), old.display());
        return Ok(old);
    }
    Err(Error::Checkpoint { path: dir.into(), msg: format!("no {WEIGHTS} here (is this a derm checkpoint folder?)") })
}

/// Reads `meta.json` and checks it was written by `stage`.
pub fn read_meta(dir: &Path, stage: &str) -> Result<Meta> {
    let dir = resolve(dir)?;
    let meta: Meta = read_json(&dir.join(META))?;
    if meta.stage != stage {
        return Err(Error::Checkpoint {
            path: dir,
            msg: format!("this is a `{}` checkpoint, not a `{stage}` one", meta.stage),
        });
    }
    Ok(meta)
}

/// Changes the config and metadata of the `stage` checkpoint in `dir` after training (a
/// threshold or operating point chosen on validation): `change` edits both, and each file is
/// rewritten atomically; the weights are untouched.
pub fn amend<C: Serialize + DeserializeOwned>(
    dir: &Path,
    stage: &str,
    change: impl FnOnce(&mut C, &mut Meta),
) -> Result<()> {
    let dir = resolve(dir)?;
    let mut meta = read_meta(&dir, stage)?;
    let mut config: C = read_config(&dir)?;
    change(&mut config, &mut meta);
    write_json(&dir.join(CONFIG), &config)?;
    write_json(&dir.join(META), &meta)
}

/// Which stage wrote the checkpoint in `dir` (a checkpoint folder, or a model folder resolved
/// to its `best/` or `last/`): the `stage` of its `meta.json`.
pub fn stage_of(dir: &Path) -> Result<String> {
    let dir = resolve(&crate::train::resolve_model_dir(dir))?;
    let meta: Meta = read_json(&dir.join(META))?;
    Ok(meta.stage)
}

/// Reads the stage config of a checkpoint.
pub fn read_config<C: DeserializeOwned>(dir: &Path) -> Result<C> {
    read_json(&resolve(dir)?.join(CONFIG))
}

/// Reads the training state of a checkpoint, if it has one.
pub fn read_state<S: DeserializeOwned>(dir: &Path) -> Result<Option<S>> {
    let p = resolve(dir)?.join(STATE);
    if p.exists() {
        read_json(&p).map(Some)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::{Init, VarBuilder};

    fn model(vm: &VarMap, out: usize) -> candle_nn::Linear {
        let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
        let _ = vb.get_with_hints(3, "bn.running_mean", Init::Const(0.0)).unwrap();
        candle_nn::linear(3, out, vb.pp("fc")).unwrap()
    }

    #[test]
    fn round_trip_and_architecture_mismatch_names_the_tensor() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ckpt");
        let vm = VarMap::new();
        let _ = model(&vm, 2);
        let meta = Meta::new("segment", "test");
        save(
            &dir,
            &CheckpointData::<_, ()> {
                varmap: &vm,
                config: &serde_json::json!({"a": 1}),
                meta: &meta,
                optimizer: None,
                state: None,
                extra_optimizers: &[],
                training_weights: None,
            },
        )
        .unwrap();
        let vm2 = VarMap::new();
        let _ = model(&vm2, 2);
        load_varmap(&vm2, &dir.join(WEIGHTS), Strictness::Exact, |_| false).unwrap();
        for ((_, a), (_, b)) in sorted_vars(&vm).iter().zip(sorted_vars(&vm2).iter()) {
            let d =
                (a.as_tensor() - b.as_tensor()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(d, 0.0);
        }
        let vm3 = VarMap::new();
        let _ = model(&vm3, 5);
        let e = load_varmap(&vm3, &dir.join(WEIGHTS), Strictness::Exact, |_| false).unwrap_err().to_string();
        assert!(e.contains("fc.bias") && e.contains("[2]") && e.contains("[5]"), "{e}");
        // Head replacement: skip fc.* and the rest loads.
        load_varmap(&vm3, &dir.join(WEIGHTS), Strictness::Exact, |n| n.starts_with("fc.")).unwrap();
        // A skipped name is not required in the model either: a model without the head loads a
        // file with one when the head is skipped, and is refused when it is not.
        let vm4 = VarMap::new();
        let vb4 = VarBuilder::from_varmap(&vm4, DType::F32, &Device::Cpu);
        let _ = vb4.get_with_hints(3, "bn.running_mean", Init::Const(1.0)).unwrap();
        let e = load_varmap(&vm4, &dir.join(WEIGHTS), Strictness::Exact, |_| false).unwrap_err().to_string();
        assert!(e.contains("unexpected"), "{e}");
        load_varmap(&vm4, &dir.join(WEIGHTS), Strictness::Exact, |n| n.starts_with("fc.")).unwrap();
        assert_eq!(read_meta(&dir, "segment").unwrap().arch, "test");
        let e = read_meta(&dir, "classify").unwrap_err().to_string();
        assert!(e.contains("`segment` checkpoint"), "{e}");
        let cfg: serde_json::Value = read_config(&dir).unwrap();
        assert_eq!(cfg["a"], 1);
    }

    #[test]
    fn interrupted_write_leaves_previous_checkpoint_loadable() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("last");
        let vm = VarMap::new();
        let _ = model(&vm, 2);
        let meta = Meta::new("segment", "test");
        let data = CheckpointData::<_, ()> {
            varmap: &vm,
            config: &1,
            meta: &meta,
            optimizer: None,
            state: None,
            extra_optimizers: &[],
            training_weights: None,
        };
        save(&dir, &data).unwrap();
        // A second write killed half way: its temporary folder has a truncated weights file.
        let tmp = temp_sibling(&dir);
        std::fs::create_dir_all(&tmp).unwrap();
        let bytes = std::fs::read(dir.join(WEIGHTS)).unwrap();
        std::fs::write(tmp.join(WEIGHTS), &bytes[..bytes.len() / 2]).unwrap();
        let vm2 = VarMap::new();
        let _ = model(&vm2, 2);
        load_varmap(&vm2, &resolve(&dir).unwrap().join(WEIGHTS), Strictness::Exact, |_| false).unwrap();
        // Killed between the two renames: only `<dir>.old` exists.
        std::fs::rename(&dir, old_path(&dir)).unwrap();
        let r = resolve(&dir).unwrap();
        assert!(r.ends_with("last.old"));
        load_varmap(&vm2, &r.join(WEIGHTS), Strictness::Exact, |_| false).unwrap();
        // The next complete write cleans up both.
        save(&dir, &data).unwrap();
        assert!(resolve(&dir).unwrap().ends_with("last") && !old_path(&dir).exists());
        // A truncated file is a clear error naming it.
        std::fs::write(d.path().join("bad.safetensors"), &bytes[..10]).unwrap();
        let e =
            load_varmap(&vm2, &d.path().join("bad.safetensors"), Strictness::Exact, |_| false).unwrap_err().to_string();
        assert!(e.contains("bad.safetensors"), "{e}");
    }

    #[test]
    fn exact_ignores_num_batches_tracked_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let vm = VarMap::new();
        let _ = model(&vm, 2);
        let mut t: HashMap<String, Tensor> =
            sorted_vars(&vm).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        // torchvision's counter: an int64 scalar per batch norm.
        t.insert("bn.num_batches_tracked".into(), Tensor::new(3i64, &Device::Cpu).unwrap());
        let p = d.path().join("tv.safetensors");
        save_tensors(&t, &p).unwrap();
        let vm2 = VarMap::new();
        let _ = model(&vm2, 2);
        load_varmap(&vm2, &p, Strictness::Exact, |_| false).unwrap();
        assert!(is_torch_bookkeeping("layer1.0.bn2.num_batches_tracked") && !is_torch_bookkeeping("bn.running_var"));
        // Any other extra tensor is still an error under Exact, named.
        t.insert("bn.extra".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
        save_tensors(&t, &p).unwrap();
        let e = load_varmap(&vm2, &p, Strictness::Exact, |_| false).unwrap_err().to_string();
        assert!(e.contains("bn.extra") && e.contains("1 unexpected"), "{e}");
        load_varmap(&vm2, &p, Strictness::AllowExtra, |_| false).unwrap();
    }
}
