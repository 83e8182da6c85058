//! Seeded parameter creation and the layers every stage builds on.
//!
//! candle-nn initialises variables from its own generator, which the user cannot seed on the CPU.
//! [`seeded_var_builder`] gives a `VarBuilder` whose new variables are drawn from derm's
//! [`Rng`], each from a stream derived from the seed and the variable's name, so a model's
//! initial weights depend only on the seed and not on construction order. Layers follow candle's
//! triple (config, struct, constructor function) and use derm's corrected ops.

use candle_core::{DType, Device, Module, ModuleT, Result, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};

use crate::Rng;
use derm_kernels::conv;
use derm_kernels::fused;
use derm_kernels::ops::{self, ConvParams};

/// FNV-1a hash of a variable name, for per-name random streams.
fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// How a run's log names its network's shape: `"{name} preset"` for a named preset, else
/// `custom` (`"custom network"`, or `"custom networks"` for a pair of GANs).
pub fn preset_label(preset: Option<&str>, custom: &str) -> String {
    match preset {
        Some(name) => format!("{name} preset"),
        None => custom.to_string(),
    }
}

/// Draws a tensor for `init` from `rng`.
pub fn init_tensor(init: Init, shape: &Shape, dtype: DType, device: &Device, rng: &mut Rng) -> Result<Tensor> {
    let n = shape.elem_count();
    let data: Vec<f32> = match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Randn { mean, stdev } => rng.normal_vec(n, mean as f32, stdev as f32),
        Init::Uniform { lo, up } => rng.uniform_vec(n, lo as f32, up as f32),
        Init::Kaiming { dist, fan, non_linearity } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Normal => rng.normal_vec(n, 0.0, std as f32),
                candle_nn::init::NormalOrUniform::Uniform => {
                    let b = (3f64.sqrt() * std) as f32;
                    rng.uniform_vec(n, -b, b)
                }
            }
        }
    };
    Tensor::from_vec(data, shape.clone(), device)?.to_dtype(dtype)
}

struct SeededBackend {
    varmap: VarMap,
    seed: u64,
}

impl candle_nn::var_builder::SimpleBackend for SeededBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?;
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: asked {s:?}, have {:?}", v.shape())
            }
            return Ok(v.as_tensor().clone());
        }
        let mut rng = Rng::new(self.seed).fork(name_hash(name));
        let var = Var::from_tensor(&init_tensor(h, &s, dtype, dev, &mut rng)?)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("variable `{name}` must be created with a shape")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().map(|d| d.contains_key(name)).unwrap_or(false)
    }
}

/// A VarBuilder that creates missing variables in `varmap` from `seed`.
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(SeededBackend { varmap: varmap.clone(), seed }), dtype, device.clone())
}

/// PyTorch's default convolution/linear initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
pub fn torch_default_init(fan_in: usize) -> Init {
    let b = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

/// Configuration of a [`Conv2d`].
#[derive(Debug, Clone, Copy)]
pub struct Conv2dConfig {
    /// Padding, stride, dilation and groups.
    pub params: ConvParams,
    /// Whether the layer has a bias.
    pub bias: bool,
    /// Weight initialisation (None: PyTorch's default).
    pub init: Option<Init>,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Conv2dConfig { params: ConvParams::default(), bias: true, init: None }
    }
}

impl Conv2dConfig {
    /// "Same" padding for an odd kernel `k` with dilation `d`.
    pub fn same(k: usize, d: usize) -> Self {
        Conv2dConfig {
            params: ConvParams { padding: d * (k - 1) / 2, dilation: d, ..Default::default() },
            ..Default::default()
        }
    }
}

/// A 2-D convolution whose backward works at every shape ([`ops::conv2d`]).
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// Weight, (out, in/groups, kh, kw).
    pub weight: Tensor,
    /// Bias, (out,).
    pub bias: Option<Tensor>,
    /// Geometry.
    pub params: ConvParams,
}

