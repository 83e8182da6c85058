//! # derm-vbp: VisualBackProp, where a trained CNN looks
//!
//! VisualBackProp (Bojarski et al. 2016, "VisualBackProp: efficient visualization of CNNs"):
//! the channel-mean of each stage's ReLU output is taken; starting from the deepest stage, the
//! mean map is upsampled to the next shallower stage's size by a transposed convolution whose
//! weights are all ones (kernel, stride and padding matching the downsampling between the two
//! stages), multiplied point-wise with that stage's mean map, and so on up to the input size,
//! where it is normalised to [0, 1] per image. Bisla et al. use it to show whether a classifier
//! looks at the lesion or at hairs.
//!
//! This crate is model-agnostic: it takes the stage feature maps (which derm-classify's ResNet and
//! derm-segment's U-Net expose) and the geometry of each downsampling.
//!
//! **Consumes:** stage activations `(N, C_i, H_i, W_i)`, shallowest first, and the geometry
//! between them. **Produces:** saliency maps `(H, W)` in [0, 1] per image, overlays, and the
//! share of saliency inside a lesion mask.

#![forbid(unsafe_code)]

use candle_core::Tensor;
use derm_core::{Error, Result};
use image::{GrayImage, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How a deeper stage was reduced from the shallower one (or the first stage from the input):
/// the transposed convolution of ones that undoes it uses the same kernel, stride and padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Kernel size of the reduction.
    pub kernel: usize,
    /// Its stride.
    pub stride: usize,
    /// Its padding.
    pub padding: usize,
}

impl Step {
    /// A k/s/p step.
    pub const fn new(kernel: usize, stride: usize, padding: usize) -> Self {
        Step { kernel, stride, padding }
    }
}

/// ResNet geometry for stages [relu(bn1(conv1)), layer1, layer2, layer3, layer4]: the input is
/// reduced by the stem (the last step to undo), layer1 by the 3x3/2 max pool, layers 2-4 by 3x3/2
/// convolutions. Returned deepest first, as [`visual_backprop`] applies them. The stem is
/// torchvision's 7x7/2 convolution for `space_to_depth` 1; for a factor f > 1 it is a pixel
/// unshuffle by f and a 3x3/2 convolution, which reads a 3f x 3f window at stride 2f.
pub fn resnet_steps(space_to_depth: usize) -> Vec<Step> {
    let f = space_to_depth.max(1);
    let stem = if f == 1 { Step::new(7, 2, 3) } else { Step::new(3 * f, 2 * f, f) };
    vec![Step::new(3, 2, 1), Step::new(3, 2, 1), Step::new(3, 2, 1), Step::new(3, 2, 1), stem]
}

/// U-Net encoder geometry for `levels` encoder stages plus the bottleneck: each deeper stage is
/// reduced by a 2x2/2 max pool; the first stage is at input resolution (a 1x1/1 identity step).
pub fn unet_steps(levels: usize) -> Vec<Step> {
    let mut v = vec![Step::new(2, 2, 0); levels];
    v.push(Step::new(1, 1, 0));
    v
}

/// Transposed convolution of one (H, W) map with a k x k kernel of ones, stride s and padding p,
/// producing exactly `out_h` x `out_w` (the output padding is whatever reaches that size).
pub fn conv_transpose_ones(map: &[f32], h: usize, w: usize, step: Step, out_h: usize, out_w: usize) -> Vec<f32> {
    let mut out = vec![0f32; out_h * out_w];
    let (k, s, p) = (step.kernel as isize, step.stride as isize, step.padding as isize);
    // Separable: the ones kernel spreads each value over a k x k box; do rows then columns.
    let mut rows = vec![0f32; h * out_w];
    for y in 0..h {
        for x in 0..w {
            let v = map[y * w + x];
            let x0 = x as isize * s - p;
            for ox in x0.max(0)..(x0 + k).min(out_w as isize) {
                rows[y * out_w + ox as usize] += v;
            }
        }
    }
    for y in 0..h {
        let y0 = y as isize * s - p;
        for oy in y0.max(0)..(y0 + k).min(out_h as isize) {
            let (src, dst) = (&rows[y * out_w..(y + 1) * out_w], oy as usize * out_w);
            for (o, &v) in out[dst..dst + out_w].iter_mut().zip(src) {
                *o += v;
            }
        }
    }
    out
}

