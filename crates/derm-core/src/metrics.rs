//! Segmentation and classification metrics, as the ISIC challenges score them.
//!
//! Segmentation: per-image Jaccard (IoU) and its mean, global Jaccard, ISIC 2018's thresholded
//! Jaccard (an image with IoU below 0.65 counts as 0), Dice, and pixel sensitivity, specificity and
//! accuracy. Classification: ROC AUC with ties handled by average ranks (Mann-Whitney), ROC curve
//! points, specificity at 82/89/95% sensitivity (ISIC 2017), confusion matrix, per-class
//! sensitivity and balanced accuracy (ISIC 2018 task 3). Comparisons: [`paired_bootstrap`], the
//! difference of two systems scored on the same images with an interval from resampling them.
//!
//! Masks are slices of `u8` where any non-zero value is foreground.

use serde::{Deserialize, Serialize};

/// Pixel counts of one predicted mask against its ground truth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PixelCounts {
    /// Foreground predicted and true.
    pub tp: u64,
    /// Foreground predicted, background true.
    pub fp: u64,
    /// Background predicted and true.
    pub tn: u64,
    /// Background predicted, foreground true.
    pub fn_: u64,
}

impl PixelCounts {
    /// Counts for one mask pair (any non-zero value is foreground). Panics never: a length
    /// mismatch counts only the common prefix, so check sizes before (the loaders do).
    pub fn of(pred: &[u8], truth: &[u8]) -> Self {
        // Branch-free counts over blocks with narrow accumulators, which the compiler vectorises:
        // both = |A & B|, np = |A|, nt = |B|; the four cells follow from them.
        let n = pred.len().min(truth.len());
        let (mut both, mut np, mut nt) = (0u64, 0u64, 0u64);
        for (bp, bt) in pred[..n].chunks(1 << 15).zip(truth[..n].chunks(1 << 15)) {
            let (mut b, mut p1, mut t1) = (0u32, 0u32, 0u32);
            for (&p, &t) in bp.iter().zip(bt) {
                let (p, t) = ((p != 0) as u32, (t != 0) as u32);
                b += p & t;
                p1 += p;
                t1 += t;
            }
            both += b as u64;
            np += p1 as u64;
            nt += t1 as u64;
        }
        PixelCounts { tp: both, fp: np - both, fn_: nt - both, tn: n as u64 + both - np - nt }
    }
    /// Adds another image's counts.
    pub fn add(&mut self, o: &PixelCounts) {
        self.tp += o.tp;
        self.fp += o.fp;
        self.tn += o.tn;
        self.fn_ += o.fn_;
    }
    /// Intersection over union. Two empty masks agree perfectly (1.0).
    pub fn jaccard(&self) -> f64 {
        let u = self.tp + self.fp + self.fn_;
        if u == 0 {
            1.0
        } else {
            self.tp as f64 / u as f64
        }
    }
    /// Dice coefficient 2|A∩B| / (|A| + |B|). Two empty masks give 1.0.
    pub fn dice(&self) -> f64 {
        let d = 2 * self.tp + self.fp + self.fn_;
        if d == 0 {
            1.0
        } else {
            2.0 * self.tp as f64 / d as f64
        }
    }
    /// Pixel sensitivity (recall of the foreground); 1.0 when there is no foreground.
    pub fn sensitivity(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }
    /// Pixel specificity; 1.0 when there is no background.
    pub fn specificity(&self) -> f64 {
        ratio(self.tn, self.tn + self.fp)
    }
    /// Pixel precision; 1.0 when nothing is predicted.
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }
    /// Pixel accuracy.
    pub fn accuracy(&self) -> f64 {
        ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn_)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// Jaccard index (IoU) of one mask pair.
pub fn jaccard(pred: &[u8], truth: &[u8]) -> f64 {
    PixelCounts::of(pred, truth).jaccard()
}

/// Dice coefficient of one mask pair.
pub fn dice(pred: &[u8], truth: &[u8]) -> f64 {
    PixelCounts::of(pred, truth).dice()
}

/// ISIC 2018 task 1's threshold: an image whose IoU is below it scores 0.
pub const ISIC2018_JACCARD_THRESHOLD: f64 = 0.65;

/// ISIC 2018 task 1's score for one image: the IoU, or 0 when it is below `threshold` (0.65).
pub fn thresholded_jaccard(iou: f64, threshold: f64) -> f64 {
    if iou < threshold {
        0.0
    } else {
        iou
    }
}

