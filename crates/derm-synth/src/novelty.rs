//! The novelty check: is a generated image new, or a copy of a training image?
//!
//! For every generated image, the mean squared error (pixels in [0, 1]) to every training image
//! of its class is computed and the nearest one kept (the paper's figure 5 shows the histogram of
//! these minima and pairs at low, median and high error). Images closer than a threshold are
//! dropped as duplicates.
//!
//! The search is batched as matrix products, `||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b`, with
//! the (G x D) generated rows times the (D x T) training rows in chunks of training images, so
//! memory stays bounded; the nearest pair's error is then recomputed exactly (in f64), so an
//! exact copy scores 0.

use candle_core::{Device, Tensor};
use derm_core::{Error, Result};
use image::RgbImage;
use serde::{Deserialize, Serialize};

/// The nearest training image of one generated image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Nearest {
    /// Index of the training image.
    pub index: usize,
    /// Mean squared error to it (pixels in [0, 1]).
    pub mse: f64,
}

/// Images as rows of pixel values in [0, 1] (R, G, B interleaved), all of the first image's
/// size; an image of another size is resized to it.
pub fn image_rows(imgs: &[&RgbImage], size: (u32, u32)) -> Vec<f32> {
    let mut out = Vec::with_capacity(imgs.len() * (size.0 * size.1 * 3) as usize);
    for im in imgs {
        let resized;
        let im = if im.dimensions() == size {
            *im
        } else {
            resized = derm_core::image_io::resize_rgb(im, size.0, size.1);
            &resized
        };
        out.extend(im.as_raw().iter().map(|&v| v as f32 / 255.0));
    }
    out
}

/// For each of the `a.len() / dim` rows of `a`, the nearest of the rows of `b` by mean squared
/// error. The distances are matrix products on `device`, `chunk` rows of `b` at a time.
pub fn nearest_neighbours(a: &[f32], b: &[f32], dim: usize, chunk: usize, device: &Device) -> Result<Vec<Nearest>> {
    if dim == 0 || !a.len().is_multiple_of(dim) || !b.len().is_multiple_of(dim) {
        return Err(Error::invalid(format!(
            "nearest_neighbours: rows of {dim} values do not divide {} and {}",
            a.len(),
            b.len()
        )));
    }
    let (g, t) = (a.len() / dim, b.len() / dim);
    if t == 0 {
        return Err(Error::invalid("nearest_neighbours: no reference rows"));
    }
    if g == 0 {
        return Ok(Vec::new());
    }
    let at = Tensor::from_slice(a, (g, dim), device)?;
    let a_sq = at.sqr()?.sum_keepdim(1)?;
    let mut best: Vec<(f32, usize)> = vec![(f32::INFINITY, 0); g];
    let chunk = chunk.max(1);
    let mut start = 0;
    while start < t {
        let n = chunk.min(t - start);
        let bt = Tensor::from_slice(&b[start * dim..(start + n) * dim], (n, dim), device)?;
        let b_sq = bt.sqr()?.sum(1)?.reshape((1, n))?;
        let ab = at.matmul(&bt.t()?)?;
        let d = a_sq.broadcast_add(&b_sq)?.sub(&(ab * 2.0)?)?;
        let mins = d.min(1)?.to_vec1::<f32>()?;
        let args = d.argmin(1)?.to_vec1::<u32>()?;
        for (i, (m, k)) in mins.into_iter().zip(args).enumerate() {
            if m < best[i].0 {
                best[i] = (m, start + k as usize);
            }
        }
        start += n;
    }
    Ok(best
        .into_iter()
        .enumerate()
        .map(|(i, (_, k))| {
            let (x, y) = (&a[i * dim..(i + 1) * dim], &b[k * dim..(k + 1) * dim]);
            let se: f64 = x.iter().zip(y).map(|(p, q)| (*p as f64 - *q as f64).powi(2)).sum();
            Nearest { index: k, mse: se / dim as f64 }
        })
        .collect())
}

/// One generated image's entry in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoveltyEntry {
    /// The generated image's index in generation order.
    pub generated: usize,
    /// Index of the nearest training image (in the order given to [`NoveltyReport::new`]).
    pub nearest_index: usize,
    /// Id of the nearest training image.
    pub nearest_id: String,
    /// Mean squared error to it (pixels in [0, 1]).
    pub mse: f64,
    /// False when it was dropped as a duplicate.
    pub kept: bool,
}

/// The novelty check of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoveltyReport {
    /// The class.
    pub class: String,
    /// Images closer than this (MSE) to a training image were dropped.
    pub min_mse: f64,
    /// Training images of the class compared against.
    pub training_images: usize,
    /// Generated images checked.
    pub generated: usize,
    /// Images kept.
    pub kept: usize,
    /// Smallest, median, mean and largest nearest-neighbour MSE.
    pub mse_min: f64,
    /// Median nearest-neighbour MSE.
    pub mse_median: f64,
    /// Mean nearest-neighbour MSE.
    pub mse_mean: f64,
    /// Largest nearest-neighbour MSE.
    pub mse_max: f64,
    /// Every generated image.
    pub entries: Vec<NoveltyEntry>,
}