/// Channel means of a (N, C, H, W) activation: N maps of H x W.
fn channel_means(t: &Tensor) -> Result<(Vec<Vec<f32>>, usize, usize)> {
    let (_, _, h, w) = t.dims4()?;
    Ok((derm_kernels::fused::channel_mean_maps(t)?, h, w))
}

/// VisualBackProp saliency for each image of a batch.
///
/// `stages` are the ReLU outputs, shallowest first; `steps` has one entry per stage, deepest
/// first: `steps[i]` undoes the reduction into the i-th deepest stage, the last one undoes the
/// reduction from the input into the shallowest stage. Returns per image a row-major
/// `input_h` x `input_w` map normalised to [0, 1].
pub fn visual_backprop(stages: &[Tensor], steps: &[Step], input_hw: (usize, usize)) -> Result<Vec<Vec<f32>>> {
    if stages.is_empty() || steps.len() != stages.len() {
        return Err(Error::invalid(format!("vbp: {} stages need as many steps, got {}", stages.len(), steps.len())));
    }
    let means = stages.iter().map(channel_means).collect::<Result<Vec<_>>>()?;
    let n = means[0].0.len();
    if means.iter().any(|m| m.0.len() != n) {
        return Err(Error::invalid("vbp: stages have different batch sizes"));
    }
    let maps = (0..n)
        .into_par_iter()
        .map(|i| {
            let last = means.len() - 1;
            let (mut cur, mut h, mut w) = (means[last].0[i].clone(), means[last].1, means[last].2);
            for (j, step) in steps.iter().enumerate() {
                let target = last.checked_sub(j + 1);
                let (th, tw) = match target {
                    Some(t) => (means[t].1, means[t].2),
                    None => input_hw,
                };
                cur = conv_transpose_ones(&cur, h, w, *step, th, tw);
                if let Some(t) = target {
                    for (c, m) in cur.iter_mut().zip(&means[t].0[i]) {
                        *c *= m;
                    }
                }
                (h, w) = (th, tw);
            }
            normalise(&mut cur);
            cur
        })
        .collect();
    Ok(maps)
}

/// Min-max normalisation to [0, 1] (a constant map becomes all zeros).
pub fn normalise(v: &mut [f32]) {
    let (lo, hi) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    let r = hi - lo;
    for x in v.iter_mut() {
        *x = if r > 0.0 { (*x - lo) / r } else { 0.0 };
    }
}

/// A saliency map as a gray image (0..255).
pub fn to_gray(map: &[f32], w: u32, h: u32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| image::Luma([(map[(y * w + x) as usize] * 255.0).round().clamp(0.0, 255.0) as u8]))
}

/// The saliency map laid over the image as a heat map.
pub fn overlay(img: &RgbImage, map: &[f32]) -> RgbImage {
    derm_visual::plot::heatmap_overlay(img, map, 0.5)
}

/// The share of total saliency that falls inside `mask` (non-zero pixels), and the mask's area
/// fraction. A model that looks at the lesion has the first far above the second.
pub fn mass_inside(map: &[f32], mask: &GrayImage) -> (f64, f64) {
    let total: f64 = map.iter().map(|&v| v as f64).sum();
    let (mut inside, mut area) = (0f64, 0usize);
    for (v, m) in map.iter().zip(mask.as_raw()) {
        if *m != 0 {
            inside += *v as f64;
            area += 1;
        }
    }
    let frac = area as f64 / map.len().max(1) as f64;
    (if total > 0.0 { inside / total } else { 0.0 }, frac)
}

/// One image's row of `vbp.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSaliency {
    /// The image id.
    pub id: String,
    /// Share of the saliency mass inside the lesion mask, when one was given.
    pub mass_inside: Option<f64>,
    /// The lesion's share of the image, when a mask was given.
    pub area_fraction: Option<f64>,
}