/// Accumulates segmentation scores image by image (reset, add, summary).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SegmentationScores {
    /// Per-image counts, in the order added.
    pub per_image: Vec<PixelCounts>,
    /// Ids of the images, in the order added.
    pub ids: Vec<String>,
}

/// The summary of [`SegmentationScores`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SegmentationSummary {
    /// Number of images.
    pub images: usize,
    /// Mean of per-image Jaccard.
    pub jaccard_mean: f64,
    /// ISIC 2018 thresholded Jaccard (per-image IoU < 0.65 counts as 0), averaged.
    pub jaccard_thresholded: f64,
    /// Jaccard over all pixels of all images.
    pub jaccard_global: f64,
    /// Mean of per-image Dice.
    pub dice_mean: f64,
    /// Mean of per-image pixel sensitivity.
    pub sensitivity: f64,
    /// Mean of per-image pixel specificity.
    pub specificity: f64,
    /// Mean of per-image pixel accuracy.
    pub accuracy: f64,
}

impl SegmentationScores {
    /// Adds one image's prediction and truth.
    pub fn add(&mut self, id: impl Into<String>, pred: &[u8], truth: &[u8]) {
        self.ids.push(id.into());
        self.per_image.push(PixelCounts::of(pred, truth));
    }
    /// Per-image Jaccard values.
    pub fn jaccards(&self) -> Vec<f64> {
        self.per_image.iter().map(|c| c.jaccard()).collect()
    }
    /// The `k` images of lowest Jaccard, worst first.
    pub fn worst(&self, k: usize) -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = self.ids.iter().cloned().zip(self.jaccards()).collect();
        v.sort_by(|a, b| a.1.total_cmp(&b.1));
        v.truncate(k);
        v
    }
    /// Averages and global values.
    pub fn summary(&self) -> SegmentationSummary {
        let n = self.per_image.len();
        if n == 0 {
            return SegmentationSummary::default();
        }
        let mean = |f: &dyn Fn(&PixelCounts) -> f64| self.per_image.iter().map(f).sum::<f64>() / n as f64;
        let mut total = PixelCounts::default();
        for c in &self.per_image {
            total.add(c);
        }
        SegmentationSummary {
            images: n,
            jaccard_mean: mean(&|c| c.jaccard()),
            jaccard_thresholded: mean(&|c| thresholded_jaccard(c.jaccard(), ISIC2018_JACCARD_THRESHOLD)),
            jaccard_global: total.jaccard(),
            dice_mean: mean(&|c| c.dice()),
            sensitivity: mean(&|c| c.sensitivity()),
            specificity: mean(&|c| c.specificity()),
            accuracy: mean(&|c| c.accuracy()),
        }
    }
}

