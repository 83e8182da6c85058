//! Mixing of training images within a batch: mixup (Zhang et al. 2018: each image blended with
//! another of the batch, the targets blended with the same weight) and CutMix (Yun et al. 2019: a
//! box of each image replaced by the same box of another, the targets weighted by area). One
//! weight and one pairing per batch; the loss is the weighted sum of the cross-entropies against
//! both images' classes.

use candle_core::Tensor;
use derm_core::{Error, Result, Rng};
use serde::{Deserialize, Serialize};

/// How the images of a training batch are mixed; the mixing weight is drawn from
/// Beta(`alpha`, `alpha`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BatchMix {
    /// No mixing.
    #[default]
    Off,
    /// Whole images blended.
    Mixup {
        /// Beta parameter (0.2, the usual choice: most weights near 0 or 1).
        alpha: f64,
    },
    /// A box of each image replaced by another's.
    CutMix {
        /// Beta parameter (1: the box's area uniform).
        alpha: f64,
    },
}

impl BatchMix {
    /// Whether the batch is mixed at all.
    pub fn is_on(&self) -> bool {
        !matches!(self, BatchMix::Off)
    }

    /// Checks the weight distribution's parameter.
    pub fn validate(&self) -> Result<()> {
        match *self {
            BatchMix::Off => Ok(()),
            BatchMix::Mixup { alpha } | BatchMix::CutMix { alpha } if alpha > 0.0 && alpha.is_finite() => Ok(()),
            BatchMix::Mixup { alpha } | BatchMix::CutMix { alpha } => {
                Err(Error::invalid(format!("classify: mixing alpha {alpha} is not a positive finite number")))
            }
        }
    }

    /// Mixes a batch `x` (N, C, H, W): the images as they are when off (nothing drawn from
    /// `rng`), else the mixed images with the pairing and the weight of each image's own class.
    pub fn apply(&self, x: &Tensor, rng: &mut Rng) -> Result<Batch> {
        let (alpha, cut) = match *self {
            BatchMix::Off => return Ok(Batch::unmixed(x.clone())),
            BatchMix::Mixup { alpha } => (alpha, false),
            BatchMix::CutMix { alpha } => (alpha, true),
        };
        let (n, _, h, w) = x.dims4()?;
        let lambda = rng.beta(alpha, alpha);
        let partner: Vec<u32> = rng.permutation(n).into_iter().map(|i| i as u32).collect();
        let partner = Tensor::new(partner, x.device())?;
        let other = x.index_select(&partner, 0)?;
        let (x, weight) = if cut {
            let (y0, y1, x0, x1) = cut_box(h, w, lambda, rng);
            let mut m = vec![0f32; h * w];
            for row in m.chunks_mut(w).take(y1).skip(y0) {
                row[x0..x1].fill(1.0);
            }
            let mask = Tensor::from_vec(m, (1, 1, h, w), x.device())?.to_dtype(x.dtype())?;
            let mixed = (x + (other - x)?.broadcast_mul(&mask)?)?;
            (mixed, 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / (h * w) as f64)
        } else {
            (((x * lambda)? + (other * (1.0 - lambda))?)?, lambda)
        };
        Ok(Batch { x, pairing: Some(Pairing { partner, weight }) })
    }
}

/// The box CutMix pastes: rows `y0..y1`, columns `x0..x1`, of sides `sqrt(1 - lambda)` times
/// the image's, centred at a uniform point and clipped to the image.
fn cut_box(h: usize, w: usize, lambda: f64, rng: &mut Rng) -> (usize, usize, usize, usize) {
    let r = (1.0 - lambda).max(0.0).sqrt();
    let (bh, bw) = (h as f64 * r, w as f64 * r);
    let (cy, cx) = (rng.uniform(0.0, h as f64), rng.uniform(0.0, w as f64));
    let clip = |v: f64, hi: usize| (v.round().max(0.0) as usize).min(hi);
    (clip(cy - bh / 2.0, h), clip(cy + bh / 2.0, h), clip(cx - bw / 2.0, w), clip(cx + bw / 2.0, w))
}

/// A training batch's images after [`BatchMix::apply`], and how they were mixed.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The images (N, C, H, W), mixed or as drawn.
    pub x: Tensor,
    /// The pairing of a mixed batch; `None` for images as drawn.
    pub pairing: Option<Pairing>,
}

/// Which image each of a mixed batch was mixed with, and by how much.
#[derive(Debug, Clone)]
pub struct Pairing {
    /// (N,) u32: the image each one was mixed with.
    pub partner: Tensor,
    /// The share of each mixed image that is its own (the target weight of its own class).
    pub weight: f64,
}

impl Batch {
    /// Images as drawn, not mixed.
    pub fn unmixed(x: Tensor) -> Batch {
        Batch { x, pairing: None }
    }

