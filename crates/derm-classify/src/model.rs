//! A trainable ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).
//!
//! Basic blocks (ResNet-18/34) and bottleneck blocks (ResNet-50/101, stride on the 3x3
//! convolution as torchvision's "v1.5") come from the same code. Unlike candle-transformers'
//! inference-only ResNet, batch norm runs in training mode when asked, the stem's 3x3/2 max
//! pooling has a correct gradient ([`derm_kernels::ops::max_pool2d`]), and every stage's feature map
//! is returned by [`ResNet::forward_features`] (VisualBackProp needs them).
//!
//! Variable names are torchvision's state-dict keys, so ImageNet weights converted from
//! torchvision or timm to safetensors load unchanged: `conv1.weight`,
//! `bn1.{weight,bias,running_mean,running_var}`, `layerX.Y.convK.weight`, `layerX.Y.bnK.*`,
//! `layerX.Y.downsample.0.weight`, `layerX.Y.downsample.1.*`, `fc.{weight,bias}`; convolutions
//! have no bias. [`load_torchvision`] loads such a file, optionally replacing the classifier head.

use std::path::Path;

use candle_core::{Result, Tensor};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::{Init, VarBuilder, VarMap};
use derm_core::checkpoint::{self, Strictness};
use derm_core::nn::{batch_norm, conv2d, torch_default_init, BatchNorm, Conv2d, Conv2dConfig};
use derm_kernels::ops::{self, ConvParams, Pool2d};
use serde::{Deserialize, Serialize};

/// Residual block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34), expansion 1.
    Basic,
    /// 1x1, 3x3, 1x1 convolutions (ResNet-50/101/152), expansion 4.
    Bottleneck,
}

impl BlockKind {
    /// Output channels per stage width.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// A network stage, in forward order; `trainable_from` names the first one that is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The stem: `conv1`, `bn1` (training from here trains everything).
    Conv1,
    /// `layer1`.
    Layer1,
    /// `layer2`.
    Layer2,
    /// `layer3`.
    Layer3,
    /// `layer4`.
    Layer4,
    /// The classifier `fc`.
    Fc,
}

impl Stage {
    /// The stage a variable belongs to, from its name (`None` for a name of no stage).
    pub fn of_var(name: &str) -> Option<Stage> {
        let head = name.split('.').next().unwrap_or("");
        match head {
            "conv1" | "bn1" => Some(Stage::Conv1),
            "layer1" => Some(Stage::Layer1),
            "layer2" => Some(Stage::Layer2),
            "layer3" => Some(Stage::Layer3),
            "layer4" => Some(Stage::Layer4),
            "fc" => Some(Stage::Fc),
            _ => None,
        }
    }

    /// The stage's name as configs and the command line spell it: `conv1`, `layer1` .. `layer4`,
    /// `fc`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Conv1 => "conv1",
            Stage::Layer1 => "layer1",
            Stage::Layer2 => "layer2",
            Stage::Layer3 => "layer3",
            Stage::Layer4 => "layer4",
            Stage::Fc => "fc",
        }
    }

    /// Parses `conv1`, `layer1` .. `layer4`, `fc`.
    pub fn parse(s: &str) -> Option<Stage> {
        Stage::of_var(s).filter(|_| !s.contains('.'))
    }

    fn layer_index(self) -> Option<usize> {
        match self {
            Stage::Layer1 => Some(0),
            Stage::Layer2 => Some(1),
            Stage::Layer3 => Some(2),
            Stage::Layer4 => Some(3),
            _ => None,
        }
    }
}