/// Average ranks (1-based) of `xs`, ties sharing the mean of their ranks.
fn average_ranks(xs: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    idx.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let mut ranks = vec![0.0; xs.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && xs[idx[j + 1]] == xs[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    ranks
}

/// Area under the ROC curve of `scores` for binary `labels` (true = positive), by the
/// Mann-Whitney statistic with average ranks for ties. `None` when one class is absent.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let n_pos = labels.iter().filter(|&&l| l).count();
    let n_neg = labels.len() - n_pos;
    if n_pos == 0 || n_neg == 0 || scores.len() != labels.len() {
        return None;
    }
    let ranks = average_ranks(scores);
    let sum_pos: f64 = ranks.iter().zip(labels).filter(|(_, &l)| l).map(|(r, _)| r).sum();
    let u = sum_pos - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// One point of a ROC curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RocPoint {
    /// False positive rate.
    pub fpr: f64,
    /// True positive rate (sensitivity).
    pub tpr: f64,
    /// Scores at or above this threshold are called positive.
    pub threshold: f64,
}

/// The ROC curve: one point per distinct score (descending thresholds), starting at (0, 0) with
/// an infinite threshold. Empty when one class is absent.
pub fn roc_curve(scores: &[f64], labels: &[bool]) -> Vec<RocPoint> {
    let n_pos = labels.iter().filter(|&&l| l).count() as f64;
    let n_neg = labels.len() as f64 - n_pos;
    if n_pos == 0.0 || n_neg == 0.0 || scores.len() != labels.len() {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut pts = vec![RocPoint { fpr: 0.0, tpr: 0.0, threshold: f64::INFINITY }];
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut i = 0;
    while i < idx.len() {
        let s = scores[idx[i]];
        while i < idx.len() && scores[idx[i]] == s {
            if labels[idx[i]] {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        pts.push(RocPoint { fpr: fp / n_neg, tpr: tp / n_pos, threshold: s });
    }
    pts
}

/// Specificity at a required sensitivity, as the ISIC 2017 scorer reports it: the best
/// specificity over the ROC operating points whose sensitivity reaches `sensitivity`.
pub fn specificity_at_sensitivity(scores: &[f64], labels: &[bool], sensitivity: f64) -> Option<f64> {
    roc_curve(scores, labels)
        .iter()
        .filter(|p| p.tpr >= sensitivity - 1e-12)
        .map(|p| 1.0 - p.fpr)
        .max_by(|a, b| a.total_cmp(b))
}

/// A K x K confusion matrix, rows the true class, columns the predicted class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    /// `counts[true][pred]`.
    pub counts: Vec<Vec<u64>>,
}

impl ConfusionMatrix {
    /// Builds the matrix from true and predicted class indices (indices >= k are ignored).
    pub fn new(truth: &[usize], pred: &[usize], k: usize) -> Self {
        let mut counts = vec![vec![0u64; k]; k];
        for (&t, &p) in truth.iter().zip(pred) {
            if t < k && p < k {
                counts[t][p] += 1;
            }
        }
        ConfusionMatrix { counts }
    }
    /// Per-class sensitivity (recall); `None` for a class with no samples.
    pub fn per_class_sensitivity(&self) -> Vec<Option<f64>> {
        self.counts
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let n: u64 = row.iter().sum();
                (n > 0).then(|| row[i] as f64 / n as f64)
            })
            .collect()
    }
    /// Per-class specificity; `None` for a class when every sample belongs to it.
    pub fn per_class_specificity(&self) -> Vec<Option<f64>> {
        let k = self.counts.len();
        (0..k)
            .map(|c| {
                let (mut tn, mut neg) = (0u64, 0u64);
                for (t, row) in self.counts.iter().enumerate() {
                    if t == c {
                        continue;
                    }
                    let n: u64 = row.iter().sum();
                    neg += n;
                    tn += n - row[c];
                }
                (neg > 0).then(|| tn as f64 / neg as f64)
            })
            .collect()
    }
    /// Balanced accuracy (ISIC 2018 task 3): mean per-class sensitivity over present classes.
    pub fn balanced_accuracy(&self) -> f64 {
        let v: Vec<f64> = self.per_class_sensitivity().into_iter().flatten().collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    }
    /// Plain accuracy.
    pub fn accuracy(&self) -> f64 {
        let total: u64 = self.counts.iter().flatten().sum();
        let diag: u64 = (0..self.counts.len()).map(|i| self.counts[i][i]).sum();
        ratio(diag, total)
    }
}

/// Index of the largest value of each row.
pub fn argmax_rows(probs: &[Vec<f64>]) -> Vec<usize> {
    probs.iter().map(|r| r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0)).collect()
}

/// How a paired comparison resamples ([`paired_bootstrap`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootstrapConfig {
    /// Resamples of the items, each as many as there are, drawn with replacement.
    pub resamples: usize,
    /// The interval's coverage (0.95: the 2.5th to the 97.5th percentile of the resampled
    /// differences).
    pub level: f64,
    /// Seed of the draws.
    pub seed: u64,
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        BootstrapConfig { resamples: 1000, level: 0.95, seed: 0 }
    }
}

impl BootstrapConfig {
    /// Whether it can make an interval: at least one resample, a level inside (0, 1).
    pub fn is_valid(&self) -> bool {
        self.resamples > 0 && self.level > 0.0 && self.level < 1.0
    }
}

/// One metric of two systems scored on the same items: each system's value on all of them,
/// the difference, and a percentile bootstrap interval of the difference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedDifference {
    /// The first (base) system's value on all items.
    pub base: f64,
    /// The second system's value on all items.
    pub other: f64,
    /// `other - base` on all items.
    pub difference: f64,
    /// Lower end of the interval of `other - base`.
    pub low: f64,
    /// Upper end of the interval.
    pub high: f64,
    /// Share of the resamples in which `other` scored higher than `base`.
    pub other_higher: f64,
    /// Resamples on which the metric was defined for both (an AUC needs both classes among
    /// the drawn items); the interval is over these.
    pub resamples: usize,
}