/// Builds a [`Conv2d`] with weight `weight` and bias `bias` under `vb`.
pub fn conv2d(c_in: usize, c_out: usize, k: usize, cfg: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
    let fan_in = c_in / cfg.params.groups * k * k;
    let init = cfg.init.unwrap_or_else(|| torch_default_init(fan_in));
    let weight = vb.get_with_hints((c_out, c_in / cfg.params.groups, k, k), "weight", init)?;
    let bias = if cfg.bias { Some(vb.get_with_hints(c_out, "bias", torch_default_init(fan_in))?) } else { None };
    Ok(Conv2d { weight, bias, params: cfg.params })
}

impl Conv2d {
    /// `relu(conv(x) + bias)`, the bias and the activation fused into the convolution.
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.fused(x, true)? {
            return Ok(y);
        }
        let y = ops::conv2d(x, &self.weight, self.params)?;
        match &self.bias {
            Some(b) => fused::add_channel_bias_relu(&y, b),
            None => fused::relu(&y),
        }
    }

    /// The convolution with its bias (and the ReLU) as one op, where derm's convolution runs it
    /// (CPU, groups 1, a bias of the operands' dtype).
    fn fused(&self, x: &Tensor, relu: bool) -> Result<Option<Tensor>> {
        let p = self.params;
        match &self.bias {
            Some(b)
                if p.groups == 1
                    && conv::supports(x, &self.weight)
                    && b.dtype() == x.dtype()
                    && b.device().is_cpu() =>
            {
                let spec = conv::ConvSpec { padding: p.padding, stride: p.stride, dilation: p.dilation };
                Ok(Some(conv::conv2d_bias(x, &self.weight, b, spec, relu)?))
            }
            _ => Ok(None),
        }
    }
}

impl Module for Conv2d {
    /// (N, C_in, H, W) -> (N, C_out, H', W').
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.fused(x, false)? {
            return Ok(y);
        }
        let y = ops::conv2d(x, &self.weight, self.params)?;
        match &self.bias {
            Some(b) => fused::add_channel_bias(&y, b),
            None => Ok(y),
        }
    }
}