/// Shape of a ResNet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResNetConfig {
    /// Block type.
    pub block: BlockKind,
    /// Blocks in each of the four stages (ResNet-50: 3, 4, 6, 3).
    pub layers: [usize; 4],
    /// Width of the stem and of the first stage (64 in every torchvision ResNet); stage k has
    /// `base_width * 2^k` (times the expansion at its output). Smaller values give CPU-sized
    /// networks of the same layout (their weights are not torchvision's).
    pub base_width: usize,
    /// Output classes of the `fc` head.
    pub num_classes: usize,
    /// Input channels (3 for RGB).
    pub in_channels: usize,
    /// Initialise the last batch norm of each residual branch to zero, so each block starts as
    /// the identity (torchvision's `zero_init_residual`; helps training from scratch).
    pub zero_init_residual: bool,
    /// Space-to-depth factor `f` of the stem. 1: torchvision's stem, a 7x7/2 convolution on the
    /// image. `f` > 1: each `f` x `f` block of pixels first becomes `f^2` times the channels at
    /// 1/`f` of the size (a pixel unshuffle, as TResNet's stem), then a 3x3/2 convolution: the
    /// network sees `f` times the pixels of a view at about the cost of the smaller view, and the
    /// stem's output is at 1/(2`f`) of the input. Input sizes must be multiples of `f`; such a
    /// network has no torchvision weights. On held-out ISIC images, 224 px views with `f` = 2
    /// scored -0.008 and -0.001 mean AUC against 128 px with torchvision's stem after 40 CPU
    /// minutes (two seeds, BENCHMARKS.md), so the presets keep 1.
    pub space_to_depth: usize,
}

impl Default for ResNetConfig {
    /// ResNet-50 with the three ISIC 2017 classes, as the paper.
    fn default() -> Self {
        ResNetConfig::resnet50(3)
    }
}

impl ResNetConfig {
    fn preset(block: BlockKind, layers: [usize; 4], num_classes: usize) -> Self {
        ResNetConfig {
            block,
            layers,
            base_width: 64,
            num_classes,
            in_channels: 3,
            zero_init_residual: false,
            space_to_depth: 1,
        }
    }
    /// ResNet-18: basic blocks 2, 2, 2, 2.
    pub fn resnet18(num_classes: usize) -> Self {
        Self::preset(BlockKind::Basic, [2, 2, 2, 2], num_classes)
    }
    /// ResNet-34: basic blocks 3, 4, 6, 3.
    pub fn resnet34(num_classes: usize) -> Self {
        Self::preset(BlockKind::Basic, [3, 4, 6, 3], num_classes)
    }
    /// ResNet-50: bottleneck blocks 3, 4, 6, 3 (the paper's classifier).
    pub fn resnet50(num_classes: usize) -> Self {
        Self::preset(BlockKind::Bottleneck, [3, 4, 6, 3], num_classes)
    }
    /// ResNet-101: bottleneck blocks 3, 4, 23, 3.
    pub fn resnet101(num_classes: usize) -> Self {
        Self::preset(BlockKind::Bottleneck, [3, 4, 23, 3], num_classes)
    }
    /// A preset by name: `resnet18`, `resnet34`, `resnet50`, `resnet101`.
    pub fn by_name(name: &str, num_classes: usize) -> Option<Self> {
        match name {
            "resnet18" => Some(Self::resnet18(num_classes)),
            "resnet34" => Some(Self::resnet34(num_classes)),
            "resnet50" => Some(Self::resnet50(num_classes)),
            "resnet101" => Some(Self::resnet101(num_classes)),
            _ => None,
        }
    }
    /// The architecture's name (`resnet50`, or `resnet18-w16` for a reduced width, `resnet-custom`
    /// for other layouts).
    pub fn name(&self) -> String {
        let base = match (self.block, self.layers) {
            (BlockKind::Basic, [2, 2, 2, 2]) => "resnet18",
            (BlockKind::Basic, [3, 4, 6, 3]) => "resnet34",
            (BlockKind::Bottleneck, [3, 4, 6, 3]) => "resnet50",
            (BlockKind::Bottleneck, [3, 4, 23, 3]) => "resnet101",
            (BlockKind::Bottleneck, [3, 8, 36, 3]) => "resnet152",
            _ => "resnet-custom",
        };
        let mut name = base.to_string();
        if self.base_width != 64 {
            name.push_str(&format!("-w{}", self.base_width));
        }
        if self.space_to_depth > 1 {
            name.push_str(&format!("-s2d{}", self.space_to_depth));
        }
        name
    }
    /// Channels of the pooled features (the input of `fc`): 512 for ResNet-18/34, 2048 for 50/101.
    pub fn feature_dim(&self) -> usize {
        self.base_width * 8 * self.block.expansion()
    }
}