impl NoveltyReport {
    /// Builds the report from the nearest neighbours of `generated.len()` images.
    pub fn new(class: &str, min_mse: f64, training_ids: &[String], nearest: &[Nearest]) -> Self {
        let entries: Vec<NoveltyEntry> = nearest
            .iter()
            .enumerate()
            .map(|(i, n)| NoveltyEntry {
                generated: i,
                nearest_index: n.index,
                nearest_id: training_ids.get(n.index).cloned().unwrap_or_default(),
                mse: n.mse,
                kept: n.mse >= min_mse,
            })
            .collect();
        let mut v: Vec<f64> = nearest.iter().map(|n| n.mse).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let nan = f64::NAN;
        NoveltyReport {
            class: class.into(),
            min_mse,
            training_images: training_ids.len(),
            generated: nearest.len(),
            kept: entries.iter().filter(|e| e.kept).count(),
            mse_min: v.first().copied().unwrap_or(nan),
            mse_median: if v.is_empty() { nan } else { v[v.len() / 2] },
            mse_mean: if v.is_empty() { nan } else { v.iter().sum::<f64>() / v.len() as f64 },
            mse_max: v.last().copied().unwrap_or(nan),
            entries,
        }
    }

    /// Indices of the generated images at the lowest, median and highest MSE.
    pub fn low_median_high(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.entries.len()).collect();
        order.sort_by(|&a, &b| self.entries[a].mse.total_cmp(&self.entries[b].mse));
        match order.len() {
            0 => Vec::new(),
            n => {
                let mut v = vec![order[0], order[n / 2], order[n - 1]];
                v.dedup();
                v
            }
        }
    }
}

/// The paper's figure 5: rows of (generated, nearest training image) at low, median and high
/// MSE, for each class's report.
pub fn pairs_figure(rows: &[(&NoveltyReport, &[RgbImage], &[RgbImage])]) -> RgbImage {
    let mut imgs = Vec::new();
    let mut labels = Vec::new();
    for (rep, generated, training) in rows {
        for (k, i) in rep.low_median_high().into_iter().enumerate() {
            let e = &rep.entries[i];
            let which = ["lowest", "median", "highest"].get(k).copied().unwrap_or("");
            if let (Some(g), Some(t)) = (generated.get(i), training.get(e.nearest_index)) {
                imgs.push(g.clone());
                labels.push(format!("{} {which}: MSE {:.4}", rep.class, e.mse));
                imgs.push(t.clone());
                labels.push(format!("nearest real {}", e.nearest_id));
            }
        }
    }
    derm_visual::plot::grid(&imgs, 2, 160, Some(&labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use derm_core::Rng;

    #[test]
    fn matches_brute_force_and_copies_score_zero() {
        let mut r = Rng::new(5);
        let dim = 3 * 7 * 5;
        let train = r.uniform_vec(23 * dim, 0.0, 1.0);
        let mut gen = r.uniform_vec(9 * dim, 0.0, 1.0);
        // Plant exact copies of training images 4 and 17.
        gen[2 * dim..3 * dim].copy_from_slice(&train[4 * dim..5 * dim]);
        gen[6 * dim..7 * dim].copy_from_slice(&train[17 * dim..18 * dim]);
        for chunk in [1, 5, 64] {
            let nn = nearest_neighbours(&gen, &train, dim, chunk, &Device::Cpu).unwrap();
            for (i, n) in nn.iter().enumerate() {
                let brute = (0..23)
                    .map(|k| {
                        let se: f64 =
                            (0..dim).map(|j| (gen[i * dim + j] as f64 - train[k * dim + j] as f64).powi(2)).sum();
                        (k, se / dim as f64)
                    })
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .unwrap();
                assert_eq!(n.index, brute.0, "row {i}, chunk {chunk}");
                assert!((n.mse - brute.1).abs() < 1e-12);
            }
            assert_eq!((nn[2].index, nn[2].mse), (4, 0.0));
            assert_eq!((nn[6].index, nn[6].mse), (17, 0.0));
            let ids: Vec<String> = (0..23).map(|k| format!("t{k}")).collect();
            let rep = NoveltyReport::new("melanoma", 1e-3, &ids, &nn);
            assert_eq!(rep.kept, 7);
            assert!(!rep.entries[2].kept && !rep.entries[6].kept && rep.entries[6].nearest_id == "t17");
            assert_eq!(rep.mse_min, 0.0);
        }
    }
}