    /// `loss(logits, y)` for images as drawn; for a mixed batch, the mixing weight times that
    /// plus `1 - weight` times the loss against the partners' classes.
    pub fn loss(
        &self,
        logits: &Tensor,
        y: &Tensor,
        loss: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let own = loss(logits, y)?;
        let Some(p) = &self.pairing else { return Ok(own) };
        let theirs = loss(logits, &y.index_select(&p.partner, 0)?)?;
        Ok(((own * p.weight)? + (theirs * (1.0 - p.weight))?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn batch() -> Tensor {
        let v: Vec<f32> = (0..4 * 2 * 8 * 8).map(|i| (i / 128) as f32).collect();
        Tensor::from_vec(v, (4, 2, 8, 8), &Device::Cpu).unwrap()
    }

    #[test]
    fn off_leaves_the_batch_alone_and_a_bad_alpha_is_an_error() {
        let mut rng = Rng::new(0);
        let b = BatchMix::Off.apply(&batch(), &mut rng).unwrap();
        assert!(b.pairing.is_none());
        assert_eq!(
            b.x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            batch().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(rng.next_u64(), Rng::new(0).next_u64(), "off draws nothing");
        assert!(BatchMix::Mixup { alpha: 0.0 }.validate().is_err());
        assert!(BatchMix::CutMix { alpha: f64::NAN }.validate().is_err());
        assert!(BatchMix::Mixup { alpha: 0.2 }.validate().is_ok());
    }

    #[test]
    fn the_setting_reads_back_from_its_json() {
        for m in [BatchMix::Off, BatchMix::Mixup { alpha: 0.2 }, BatchMix::CutMix { alpha: 1.0 }] {
            assert_eq!(serde_json::from_str::<BatchMix>(&serde_json::to_string(&m).unwrap()).unwrap(), m);
        }
        let cut: BatchMix = serde_json::from_str(r#"{"kind": "cutmix", "alpha": 0.5}"#).unwrap();
        assert_eq!(cut, BatchMix::CutMix { alpha: 0.5 });
        assert!(serde_json::from_str::<BatchMix>(r#"{"kind": "mixup", "alpha": 0.2, "beta": 1}"#).is_err());
    }

    #[test]
    fn mixup_blends_each_image_with_its_partner_by_the_weight() {
        let x = batch(); // image i is the constant i
        for seed in 0..5 {
            let m = BatchMix::Mixup { alpha: 0.4 }.apply(&x, &mut Rng::new(seed)).unwrap();
            let pair = m.pairing.as_ref().unwrap();
            let p = pair.partner.to_vec1::<u32>().unwrap();
            let mixed = m.x.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
            for (i, row) in mixed.iter().enumerate() {
                let want = pair.weight * i as f64 + (1.0 - pair.weight) * p[i] as f64;
                assert!(row.iter().all(|&v| (v as f64 - want).abs() < 1e-5), "image {i}: {} vs {want}", row[0]);
            }
        }
    }

    #[test]
    fn cutmix_pastes_one_box_whose_area_sets_the_weight() {
        let x = batch();
        for seed in 0..8 {
            let m = BatchMix::CutMix { alpha: 1.0 }.apply(&x, &mut Rng::new(seed)).unwrap();
            let pair = m.pairing.as_ref().unwrap();
            let p = pair.partner.to_vec1::<u32>().unwrap();
            let mixed = m.x.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
            for (i, row) in mixed.iter().enumerate() {
                if p[i] as usize == i {
                    continue;
                }
                let theirs = row.iter().filter(|&&v| v == p[i] as f32).count() as f64 / row.len() as f64;
                let own = row.iter().filter(|&&v| v == i as f32).count() as f64 / row.len() as f64;
                assert!((own + theirs - 1.0).abs() < 1e-9, "image {i} holds a third value");
                assert!((own - pair.weight).abs() < 1e-9, "image {i}: own share {own}, weight {}", pair.weight);
            }
        }
    }

    #[test]
    fn the_mixed_loss_weights_both_targets() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2.0f32, 0.0, -1.0], [0.5, 1.5, 0.0]], &dev).unwrap();
        let y = Tensor::new(&[0u32, 1], &dev).unwrap();
        let pairing = Some(Pairing { partner: Tensor::new(&[1u32, 0], &dev).unwrap(), weight: 0.7 });
        let m = Batch { x: logits.clone(), pairing };
        let scalar = |b: &Batch| -> f64 {
            let l = b.loss(&logits, &y, |l, t| crate::loss(l, t, None)).unwrap();
            l.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
        };
        let got = scalar(&m);
        let lse = |r: [f64; 3]| r.iter().map(|v| v.exp()).sum::<f64>().ln();
        let (a, b) = ([2.0, 0.0, -1.0], [0.5, 1.5, 0.0]);
        let own = ((lse(a) - 2.0) + (lse(b) - 1.5)) / 2.0;
        let theirs = ((lse(a) - 0.0) + (lse(b) - 0.5)) / 2.0;
        let want = 0.7 * own + 0.3 * theirs;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // Images as drawn: their own targets alone.
        let plain = scalar(&Batch::unmixed(logits.clone()));
        assert!((plain - own).abs() < 1e-5, "{plain} vs {own}");
    }
}