fn kaiming_conv(c_in: usize, c_out: usize, k: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Conv2d> {
    // torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), no bias.
    let init =
        Init::Kaiming { dist: NormalOrUniform::Normal, fan: FanInOut::FanOut, non_linearity: NonLinearity::ReLU };
    let cfg =
        Conv2dConfig { params: ConvParams { padding, stride, dilation: 1, groups: 1 }, bias: false, init: Some(init) };
    conv2d(c_in, c_out, k, cfg, vb)
}

fn bn_zero(c: usize, zero: bool, vb: VarBuilder) -> Result<BatchNorm> {
    if zero {
        vb.get_with_hints(c, "weight", Init::Const(0.0))?;
    }
    batch_norm(c, vb)
}

/// A residual block (basic or bottleneck).
#[derive(Debug, Clone)]
struct Block {
    convs: Vec<(Conv2d, BatchNorm)>,
    downsample: Option<(Conv2d, BatchNorm)>,
}

impl Block {
    fn new(kind: BlockKind, c_in: usize, width: usize, stride: usize, zero: bool, vb: VarBuilder) -> Result<Self> {
        let c_out = width * kind.expansion();
        let specs: Vec<(usize, usize, usize, usize, usize)> = match kind {
            // (c_in, c_out, kernel, stride, padding)
            BlockKind::Basic => vec![(c_in, width, 3, stride, 1), (width, width, 3, 1, 1)],
            BlockKind::Bottleneck => {
                vec![(c_in, width, 1, 1, 0), (width, width, 3, stride, 1), (width, c_out, 1, 1, 0)]
            }
        };
        let last = specs.len();
        let mut convs = Vec::with_capacity(last);
        for (k, &(i, o, ks, s, p)) in specs.iter().enumerate() {
            let c = kaiming_conv(i, o, ks, s, p, vb.pp(format!("conv{}", k + 1)))?;
            let b = bn_zero(o, zero && k + 1 == last, vb.pp(format!("bn{}", k + 1)))?;
            convs.push((c, b));
        }
        let downsample = if stride != 1 || c_in != c_out {
            let vd = vb.pp("downsample");
            Some((kaiming_conv(c_in, c_out, 1, stride, 0, vd.pp("0"))?, batch_norm(c_out, vd.pp("1"))?))
        } else {
            None
        };
        Ok(Block { convs, downsample })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.clone();
        let last = self.convs.len() - 1;
        let identity = match &self.downsample {
            Some((c, b)) => b.forward_conv_t(c, x, train, false)?,
            None => x.clone(),
        };
        for (k, (c, b)) in self.convs.iter().enumerate() {
            y = if k != last {
                b.forward_conv_t(c, &y, train, true)?
            } else {
                b.forward_conv_add_relu_t(c, &y, &identity, train)?
            };
        }
        Ok(y)
    }
}

/// The classifier head: a linear layer (`fc.weight` (K, C), `fc.bias` (K,)).
#[derive(Debug, Clone)]
pub struct Head {
    weight: Tensor,
    bias: Tensor,
}

impl Head {
    fn new(c_in: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let init = torch_default_init(c_in);
        let weight = vb.get_with_hints((k, c_in), "weight", init)?;
        let bias = vb.get_with_hints(k, "bias", init)?;
        Ok(Head { weight, bias })
    }

    /// Logits (N, K) from pooled features (N, C).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// Every stage's output of one forward pass.
#[derive(Debug, Clone)]
pub struct ResNetFeatures {
    /// `relu(bn1(conv1(x)))`, (N, base_width, H/2, W/2) (H/(2f) with a space-to-depth factor
    /// f), before the max pooling.
    pub stem: Tensor,
    /// Outputs of `layer1` .. `layer4`: (N, C_k, H/4, W/4), (H/8), (H/16), (H/32) (rounded up;
    /// each f times smaller with a space-to-depth factor f), with C_k = `base_width * 2^k *
    /// expansion`.
    pub layers: Vec<Tensor>,
    /// Global average of `layer4`, (N, feature_dim).
    pub pooled: Tensor,
    /// Class logits, (N, num_classes).
    pub logits: Tensor,
}

/// The ResNet.
#[derive(Debug, Clone)]
pub struct ResNet {
    cfg: ResNetConfig,
    conv1: Conv2d,
    bn1: BatchNorm,
    layers: Vec<Vec<Block>>,
    fc: Head,
}

impl ResNet {
    /// Builds the network under `vb` with torchvision's variable names.
    pub fn new(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.base_width == 0 || cfg.num_classes == 0 || cfg.layers.contains(&0) || cfg.space_to_depth == 0 {
            candle_core::bail!(
                "resnet: base_width, num_classes, space_to_depth and every stage's block count must be positive, got {cfg:?}"
            )
        }
        let f = cfg.space_to_depth;
        let conv1 = if f == 1 {
            kaiming_conv(cfg.in_channels, cfg.base_width, 7, 2, 3, vb.pp("conv1"))?
        } else {
            kaiming_conv(cfg.in_channels * f * f, cfg.base_width, 3, 2, 1, vb.pp("conv1"))?
        };
        let bn1 = batch_norm(cfg.base_width, vb.pp("bn1"))?;
        let mut c = cfg.base_width;
        let mut layers = Vec::with_capacity(4);
        for (i, &n) in cfg.layers.iter().enumerate() {
            let width = cfg.base_width << i;
            let stride = if i == 0 { 1 } else { 2 };
            let vl = vb.pp(format!("layer{}", i + 1));
            let mut blocks = Vec::with_capacity(n);
            for j in 0..n {
                blocks.push(Block::new(
                    cfg.block,
                    c,
                    width,
                    if j == 0 { stride } else { 1 },
                    cfg.zero_init_residual,
                    vl.pp(j.to_string()),
                )?);
                c = width * cfg.block.expansion();
            }
            layers.push(blocks);
        }
        let fc = Head::new(c, cfg.num_classes, vb.pp("fc"))?;
        Ok(ResNet { cfg: cfg.clone(), conv1, bn1, layers, fc })
    }

    /// The configuration.
    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// The classifier head.
    pub fn head(&self) -> &Head {
        &self.fc
    }

    /// Logits (N, num_classes) for images (N, 3, H, W) normalised with ImageNet statistics, any H
    /// and W of at least 32. `train` puts every batch norm in training mode (batch statistics,
    /// running statistics updated).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.fc.forward(&self.pooled(x, train, Stage::Conv1)?)
    }

    /// Pooled features (N, feature_dim). The stages before `trainable_from` run with batch norm in
    /// eval mode and their output is detached, so no gradient flows into them; the rest run with
    /// `train`.
    pub fn pooled(&self, x: &Tensor, train: bool, trainable_from: Stage) -> Result<Tensor> {
        self.features_tap(x, train, trainable_from, None)?.0.mean((2, 3))
    }

    /// The output of `layer4` (N, C, H/32, W/32, rounded up) before pooling (trainable from
    /// `trainable_from`, as [`ResNet::pooled`]), with the output of stage `tap` (`layer1` ..
    /// `layer4`; `None` for any other stage or none) in the same graph: a loss on it trains the
    /// stages up to it. The auxiliary lesion-mask head reads its stage this way ([`crate::aux`]).
    pub fn features_tap(
        &self,
        x: &Tensor,
        train: bool,
        trainable_from: Stage,
        tap: Option<Stage>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let taps: Vec<Stage> = tap.filter(|s| s.layer_index().is_some()).into_iter().collect();
        let (last, mut tapped) = self.features_taps(x, train, trainable_from, &taps)?;
        Ok((last, tapped.pop()))
    }

    /// [`ResNet::features_tap`] for several stages at once: the output of each of `taps`, in
    /// their order, beside `layer4`'s; an error names a stage that is not `layer1` .. `layer4`.
    pub fn features_taps(
        &self,
        x: &Tensor,
        train: bool,
        trainable_from: Stage,
        taps: &[Stage],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        if let Some(s) = taps.iter().find(|s| s.layer_index().is_none()) {
            candle_core::bail!("the network has no {} to tap", s.name());
        }
        let t = |s: Stage| train && s >= trainable_from;
        let mut y = self.stem(x, t(Stage::Conv1))?;
        y = ops::max_pool2d(&y, Pool2d::square(3, 2, 1))?;
        if trainable_from > Stage::Conv1 {
            y = y.detach();
        }
        let mut tapped = vec![None; taps.len()];
        for (i, blocks) in self.layers.iter().enumerate() {
            let stage = [Stage::Layer1, Stage::Layer2, Stage::Layer3, Stage::Layer4][i];
            for b in blocks {
                y = b.forward(&y, t(stage))?;
            }
            if trainable_from > stage {
                y = y.detach();
            }
            for (slot, _) in tapped.iter_mut().zip(taps).filter(|(_, &s)| s == stage) {
                *slot = Some(y.clone());
            }
        }
        Ok((y, tapped.into_iter().flatten().collect()))
    }

    /// Channels of stage `stage`'s output (`layer1` .. `layer4`; the stem's width otherwise).
    pub fn stage_channels(&self, stage: Stage) -> usize {
        match stage.layer_index() {
            Some(i) => (self.cfg.base_width << i) * self.cfg.block.expansion(),
            None => self.cfg.base_width,
        }
    }

    /// Logits with only the stages from `trainable_from` on trainable (see [`ResNet::pooled`]).
    pub fn forward_from(&self, x: &Tensor, train: bool, trainable_from: Stage) -> Result<Tensor> {
        self.fc.forward(&self.pooled(x, train, trainable_from)?)
    }

    fn stem(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let f = self.cfg.space_to_depth;
        if f == 1 {
            return self.bn1.forward_conv_t(&self.conv1, x, train, true);
        }
        let (_, _, h, w) = x.dims4()?;
        if !h.is_multiple_of(f) || !w.is_multiple_of(f) {
            candle_core::bail!("resnet: a {h}x{w} input is not a multiple of the stem's space-to-depth factor {f}")
        }
        self.bn1.forward_conv_t(&self.conv1, &candle_nn::ops::pixel_unshuffle(x, f)?, train, true)
    }

    /// The forward pass keeping every stage's output (see [`ResNetFeatures`] for the shapes).
    pub fn forward_features(&self, x: &Tensor, train: bool) -> Result<ResNetFeatures> {
        let stem = self.stem(x, train)?;
        let mut y = ops::max_pool2d(&stem, Pool2d::square(3, 2, 1))?;
        let mut layers = Vec::with_capacity(4);
        for blocks in &self.layers {
            for b in blocks {
                y = b.forward(&y, train)?;
            }
            layers.push(y.clone());
        }
        let pooled = y.mean((2, 3))?;
        let logits = self.fc.forward(&pooled)?;
        Ok(ResNetFeatures { stem, layers, pooled, logits })
    }

    /// The index of a stage's output in [`ResNetFeatures::layers`] (`layer1` is 0, `layer4` is
    /// 3); `None` for `conv1` (see [`ResNetFeatures::stem`]) and `fc`.
    pub fn stage_index(stage: Stage) -> Option<usize> {
        stage.layer_index()
    }
}

/// Whether variable `name` is trained when training starts at `from` (batch-norm buffers are
/// never trained; the optimiser drops them itself). The lesion-mask head's variables
/// ([`crate::aux`]) train whenever the backbone does: a config whose head reads a stage before
/// `from` is refused ([`crate::ClassifyConfig::aux_mask_blocker`]).
pub fn is_trainable(name: &str, from: Stage) -> bool {
    match Stage::of_var(name) {
        Some(s) => s >= from,
        None => crate::aux::is_head_var(name) && from < Stage::Fc,
    }
}

/// Loads torchvision-named weights (a torchvision or timm ResNet state dict converted to
/// safetensors, as `bench/peer/export_torchvision.py` writes) into a model's variables, unchanged.
///
/// - Every model variable must be in the file with the model's shape: a missing or mis-shaped
///   tensor is an error naming it and the file. The auxiliary lesion-mask head
///   ([`crate::aux`]), derm's own, keeps its fresh initialisation.
/// - With `replace_head`, the file's `fc.*` (ImageNet's 1000 classes) is ignored and the model's
///   own freshly initialised head of N classes is kept.
/// - Batch norm: `weight`, `bias`, `running_mean` and `running_var` are loaded and eval mode uses
///   the running statistics with eps 1e-5, as PyTorch. `num_batches_tracked` (an int64 scalar per
///   batch norm) is ignored on purpose: PyTorch only reads it when `momentum=None`, and derm's
///   batch norm uses torchvision's fixed momentum 0.1 (see
///   [`derm_core::checkpoint::is_torch_bookkeeping`]).
/// - Any other tensor in the file that the model does not have is an error (a ResNet-34 file
///   given to a ResNet-18 would otherwise load its first blocks and silently drop the rest).
pub fn load_torchvision(varmap: &VarMap, path: &Path, replace_head: bool) -> derm_core::Result<()> {
    // The auxiliary lesion-mask head is derm's own; no torchvision file has it.
    let skip = |n: &str| (replace_head && n.starts_with("fc.")) || crate::aux::is_head_var(n);
    checkpoint::load_varmap(varmap, path, Strictness::Exact, skip)
}

/// Number of trained parameters in a VarMap (batch-norm running statistics excluded).
pub fn parameter_count(varmap: &VarMap) -> usize {
    derm_core::nn::parameter_count(varmap, "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    fn build(cfg: &ResNetConfig, seed: u64) -> (VarMap, ResNet) {
        let vm = VarMap::new();
        let vb = derm_core::nn::seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
        let net = ResNet::new(cfg, vb).unwrap();
        (vm, net)
    }

    fn tiny(block: BlockKind) -> ResNetConfig {
        ResNetConfig {
            block,
            layers: [1, 1, 1, 1],
            base_width: 4,
            num_classes: 3,
            in_channels: 3,
            zero_init_residual: false,
            space_to_depth: 1,
        }
    }

    fn input(n: usize, h: usize, w: usize, seed: u64) -> Tensor {
        let mut r = derm_core::Rng::new(seed);
        Tensor::from_vec(r.normal_vec(n * 3 * h * w, 0.0, 1.0), (n, 3, h, w), &Device::Cpu).unwrap()
    }

    #[test]
    fn parameter_counts_match_torchvision() {
        // torchvision.models.resnet50(num_classes=3) and resnet18() (1000 classes).
        let (vm, net) = build(&ResNetConfig::resnet50(3), 0);
        assert_eq!(parameter_count(&vm), 23_514_179);
        // The full-width network runs at an odd size too.
        let f = net.forward_features(&input(1, 65, 71, 0), false).unwrap();
        assert_eq!(f.layers[3].dims(), &[1, 2048, 3, 3]);
        assert_eq!(f.logits.dims(), &[1, 3]);
        // torchvision's 320 state-dict keys less the 53 `num_batches_tracked`.
        assert_eq!(checkpoint::sorted_vars(&vm).len(), 267);
        let (vm, _) = build(&ResNetConfig::resnet18(1000), 0);
        assert_eq!(parameter_count(&vm), 11_689_512);
    }

    #[test]
    fn shapes_of_every_stage_at_even_and_odd_sizes() {
        for (cfg, c4) in [
            (ResNetConfig { base_width: 8, ..ResNetConfig::resnet18(3) }, 64),
            (ResNetConfig { base_width: 4, ..ResNetConfig::resnet50(3) }, 128),
        ] {
            let (_, net) = build(&cfg, 1);
            for (h, w) in [(64, 64), (65, 71)] {
                let x = input(2, h, w, 2);
                let f = net.forward_features(&x, true).unwrap();
                let half = |v: usize| v.div_ceil(2);
                assert_eq!(f.stem.dims(), &[2, cfg.base_width, half(h), half(w)]);
                let (mut eh, mut ew) = (half(half(h)), half(half(w)));
                for (k, l) in f.layers.iter().enumerate() {
                    if k > 0 {
                        (eh, ew) = (half(eh), half(ew));
                    }
                    let c = (cfg.base_width << k) * cfg.block.expansion();
                    assert_eq!(l.dims(), &[2, c, eh, ew], "stage {k} at {h}x{w}");
                }
                assert_eq!(f.pooled.dims(), &[2, c4]);
                assert_eq!(f.logits.dims(), &[2, 3]);
                assert_eq!(net.forward_t(&x, false).unwrap().dims(), &[2, 3]);
            }
        }
    }

    #[test]
    fn torchvision_names_round_trip_and_head_replacement() {
        let d = tempfile::tempdir().unwrap();
        let cfg = tiny(BlockKind::Bottleneck);
        let (vm_a, net_a) = build(&cfg, 3);
        // A torchvision-style file: exactly the expected names, plus num_batches_tracked.
        let mut t: HashMap<String, Tensor> = HashMap::new();
        for (k, v) in checkpoint::sorted_vars(&vm_a) {
            if k.ends_with("running_var") {
                t.insert(k.replace("running_var", "num_batches_tracked"), Tensor::new(&[7i64], &Device::Cpu).unwrap());
            }
            t.insert(k, v.as_tensor().clone());
        }
        for k in [
            "conv1.weight",
            "bn1.running_mean",
            "layer1.0.conv3.weight",
            "layer1.0.bn3.bias",
            "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.running_var",
            "fc.weight",
            "fc.bias",
        ] {
            assert!(t.contains_key(k), "{k}");
        }
        let path = d.path().join("tv.safetensors");
        checkpoint::save_tensors(&t, &path).unwrap();
        let x = input(2, 40, 40, 4);
        let (vm_b, net_b) = build(&cfg, 99);
        let before = (net_a.forward_t(&x, false).unwrap() - net_b.forward_t(&x, false).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(before > 1e-4);
        load_torchvision(&vm_b, &path, false).unwrap();
        let diff = (net_a.forward_t(&x, false).unwrap() - net_b.forward_t(&x, false).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);

        // A 1000-class head (ImageNet) into a 3-class model: fc is skipped, the rest loads.
        let mut big = t.clone();
        big.insert("fc.weight".into(), Tensor::zeros((1000, cfg.feature_dim()), DType::F32, &Device::Cpu).unwrap());
        big.insert("fc.bias".into(), Tensor::zeros(1000, DType::F32, &Device::Cpu).unwrap());
        let p2 = d.path().join("imagenet.safetensors");
        checkpoint::save_tensors(&big, &p2).unwrap();
        let (vm_c, net_c) = build(&cfg, 5);
        let fc_before: Vec<f32> = net_c.head().weight.flatten_all().unwrap().to_vec1().unwrap();
        let e = load_torchvision(&vm_c, &p2, false).unwrap_err().to_string();
        assert!(e.contains("fc.bias") && e.contains("shape"), "{e}");
        load_torchvision(&vm_c, &p2, true).unwrap();
        let fc_after: Vec<f32> = net_c.head().weight.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(fc_before, fc_after);
        let a = net_a.pooled(&x, false, Stage::Conv1).unwrap();
        let c = net_c.pooled(&x, false, Stage::Conv1).unwrap();
        assert_eq!((a - c).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);

        // A missing tensor is named.
        let mut missing = t.clone();
        missing.remove("layer3.0.bn2.running_mean");
        let p3 = d.path().join("missing.safetensors");
        checkpoint::save_tensors(&missing, &p3).unwrap();
        let e = load_torchvision(&vm_c, &p3, true).unwrap_err().to_string();
        assert!(e.contains("layer3.0.bn2.running_mean") && e.contains("missing"), "{e}");
    }

    #[test]
    fn frozen_stages_get_no_gradient_and_keep_their_statistics() {
        let cfg = tiny(BlockKind::Basic);
        let (vm, net) = build(&cfg, 6);
        let x = input(4, 48, 48, 7);
        let y = Tensor::new(&[0u32, 1, 2, 0], &Device::Cpu).unwrap();
        let loss =
            derm_kernels::ops::cross_entropy(&net.forward_from(&x, true, Stage::Layer3).unwrap(), &y, None).unwrap();
        let grads = loss.backward().unwrap();
        let vars = checkpoint::sorted_vars(&vm);
        let get = |n: &str| vars.iter().find(|(k, _)| k == n).unwrap().1.clone();
        assert!(grads.get(get("layer3.0.conv1.weight").as_tensor()).is_some());
        assert!(grads.get(get("fc.weight").as_tensor()).is_some());
        assert!(grads.get(get("layer2.0.conv1.weight").as_tensor()).is_none());
        assert!(grads.get(get("conv1.weight").as_tensor()).is_none());
        let rm: Vec<f32> = get("layer1.0.bn1.running_mean").as_tensor().to_vec1().unwrap();
        assert!(rm.iter().all(|&v| v == 0.0), "a frozen stage's running mean moved: {rm:?}");
        let rm: Vec<f32> = get("layer4.0.bn1.running_mean").as_tensor().to_vec1().unwrap();
        assert!(rm.iter().any(|&v| v != 0.0));
        assert!(is_trainable("layer3.1.bn2.weight", Stage::Layer3));
        assert!(!is_trainable("bn1.weight", Stage::Layer1));
        assert_eq!(Stage::parse("layer3"), Some(Stage::Layer3));
        assert_eq!(Stage::parse("layer3.0"), None);
        for s in [Stage::Conv1, Stage::Layer1, Stage::Layer2, Stage::Layer3, Stage::Layer4, Stage::Fc] {
            assert_eq!(Stage::parse(s.name()), Some(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{}\"", s.name()));
        }
    }

    #[test]
    fn stem_max_pool_gradient_is_full() {
        // Gradient of sum(max_pool 3x3/2/1) of a ramp reaches each window's maximum with weight
        // equal to the number of windows it wins: never 1/9.
        let x = candle_core::Var::from_tensor(
            &Tensor::arange(0f32, 25.0, &Device::Cpu).unwrap().reshape((1, 1, 5, 5)).unwrap(),
        )
        .unwrap();
        let y = ops::max_pool2d(x.as_tensor(), Pool2d::square(3, 2, 1)).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx: Vec<f32> = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(gx.iter().sum::<f32>(), 9.0);
        for i in [6, 8, 9, 18, 21, 24] {
            assert_eq!(gx[i], 1.0, "{gx:?}");
        }
    }

    #[test]
    fn space_to_depth_stem_sees_a_six_pixel_window_at_stride_four() {
        let cfg = ResNetConfig { space_to_depth: 2, ..tiny(BlockKind::Basic) };
        let (vm, net) = build(&cfg, 3);
        let get = |n: &str| vm.data().lock().unwrap().get(n).unwrap().clone();
        assert_eq!(get("conv1.weight").dims(), &[4, 12, 3, 3]);
        let x = candle_core::Var::from_tensor(&input(1, 32, 24, 4)).unwrap();
        // Batch norm in eval mode: batch statistics would tie every output to every pixel.
        let f = net.forward_features(x.as_tensor(), false).unwrap();
        assert_eq!(f.stem.dims(), &[1, 4, 8, 6]);
        assert_eq!(f.layers[0].dims(), &[1, 4, 4, 3]);
        assert_eq!(f.layers[3].dims(), &[1, 32, 1, 1]);
        // One stem output at (row 3, col 2) reads input rows and columns 4i-2 ..= 4i+3: the step
        // VisualBackProp undoes (kernel 6, stride 4, padding 2).
        let g = f.stem.narrow(2, 3, 1).unwrap().narrow(3, 2, 1).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap().abs().unwrap().sum(1).unwrap().squeeze(0).unwrap();
        let gx: Vec<Vec<f32>> = gx.to_vec2().unwrap();
        for (r, row) in gx.iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                let inside = (10..=15).contains(&r) && (6..=11).contains(&c);
                assert_eq!(v > 0.0, inside, "gradient {v} at ({r}, {c})");
            }
        }
        let err = net.forward_t(&input(1, 33, 32, 5), false).unwrap_err().to_string();
        assert!(err.contains("33x32") && err.contains("space-to-depth factor 2"), "{err}");
        let zero = ResNetConfig { space_to_depth: 0, ..cfg };
        assert!(
            ResNet::new(&zero, derm_core::nn::seeded_var_builder(&VarMap::new(), 0, DType::F32, &Device::Cpu)).is_err()
        );
    }
}