/// One named metric of a paired comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparedMetric {
    /// What was measured (`mean AUC`, `per-image Jaccard`, ...).
    pub metric: String,
    /// The two values, their difference and its interval.
    #[serde(flatten)]
    pub difference: PairedDifference,
}

/// One metric of two systems on a resample of the items, as [`paired_bootstrap`] takes it,
/// boxed so that several can be listed.
pub type PairedMetric<'a> = Box<dyn Fn(&[usize]) -> Option<(f64, f64)> + 'a>;

/// Two systems compared on the same items, metric by metric, every metric on the same
/// resamples (the same seed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Items both were scored on.
    pub items: usize,
    /// How the items were resampled.
    pub bootstrap: BootstrapConfig,
    /// The metrics defined on these items.
    pub metrics: Vec<ComparedMetric>,
}

impl Comparison {
    /// Compares each metric of `metrics` ([`paired_bootstrap`]); a metric undefined on the
    /// items is left out.
    pub fn of<'a>(
        items: usize,
        bootstrap: &BootstrapConfig,
        metrics: impl IntoIterator<Item = (String, PairedMetric<'a>)>,
    ) -> Comparison {
        let metrics = metrics
            .into_iter()
            .filter_map(|(metric, f)| {
                paired_bootstrap(items, bootstrap, f).map(|difference| ComparedMetric { metric, difference })
            })
            .collect();
        Comparison { items, bootstrap: *bootstrap, metrics }
    }
}

/// Compares two systems scored on the same `n` items by resampling the items: `metric(idx)`
/// gives the (base, other) values on the items `idx` (indices into 0..n, with repeats), `None`
/// where the metric is undefined there. Resampling the items together keeps what the two
/// systems share (which images are hard), so the interval is that of their difference: where
/// the two agree on which items are hard, as two models of the same images do, it is narrower
/// than the two systems' own intervals would suggest. `None` when the metric is undefined on
/// all items or `cfg` asks for no resamples or a level outside (0, 1).
pub fn paired_bootstrap<F>(n: usize, cfg: &BootstrapConfig, metric: F) -> Option<PairedDifference>
where
    F: Fn(&[usize]) -> Option<(f64, f64)>,
{
    if !cfg.is_valid() {
        return None;
    }
    let all: Vec<usize> = (0..n).collect();
    let (base, other) = metric(&all)?;
    let mut rng = crate::rng::Rng::new(cfg.seed);
    let mut idx = vec![0; n];
    let mut diffs = Vec::with_capacity(cfg.resamples);
    for _ in 0..cfg.resamples {
        for v in idx.iter_mut() {
            *v = rng.below(n);
        }
        if let Some((b, o)) = metric(&idx) {
            diffs.push(o - b);
        }
    }
    if diffs.is_empty() {
        return None;
    }
    diffs.sort_by(f64::total_cmp);
    let tail = (1.0 - cfg.level) / 2.0;
    Some(PairedDifference {
        base,
        other,
        difference: other - base,
        low: quantile(&diffs, tail),
        high: quantile(&diffs, 1.0 - tail),
        other_higher: diffs.iter().filter(|&&d| d > 0.0).count() as f64 / diffs.len() as f64,
        resamples: diffs.len(),
    })
}