/// `vbp.json`: saliency against lesion masks over a folder, read back typed by the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaliencySummary {
    /// Images processed.
    pub images: usize,
    /// Mean [`ImageSaliency::mass_inside`] over the images that have it.
    pub mean_mass_inside: Option<f64>,
    /// Mean [`ImageSaliency::area_fraction`] over the images that have it.
    pub mean_area_fraction: Option<f64>,
    /// Per image.
    pub per_image: Vec<ImageSaliency>,
}

impl SaliencySummary {
    /// The summary of `rows`.
    pub fn new(per_image: Vec<ImageSaliency>) -> Self {
        let mean = |f: &dyn Fn(&ImageSaliency) -> Option<f64>| {
            let v: Vec<f64> = per_image.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        SaliencySummary {
            images: per_image.len(),
            mean_mass_inside: mean(&|r| r.mass_inside),
            mean_area_fraction: mean(&|r| r.area_fraction),
            per_image,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn transposed_ones_matches_definition() {
        // A single one at (1,1) of a 3x3 map, kernel 3, stride 2, padding 1 -> 6x6 box at rows/cols 1..4.
        let mut m = vec![0f32; 9];
        m[4] = 1.0;
        let o = conv_transpose_ones(&m, 3, 3, Step::new(3, 2, 1), 6, 6);
        for y in 0..6 {
            for x in 0..6 {
                let want = if (1..4).contains(&y) && (1..4).contains(&x) { 1.0 } else { 0.0 };
                assert_eq!(o[y * 6 + x], want, "({y},{x})");
            }
        }
        // All ones, kernel 2 stride 2: exact 2x upsampling.
        let o = conv_transpose_ones(&[1.0, 2.0, 3.0, 4.0], 2, 2, Step::new(2, 2, 0), 4, 4);
        assert_eq!(&o[..4], &[1.0, 1.0, 2.0, 2.0]);
        assert_eq!(&o[12..], &[3.0, 3.0, 4.0, 4.0]);
    }

    #[test]
    fn resnet_chain_reaches_input_size_and_normalises() {
        let mk = |c, h| Tensor::ones((2, c, h, h), DType::F32, &Device::Cpu).unwrap();
        let stages = [mk(4, 112), mk(8, 56), mk(8, 28), mk(8, 14), mk(8, 7)];
        let maps = visual_backprop(&stages, &resnet_steps(1), (224, 224)).unwrap();
        assert_eq!(maps.len(), 2);
        assert_eq!(maps[0].len(), 224 * 224);
        let (lo, hi) = maps[0].iter().fold((1f32, 0f32), |(a, b), &x| (a.min(x), b.max(x)));
        assert_eq!((lo, hi), (0.0, 1.0));
        // A space-to-depth stem of factor 2: the stem at a quarter of the input, one step back.
        let stages = [mk(4, 56), mk(8, 28), mk(8, 14), mk(8, 7), mk(8, 4)];
        assert_eq!(resnet_steps(2)[4], Step::new(6, 4, 2));
        let maps = visual_backprop(&stages, &resnet_steps(2), (224, 224)).unwrap();
        assert_eq!(maps[0].len(), 224 * 224);
        assert!(maps[0].iter().all(|v| v.is_finite()) && maps[0].contains(&1.0));
    }

    #[test]
    fn saliency_follows_a_localised_activation() {
        // Activation only in the top-left quadrant at every stage: the map must concentrate there.
        let mk = |h: usize| {
            let v: Vec<f32> = (0..h * h).map(|i| if i % h < h / 2 && i / h < h / 2 { 1.0 } else { 0.01 }).collect();
            Tensor::from_vec(v, (1, 1, h, h), &Device::Cpu).unwrap()
        };
        let stages = [mk(32), mk(16), mk(8), mk(4)];
        let maps = visual_backprop(&stages, &unet_steps(3), (32, 32)).unwrap();
        let mask = GrayImage::from_fn(32, 32, |x, y| image::Luma([if x < 16 && y < 16 { 255 } else { 0 }]));
        let (inside, area) = mass_inside(&maps[0], &mask);
        assert!((area - 0.25).abs() < 1e-9);
        assert!(inside > 0.9, "{inside}");
        assert!(visual_backprop(&stages, &unet_steps(2), (32, 32)).is_err());
    }
}