/// Batch normalisation over channels: train mode normalises with the batch's statistics and
/// updates the running ones (momentum 0.1, unbiased variance, as PyTorch), eval mode uses the
/// running ones. Names follow PyTorch: weight, bias, running_mean, running_var. The work is done
/// by [`fused::batch_norm`]: one pass for the statistics, one for the output, and a two-pass
/// backward, with an optional ReLU folded in ([`BatchNorm::forward_relu_t`]).
#[derive(Debug, Clone)]
pub struct BatchNorm {
    /// Per-channel scale (gamma).
    pub weight: Tensor,
    /// Per-channel shift (beta).
    pub bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    /// The running mean.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// The running (unbiased) variance.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// Normalises `x` (N, C, ...), in train or eval mode.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.run(x, train, false)
    }

    /// `relu(batch_norm(x))` in one pass forward and two backward.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.run(x, train, true)
    }

    /// `batch_norm(conv(x))` (then a ReLU when `relu`), as one graph node where the convolution
    /// has no bias and one group ([`fused::conv_batch_norm`]); else the two layers in turn.
    pub fn forward_conv_t(&self, conv: &Conv2d, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let Some(spec) = fusable_spec(conv) else {
            return self.run(&conv.forward(x)?, train, relu);
        };
        let fixed = self.fixed(train);
        let (y, stats) =
            fused::conv_batch_norm(x, &conv.weight, spec, &self.weight, &self.bias, fixed, self.eps, relu)?;
        self.update_running(stats)?;
        Ok(y)
    }

    /// `relu(batch_norm(conv(x)) + residual)`, the end of a residual block, as one graph node
    /// where the convolution has no bias and one group; else the layers in turn.
    pub fn forward_conv_add_relu_t(&self, conv: &Conv2d, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        let Some(spec) = fusable_spec(conv) else {
            return self.forward_add_relu_t(&conv.forward(x)?, residual, train);
        };
        let fixed = self.fixed(train);
        let (y, stats) = fused::conv_batch_norm_add_relu(
            x,
            &conv.weight,
            spec,
            &self.weight,
            &self.bias,
            residual,
            fixed,
            self.eps,
        )?;
        self.update_running(stats)?;
        Ok(y)
    }

    /// `relu(batch_norm(x) + residual)`, the end of a residual block, in one pass forward.
    pub fn forward_add_relu_t(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        let (y, stats) =
            fused::batch_norm_add_relu(x, &self.weight, &self.bias, residual, self.fixed(train), self.eps)?;
        self.update_running(stats)?;
        Ok(y)
    }

    fn run(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let (y, stats) = fused::batch_norm(x, &self.weight, &self.bias, self.fixed(train), self.eps, relu)?;
        self.update_running(stats)?;
        Ok(y)
    }

    /// The running statistics in eval mode; none (use the batch's) in train mode.
    fn fixed(&self, train: bool) -> Option<(&Tensor, &Tensor)> {
        (!train).then(|| (self.running_mean.as_tensor(), self.running_var.as_tensor()))
    }

    /// Moves the running averages towards a training batch's statistics.
    /// Tensor arithmetic on the running averages' own device: nothing is read back to the host.
    fn update_running(&self, stats: Option<fused::BatchStats>) -> Result<()> {
        if let Some(st) = stats {
            let count = st.count();
            let unbias = if count > 1 { count as f64 / (count - 1) as f64 } else { 1.0 };
            let m = self.momentum;
            let (mean, var) = st.tensors(self.running_mean.device())?;
            for (run, batch, k) in [(&self.running_mean, &mean, 1.0), (&self.running_var, &var, unbias)] {
                let old = run.as_tensor().to_dtype(DType::F64)?.flatten_all()?;
                let new = (old.affine(1.0 - m, 0.0)? + batch.affine(m * k, 0.0)?)?;
                run.set(&new.reshape(run.shape())?.to_dtype(run.dtype())?)?;
            }
        }
        Ok(())
    }
}

/// The geometry of a convolution that [`fused::conv_batch_norm`] can take (no bias, one group).
fn fusable_spec(conv: &Conv2d) -> Option<derm_kernels::conv::ConvSpec> {
    let p = conv.params;
    (conv.bias.is_none() && p.groups == 1).then_some(derm_kernels::conv::ConvSpec {
        padding: p.padding,
        stride: p.stride,
        dilation: p.dilation,
    })
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        BatchNorm::forward_t(self, x, train)
    }
}

/// A [`BatchNorm`] over `c` channels under `vb` (weight 1, bias 0, running mean 0 and variance 1
/// unless `vb` already holds them), eps 1e-5, momentum 0.1.
pub fn batch_norm(c: usize, vb: VarBuilder) -> Result<BatchNorm> {
    let weight = vb.get_with_hints(c, "weight", Init::Const(1.0))?;
    let bias = vb.get_with_hints(c, "bias", Init::Const(0.0))?;
    let running_mean = Var::from_tensor(&vb.get_with_hints(c, "running_mean", Init::Const(0.0))?)?;
    let running_var = Var::from_tensor(&vb.get_with_hints(c, "running_var", Init::Const(1.0))?)?;
    Ok(BatchNorm { weight, bias, running_mean, running_var, eps: 1e-5, momentum: 0.1 })
}

/// Batch norm with weights initialised N(1, 0.02) and zero bias (DCGAN).
pub fn batch_norm_dcgan(c: usize, vb: VarBuilder) -> Result<BatchNorm> {
    vb.get_with_hints(c, "weight", Init::Randn { mean: 1.0, stdev: 0.02 })?;
    batch_norm(c, vb)
}

/// Applies a batch norm in train or eval mode.
pub fn bn(bn: &BatchNorm, x: &Tensor, train: bool) -> Result<Tensor> {
    bn.forward_t(x, train)
}