/// The `q` quantile of sorted values, interpolated linearly between neighbours (NumPy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::splitmix_counter as u64s;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// Regenerates mask image `img` of the peer's metric inputs (bench/peer/peer_bench.py): A = bits of stream 1,
    /// B = A xor (bits(2) & bits(3) & bits(4)).
    fn peer_masks(img: usize) -> (Vec<u8>, Vec<u8>) {
        let words = 256 * 256 / 64;
        let mut a = Vec::with_capacity(words * 64);
        let mut b = Vec::with_capacity(words * 64);
        for w in 0..words {
            let i = (img * words + w) as u64;
            let wa = u64s(0, 1, i);
            let wb = wa ^ (u64s(0, 2, i) & u64s(0, 3, i) & u64s(0, 4, i));
            for bit in 0..64 {
                a.push(((wa >> bit) & 1) as u8);
                b.push(((wb >> bit) & 1) as u8);
            }
        }
        (a, b)
    }

    #[test]
    fn jaccard_matches_peer_reference_values() {
        let mut s = SegmentationScores::default();
        for img in 0..1000 {
            let (a, b) = peer_masks(img);
            s.add(img.to_string(), &a, &b);
        }
        let j = s.jaccards();
        assert!(close(j[0], 0.7800245265022483), "{}", j[0]);
        assert!(close(j[1], 0.7778050175696658));
        assert!(close(j[2], 0.7775504159823375));
        let sum = s.summary();
        assert!(close(sum.jaccard_global, 0.7777222537790598), "{}", sum.jaccard_global);
        assert!(close(sum.jaccard_mean, 0.777722380027394), "{}", sum.jaccard_mean);
        // Every image is near 0.78, above the ISIC 2018 threshold.
        assert!(close(sum.jaccard_thresholded, sum.jaccard_mean));
        let mut ten = PixelCounts::default();
        for c in &s.per_image[..10] {
            ten.add(c);
        }
        assert!(close(ten.jaccard(), 0.7781394983519445));
    }

    #[test]
    fn auc_matches_peer_reference_values_with_and_without_ties() {
        let n = 10000;
        let labels: Vec<bool> = (0..n).map(|i| (u64s(0, 10, i) >> 63) == 1).collect();
        assert_eq!(labels.iter().filter(|&&l| l).count(), 4989);
        let scores: Vec<f64> = (0..n)
            .map(|i| (u64s(0, 11, i) >> 11) as f64 * 2f64.powi(-53) + if labels[i as usize] { 0.35 } else { 0.0 })
            .collect();
        assert!(close(scores[0], 0.46553456239247215));
        assert!(close(roc_auc(&scores, &labels).unwrap(), 0.7904629858408514));
        // numpy's round is round-half-even.
        let tied: Vec<f64> = scores.iter().map(|s| (s * 20.0).round_ties_even() / 20.0).collect();
        assert!(close(roc_auc(&tied, &labels).unwrap(), 0.7900034436166671));
        // Trapezoidal area under the ROC curve equals the rank statistic.
        let pts = roc_curve(&tied, &labels);
        let area: f64 = pts.windows(2).map(|w| (w[1].fpr - w[0].fpr) * (w[1].tpr + w[0].tpr) / 2.0).sum();
        assert!(close(area, 0.7900034436166671));
    }

    #[test]
    fn hand_made_masks_and_thresholded_jaccard() {
        let a = [1u8, 1, 0, 0];
        let b = [1u8, 0, 1, 0];
        assert!(close(jaccard(&a, &b), 1.0 / 3.0));
        assert!(close(dice(&a, &b), 0.5));
        assert_eq!(jaccard(&[0, 0], &[0, 0]), 1.0);
        assert_eq!(thresholded_jaccard(0.64, 0.65), 0.0);
        assert_eq!(thresholded_jaccard(0.7, 0.65), 0.7);
        let c = PixelCounts::of(&[255, 255, 0, 0, 0], &[255, 0, 0, 0, 255]);
        assert_eq!((c.tp, c.fp, c.tn, c.fn_), (1, 1, 2, 1));
        assert!(close(c.sensitivity(), 0.5) && close(c.specificity(), 2.0 / 3.0) && close(c.accuracy(), 0.6));
        let mut s = SegmentationScores::default();
        s.add("good", &[1, 1, 0, 0], &[1, 1, 0, 0]);
        s.add("bad", &[1, 0, 0, 0], &[1, 1, 1, 0]);
        let sm = s.summary();
        assert!(close(sm.jaccard_mean, (1.0 + 1.0 / 3.0) / 2.0));
        assert!(close(sm.jaccard_thresholded, 0.5));
        assert!(close(sm.jaccard_global, 3.0 / 5.0));
        assert_eq!(s.worst(1)[0].0, "bad");
    }

    #[test]
    fn roc_points_and_specificity_at_sensitivity() {
        let scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4];
        let labels = [true, false, true, true, false, false];
        assert!(close(roc_auc(&scores, &labels).unwrap(), 7.0 / 9.0));
        // Sensitivity 1 first reached at threshold 0.6 with one false positive of three.
        assert!(close(specificity_at_sensitivity(&scores, &labels, 0.95).unwrap(), 2.0 / 3.0));
        assert!(close(specificity_at_sensitivity(&scores, &labels, 0.3).unwrap(), 1.0));
        assert_eq!(roc_auc(&[0.1, 0.2], &[true, true]), None);
    }

    #[test]
    fn confusion_matrix_and_balanced_accuracy() {
        let truth = [0, 0, 0, 0, 1, 1, 2];
        let pred = [0, 0, 0, 1, 1, 0, 2];
        let cm = ConfusionMatrix::new(&truth, &pred, 3);
        assert_eq!(cm.counts, vec![vec![3, 1, 0], vec![1, 1, 0], vec![0, 0, 1]]);
        let sens = cm.per_class_sensitivity();
        assert_eq!(sens, vec![Some(0.75), Some(0.5), Some(1.0)]);
        assert!(close(cm.balanced_accuracy(), 0.75));
        assert!(close(cm.accuracy(), 5.0 / 7.0));
        assert_eq!(cm.per_class_specificity()[0], Some(2.0 / 3.0));
        assert_eq!(argmax_rows(&[vec![0.1, 0.7, 0.2]]), vec![1]);
    }

    #[test]
    fn paired_bootstrap_of_a_fixed_shift_and_of_a_system_against_itself() {
        let a: Vec<f64> = (0..50).map(|i| (u64s(3, 0, i) % 1000) as f64 / 1000.0).collect();
        let mean = |v: &[f64], idx: &[usize]| idx.iter().map(|&i| v[i]).sum::<f64>() / idx.len() as f64;
        let cfg = BootstrapConfig { resamples: 200, ..BootstrapConfig::default() };
        // Every item 0.1 better: every resample's difference is 0.1, so is the interval.
        let b: Vec<f64> = a.iter().map(|x| x + 0.1).collect();
        let d = paired_bootstrap(a.len(), &cfg, |idx| Some((mean(&a, idx), mean(&b, idx)))).unwrap();
        assert!(close(d.difference, 0.1) && close(d.low, 0.1) && close(d.high, 0.1), "{d:?}");
        assert_eq!((d.other_higher, d.resamples), (1.0, 200));
        assert!(close(d.base, mean(&a, &(0..50).collect::<Vec<_>>())));
        // Against itself: zero everywhere, and the other is never higher.
        let s = paired_bootstrap(a.len(), &cfg, |idx| Some((mean(&a, idx), mean(&a, idx)))).unwrap();
        assert_eq!((s.difference, s.low, s.high, s.other_higher), (0.0, 0.0, 0.0, 0.0));
        // Noise around a shift: the interval holds the shift and has width; the same seed repeats.
        let c: Vec<f64> = a.iter().enumerate().map(|(i, x)| x + 0.05 + if i % 2 == 0 { 0.2 } else { -0.2 }).collect();
        let n = paired_bootstrap(a.len(), &cfg, |idx| Some((mean(&a, idx), mean(&c, idx)))).unwrap();
        assert!(n.low < 0.05 && n.high > 0.05 && n.high - n.low > 0.05, "{n:?}");
        assert_eq!(n, paired_bootstrap(a.len(), &cfg, |idx| Some((mean(&a, idx), mean(&c, idx)))).unwrap());
        let other_seed = BootstrapConfig { seed: 1, ..cfg };
        assert_ne!(n, paired_bootstrap(a.len(), &other_seed, |idx| Some((mean(&a, idx), mean(&c, idx)))).unwrap());
    }

    #[test]
    fn paired_bootstrap_skips_resamples_where_the_metric_is_undefined() {
        // An AUC on 4 items, 1 positive: a resample without it has no AUC and is left out.
        let labels = [true, false, false, false];
        let (a, b) = ([0.9, 0.1, 0.2, 0.3], [0.2, 0.1, 0.5, 0.3]);
        let auc = |s: &[f64], idx: &[usize]| {
            let sc: Vec<f64> = idx.iter().map(|&i| s[i]).collect();
            let lb: Vec<bool> = idx.iter().map(|&i| labels[i]).collect();
            roc_auc(&sc, &lb)
        };
        let cfg = BootstrapConfig { resamples: 100, ..BootstrapConfig::default() };
        let d = paired_bootstrap(4, &cfg, |idx| Some((auc(&a, idx)?, auc(&b, idx)?))).unwrap();
        assert_eq!((d.base, d.other), (1.0, 1.0 / 3.0));
        assert!(d.resamples > 0 && d.resamples < 100, "{d:?}");
        assert_eq!(paired_bootstrap(4, &cfg, |_| None::<(f64, f64)>), None);
        assert_eq!(paired_bootstrap(4, &BootstrapConfig { level: 1.0, ..cfg }, |_| Some((0.0, 0.0))), None);
        assert!(close(quantile(&[0.0, 1.0, 2.0, 3.0], 0.5), 1.5));
    }
}