/// Applies a batch norm and a ReLU, fused.
pub fn bn_relu(bn: &BatchNorm, x: &Tensor, train: bool) -> Result<Tensor> {
    bn.forward_relu_t(x, train)
}

/// Number of trained parameters of the variables whose name starts with `prefix` (`""`: all),
/// batch-norm running statistics excluded.
pub fn parameter_count(vm: &VarMap, prefix: &str) -> usize {
    crate::checkpoint::sorted_vars(vm)
        .iter()
        .filter(|(k, _)| k.starts_with(prefix) && !crate::optim::is_buffer(k))
        .map(|(_, v)| v.elem_count())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three Adam steps (gradient clipping on) of a small network with every kind of layer the
    /// stages use: convolution + batch norm + ReLU, max pooling, a convolution with bias and ReLU,
    /// average pooling, nearest and bilinear resizing, BCE. Returns every variable after them.
    fn three_steps() -> Vec<(String, Vec<f32>)> {
        use crate::optim::{OptimConfig, Optimizer, OptimizerKind};
        use derm_kernels::ops::{Pool2d, ResizeMode};
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 3, DType::F32, &Device::Cpu);
        let no_bias = Conv2dConfig { bias: false, ..Conv2dConfig::same(3, 1) };
        let c1 = conv2d(3, 8, 3, no_bias, vb.pp("c1")).unwrap();
        let bn1 = batch_norm(8, vb.pp("bn1")).unwrap();
        let c2 = conv2d(8, 4, 3, Conv2dConfig::same(3, 2), vb.pp("c2")).unwrap();
        let mut rng = crate::Rng::new(9);
        let x = Tensor::from_vec(rng.normal_vec(4 * 3 * 12 * 10, 0.0, 1.0), (4, 3, 12, 10), &Device::Cpu).unwrap();
        let t = Tensor::from_vec(rng.uniform_vec(4 * 12 * 10, 0.0, 1.0), (4, 1, 12, 10), &Device::Cpu).unwrap();
        let cfg = OptimConfig { optimizer: OptimizerKind::adam(1e-2), clip_grad_norm: Some(0.5), ..Default::default() };
        let mut opt = Optimizer::new(crate::checkpoint::sorted_vars(&vm), cfg);
        for _ in 0..3 {
            let h = bn1.forward_conv_t(&c1, &x, true, true).unwrap();
            let h = ops::max_pool2d(&h, Pool2d::square(3, 2, 1)).unwrap();
            let h = c2.forward_relu(&h).unwrap();
            let h = ops::avg_pool2d(&h, Pool2d::square(3, 1, 1)).unwrap();
            let h = ops::upsample_nearest(&h, 2).unwrap();
            let h = ops::resize2d(&h, 12, 10, ResizeMode::Bilinear).unwrap();
            let loss = ops::bce_with_logits(&h.narrow(1, 0, 1).unwrap(), &t).unwrap();
            opt.backward_step(&loss).unwrap();
        }
        crate::checkpoint::sorted_vars(&vm)
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect()
    }

    #[test]
    fn training_steps_on_the_device_path_equal_the_cpu_kernels() {
        let cpu = three_steps();
        let dev = ops::with_device_path(three_steps);
        // Other kernels sum in another order: bit-identical results would mean the forcing failed.
        assert!(cpu != dev, "the device path was not taken");
        assert_eq!(cpu.len(), 7, "{:?}", cpu.iter().map(|v| &v.0).collect::<Vec<_>>());
        for ((name, a), (_, b)) in cpu.iter().zip(&dev) {
            let scale = a.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(diff < 1e-4 * scale, "{name}: CPU kernels and device path differ by {diff} (scale {scale})");
        }
    }

    #[test]
    fn same_seed_same_weights_whatever_the_order() {
        let a = VarMap::new();
        let vb = seeded_var_builder(&a, 3, DType::F32, &Device::Cpu);
        let x1 = vb.get_with_hints((4, 2), "x", Init::Randn { mean: 0.0, stdev: 1.0 }).unwrap();
        let y1 = vb.get_with_hints(5, "y", Init::Uniform { lo: 0.0, up: 1.0 }).unwrap();
        let b = VarMap::new();
        let vb = seeded_var_builder(&b, 3, DType::F32, &Device::Cpu);
        let y2 = vb.get_with_hints(5, "y", Init::Uniform { lo: 0.0, up: 1.0 }).unwrap();
        let x2 = vb.get_with_hints((4, 2), "x", Init::Randn { mean: 0.0, stdev: 1.0 }).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&x1), v(&x2));
        assert_eq!(v(&y1), v(&y2));
        let c = VarMap::new();
        let vb = seeded_var_builder(&c, 4, DType::F32, &Device::Cpu);
        let x3 = vb.get_with_hints((4, 2), "x", Init::Randn { mean: 0.0, stdev: 1.0 }).unwrap();
        assert_ne!(v(&x1), v(&x3));
    }

    #[test]
    fn batch_norm_running_statistics_follow_pytorch() {
        // One train step moves the running mean by 0.1 of the batch mean and the running variance
        // to 0.9 + 0.1 * the unbiased batch variance; eval mode then normalises with them.
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F64, &Device::Cpu);
        let bn = batch_norm(2, vb.pp("bn")).unwrap();
        let v = [1.0, 2.0, 3.0, 6.0, -1.0, 0.0, 1.0, 4.0];
        let x = Tensor::from_vec(v.to_vec(), (2, 2, 2, 1), &Device::Cpu).unwrap();
        let y = bn.forward_t(&x, true).unwrap();
        // Channel 0 holds 1, 2, -1, 0; channel 1 holds 3, 6, 1, 4.
        let (m0, m1) = (0.5, 3.5);
        let (uv0, uv1) = ((0.25 + 2.25 + 2.25 + 0.25) / 3.0, (0.25 + 6.25 + 6.25 + 0.25) / 3.0);
        let rm: Vec<f64> = bn.running_mean().to_vec1().unwrap();
        let rv: Vec<f64> = bn.running_var().to_vec1().unwrap();
        assert!((rm[0] - 0.1 * m0).abs() < 1e-12 && (rm[1] - 0.1 * m1).abs() < 1e-12, "{rm:?}");
        assert!((rv[0] - (0.9 + 0.1 * uv0)).abs() < 1e-12 && (rv[1] - (0.9 + 0.1 * uv1)).abs() < 1e-12, "{rv:?}");
        // Train output: zero mean per channel.
        let ym = y.mean_keepdim(0).unwrap().mean_keepdim(2).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(ym.iter().all(|m| m.abs() < 1e-9), "{ym:?}");
        let e = bn.forward_t(&x, false).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let want0 = (1.0 - rm[0]) / (rv[0] + 1e-5).sqrt();
        assert!((e[0] - want0).abs() < 1e-9, "{} vs {want0}", e[0]);
        // The running statistics are buffers, not trained parameters, and keep PyTorch's names.
        let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        for n in ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"] {
            assert!(names.iter().any(|k| k == n), "{n} in {names:?}");
        }
    }

    #[test]
    fn conv_layer_shapes_at_odd_sizes() {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let c = conv2d(3, 8, 3, Conv2dConfig::same(3, 2), vb.pp("c")).unwrap();
        let x = Tensor::zeros((2, 3, 17, 23), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(c.forward(&x).unwrap().dims(), &[2, 8, 17, 23]);
        let s = conv2d(
            3,
            4,
            3,
            Conv2dConfig { params: ConvParams { padding: 1, stride: 2, ..Default::default() }, ..Default::default() },
            vb.pp("s"),
        )
        .unwrap();
        assert_eq!(s.forward(&x).unwrap().dims(), &[2, 4, 9, 12]);
        assert!(vm.data().lock().unwrap().contains_key("c.weight"));
    }
}
