//! Scoring as the ISIC challenges do: ROC AUC per class one-vs-rest and their mean (ISIC 2017
//! ranks by the mean over melanoma and seborrheic keratosis), specificity at 82, 89 and 95%
//! sensitivity for melanoma, the confusion matrix, balanced accuracy (ISIC 2018 task 3),
//! accuracy, and per-class sensitivity and specificity. [`Predictions::compare`] sets two
//! classifiers' saved probabilities side by side with paired bootstrap intervals.

use std::path::{Path, PathBuf};

use derm_core::metrics::{self, BootstrapConfig, Comparison, ConfusionMatrix, PairedMetric, RocPoint};
use derm_core::{Error, Result};
use derm_data::table::{self, Table};
use serde::{Deserialize, Serialize};

/// The sensitivities at which ISIC 2017 reports melanoma specificity.
pub const ISIC2017_SENSITIVITIES: [f64; 3] = [0.82, 0.89, 0.95];

/// Specificity at one required sensitivity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpecificityAt {
    /// The required sensitivity.
    pub sensitivity: f64,
    /// The best specificity reaching it (`None` when a class is absent).
    pub specificity: Option<f64>,
}

/// Everything the classifier is scored on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationReport {
    /// Class names, in label order.
    pub classes: Vec<String>,
    /// Images scored.
    pub images: usize,
    /// Images per true class.
    pub class_counts: Vec<usize>,
    /// ROC AUC of each class one-vs-rest (`None` when the class or its complement is absent).
    pub auc: Vec<Option<f64>>,
    /// The classes whose AUCs make the mean: melanoma and seborrheic keratosis for the ISIC 2017
    /// classes (as its scorer), every class otherwise.
    pub scored_classes: Vec<usize>,
    /// Mean AUC over `scored_classes` (those with a value).
    pub mean_auc: Option<f64>,
    /// The class taken as melanoma (the class named `melanoma`, else 0).
    pub melanoma_class: usize,
    /// Melanoma specificity at 82, 89 and 95% sensitivity.
    pub melanoma_specificity: Vec<SpecificityAt>,
    /// Confusion matrix of the arg-max predictions, rows true, columns predicted.
    pub confusion: ConfusionMatrix,
    /// Plain accuracy of the arg-max.
    pub accuracy: f64,
    /// Mean per-class sensitivity (ISIC 2018 task 3's balanced multi-class accuracy).
    pub balanced_accuracy: f64,
    /// Per-class sensitivity (recall).
    pub sensitivity: Vec<Option<f64>>,
    /// Per-class specificity.
    pub specificity: Vec<Option<f64>>,
}

/// Which data an evaluation scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataRef {
    /// Data set name (its manifest).
    pub name: String,
    /// Split.
    pub split: String,
    /// Folder.
    pub root: std::path::PathBuf,
}

/// What `derm classify eval` reports (`--json`, `metrics.json`), read back typed by the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    /// The model folder.
    pub model: std::path::PathBuf,
    /// The data scored.
    pub data: DataRef,
    /// Whether symmetric views were averaged (test-time augmentation).
    pub tta: bool,
    /// How many views were averaged per image ([`crate::Classifier::test_time_views`] with
    /// `tta`, else 1; 0 in summaries written before it was recorded).
    #[serde(default)]
    pub tta_views: usize,
    /// The folder of purified images classified instead of the originals, if any.
    pub purified_input: Option<std::path::PathBuf>,
    /// Whether the model read lesion windows ([`crate::ClassifyConfig::lesion_crop_margin`]).
    #[serde(default)]
    pub lesion_windows: bool,
    /// The folder of lesion masks the windows were cut with (`None` with windows: the data
    /// set's own masks).
    #[serde(default)]
    pub lesion_masks: Option<std::path::PathBuf>,
    /// The scores.
    pub report: ClassificationReport,
}

/// The decided class of each row: the largest probability times its class weight (`weights`
/// empty, or shorter than a row: weight 1).
pub fn decide(probs: &[Vec<f64>], weights: &[f64]) -> Vec<usize> {
    probs
        .iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(k, p)| p * weights.get(k).copied().unwrap_or(1.0))
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(k, _)| k)
                .unwrap_or(0)
        })
        .collect()
}

/// A class whose sensitivity an operating point must reach: (class index, least sensitivity).
pub type SensitivityFloor = Option<(usize, f64)>;

/// The balanced accuracy of `weights`, or, when it leaves `floor`'s class below its least
/// sensitivity, the shortfall minus 1: any operating point meeting the floor is better, and
/// among those below it the nearer is.
fn objective(probs: &[Vec<f64>], labels: &[usize], k: usize, weights: &[f64], floor: SensitivityFloor) -> f64 {
    let cm = ConfusionMatrix::new(labels, &decide(probs, weights), k);
    let short = floor.and_then(|(c, s)| Some(cm.per_class_sensitivity().get(c).copied().flatten()? - s));
    match short {
        Some(d) if d < -1e-12 => d - 1.0,
        _ => cm.balanced_accuracy(),
    }
}

/// The weights searched for each class but the first: 2^(-4..4) in steps of 2^(1/4).
fn weight_grid() -> Vec<f64> {
    (-16..=16).map(|e| 2f64.powf(e as f64 / 4.0)).collect()
}

/// The most weight combinations [`choose_decision_weights`] tries one by one: all of them for
/// three classes (33^2) or four (33^3); beyond, it searches by coordinate ascent.
const EXHAUSTIVE_LIMIT: usize = 40_000;

/// Per-class weights on the probabilities that maximise the balanced accuracy of `probs`
/// against `labels` (ISIC 2018's metric; a prior correction for imbalanced classes), among those
/// that keep the sensitivity of `floor`'s class at least `floor`'s value when one is given (when
/// none does, the nearest to it). Class 0 keeps weight 1; the others take values on a grid of
/// 2^(-4..4) in steps of 2^(1/4). Up to four classes every combination is tried; with more, the
/// grid is searched by coordinate ascent (three rounds), which a floor can leave short of the
/// best (on one ISIC validation part: balanced accuracy 0.548 against 0.594). Ties keep the
/// weights nearest 1. Returns the weights and the balanced accuracy before (all 1) and after.
pub fn choose_decision_weights(
    probs: &[Vec<f64>],
    labels: &[usize],
    k: usize,
    floor: SensitivityFloor,
) -> (Vec<f64>, f64, f64) {
    let balanced = |w: &[f64]| ConfusionMatrix::new(labels, &decide(probs, w), k).balanced_accuracy();
    let before = balanced(&vec![1.0; k]);
    let grid = weight_grid();
    let combinations = grid.len().checked_pow(k.saturating_sub(1) as u32);
    let score = |w: &[f64]| objective(probs, labels, k, w, floor);
    let w = if combinations.is_some_and(|n| n <= EXHAUSTIVE_LIMIT) {
        exhaustive_weights(&score, k, &grid)
    } else {
        coordinate_ascent_weights(&score, k, &grid)
    };
    let after = balanced(&w);
    (w, before, after)
}

/// Every combination of `grid` values for classes 1..k (class 0 at 1): the best by `score`,
/// ties to the smallest sum of |log w|.
fn exhaustive_weights(score: &dyn Fn(&[f64]) -> f64, k: usize, grid: &[f64]) -> Vec<f64> {
    let distance = |w: &[f64]| w.iter().map(|v| v.ln().abs()).sum::<f64>();
    let mut idx = vec![0usize; k.saturating_sub(1)];
    let mut best = vec![1.0; k];
    let mut best_key = (score(&best), 0.0);
    loop {
        let w: Vec<f64> = std::iter::once(1.0).chain(idx.iter().map(|&i| grid[i])).collect();
        let key = (score(&w), distance(&w));
        if key.0 > best_key.0 + 1e-12 || ((key.0 - best_key.0).abs() <= 1e-12 && key.1 < best_key.1 - 1e-12) {
            best_key = key;
            best = w;
        }
        // The next combination, as a counter in base grid.len().
        let Some(pos) = idx.iter().position(|&i| i + 1 < grid.len()) else { break };
        idx[pos] += 1;
        idx[..pos].iter_mut().for_each(|i| *i = 0);
    }
    best
}

/// Coordinate ascent by `score` over `grid` for classes 1..k (class 0 at 1), three rounds from
/// all ones; ties keep the weight nearest 1.
fn coordinate_ascent_weights(score: &dyn Fn(&[f64]) -> f64, k: usize, grid: &[f64]) -> Vec<f64> {
    let mut w = vec![1.0; k];
    let mut best = score(&w);
    for _ in 0..3 {
        for c in 1..k {
            let mut wc = w[c];
            for &g in grid {
                let mut t = w.clone();
                t[c] = g;
                let b = score(&t);
                if b > best + 1e-12 || ((b - best).abs() <= 1e-12 && g.ln().abs() < wc.ln().abs()) {
                    best = b;
                    wc = g;
                }
            }
            w[c] = wc;
        }
    }
    w
}

/// The classes ISIC 2017's mean AUC is taken over: melanoma and seborrheic keratosis when both
/// are among three classes; otherwise every class.
pub fn scored_classes(classes: &[String]) -> Vec<usize> {
    let m = classes.iter().position(|c| c == "melanoma");
    let sk = classes.iter().position(|c| c == "seborrheic_keratosis");
    match (m, sk) {
        (Some(m), Some(sk)) if classes.len() == 3 => vec![m, sk],
        _ => (0..classes.len()).collect(),
    }
}

fn one_vs_rest(probs: &[Vec<f64>], labels: &[usize], k: usize) -> (Vec<f64>, Vec<bool>) {
    (probs.iter().map(|p| p.get(k).copied().unwrap_or(0.0)).collect(), labels.iter().map(|&l| l == k).collect())
}

/// Scores class probabilities (one row per image, summing to 1) against true labels.
/// `melanoma` is the index of the melanoma class (from the data set's manifest); `None` takes
/// the class named `melanoma`, else the first. `weights` is the operating point ([`decide`];
/// empty: plain argmax).
pub fn score(
    probs: &[Vec<f64>],
    labels: &[usize],
    classes: &[String],
    melanoma: Option<usize>,
    weights: &[f64],
) -> ClassificationReport {
    let k = classes.len();
    let mut class_counts = vec![0; k];
    for &l in labels {
        if l < k {
            class_counts[l] += 1;
        }
    }
    let auc: Vec<Option<f64>> = (0..k)
        .map(|c| {
            let (s, y) = one_vs_rest(probs, labels, c);
            metrics::roc_auc(&s, &y)
        })
        .collect();
    let scored = scored_classes(classes);
    let vals: Vec<f64> = scored.iter().filter_map(|&c| auc[c]).collect();
    let mean_auc = (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64);
    let melanoma_class =
        melanoma.filter(|&m| m < k).or_else(|| classes.iter().position(|c| c == "melanoma")).unwrap_or(0);
    let (s, y) = one_vs_rest(probs, labels, melanoma_class);
    let melanoma_specificity = ISIC2017_SENSITIVITIES
        .iter()
        .map(|&t| SpecificityAt { sensitivity: t, specificity: metrics::specificity_at_sensitivity(&s, &y, t) })
        .collect();
    let pred = decide(probs, weights);
    let confusion = ConfusionMatrix::new(labels, &pred, k);
    ClassificationReport {
        classes: classes.to_vec(),
        images: labels.len(),
        class_counts,
        auc,
        scored_classes: scored,
        mean_auc,
        melanoma_class,
        melanoma_specificity,
        accuracy: confusion.accuracy(),
        balanced_accuracy: confusion.balanced_accuracy(),
        sensitivity: confusion.per_class_sensitivity(),
        specificity: confusion.per_class_specificity(),
        confusion,
    }
}

/// The one-vs-rest ROC curve of each class (empty for a class that is absent).
pub fn roc_curves(probs: &[Vec<f64>], labels: &[usize], k: usize) -> Vec<Vec<RocPoint>> {
    (0..k)
        .map(|c| {
            let (s, y) = one_vs_rest(probs, labels, c);
            metrics::roc_curve(&s, &y)
        })
        .collect()
}

impl ClassificationReport {
    /// The value training keeps the best checkpoint by: the mean AUC, or the balanced accuracy
    /// when no AUC can be computed.
    pub fn selection_metric(&self) -> f64 {
        self.mean_auc.unwrap_or(self.balanced_accuracy)
    }
}

/// Class probabilities as `derm classify eval` saves them (`predictions.csv`: `id`, `label`, then
/// one column per class).
#[derive(Debug, Clone, PartialEq)]
pub struct Predictions {
    /// The file read.
    pub path: PathBuf,
    /// Class names, in column order.
    pub classes: Vec<String>,
    /// Image ids, one per row.
    pub ids: Vec<String>,
    /// True class of each row (an index into `classes`).
    pub labels: Vec<usize>,
    /// Probabilities of each row, one per class.
    pub probs: Vec<Vec<f64>>,
}

impl Predictions {
    /// Reads a `predictions.csv`; the error names the file and the line of a row that is short,
    /// names no class, or holds something that is not a probability.
    pub fn read(path: &Path) -> Result<Predictions> {
        let t = Table::read(path, ",")?;
        let bad = |msg: String| Error::Parse { path: path.into(), msg };
        let (id_col, label_col) = (t.column("id")?, t.column("label")?);
        t.require_well_formed()?;
        let class_cols: Vec<usize> = (0..t.header.len()).filter(|&c| c != id_col && c != label_col).collect();
        if class_cols.len() < 2 {
            return Err(bad(format!("{} class columns; a classifier's predictions have at least 2", class_cols.len())));
        }
        let classes: Vec<String> = class_cols.iter().map(|&c| t.header[c].clone()).collect();
        let mut p = Predictions { path: path.into(), classes, ids: vec![], labels: vec![], probs: vec![] };
        for row in &t.rows {
            let (line, cells) = row;
            let label = p.classes.iter().position(|c| *c == cells[label_col]).ok_or_else(|| {
                bad(format!(
                    "line {line}: label {:?} is none of the classes ({})",
                    cells[label_col],
                    p.classes.join(", ")
                ))
            })?;
            let probs =
                class_cols.iter().map(|&c| t.unit_cell(row, c, "a probability")).collect::<Result<Vec<f64>>>()?;
            p.ids.push(cells[id_col].clone());
            p.labels.push(label);
            p.probs.push(probs);
        }
        if p.ids.is_empty() {
            return Err(bad("no predictions".into()));
        }
        Ok(p)
    }

    /// Writes `path` as `derm classify eval` does (six decimals), atomically.
    pub fn write(&self) -> Result<()> {
        let mut csv = format!("id,label,{}\n", self.classes.join(","));
        for ((id, &l), p) in self.ids.iter().zip(&self.labels).zip(&self.probs) {
            let vals: Vec<String> = p.iter().map(|v| format!("{v:.6}")).collect();
            csv.push_str(&format!("{id},{},{}\n", self.classes[l], vals.join(",")));
        }
        derm_core::fsutil::write_atomic(&self.path, csv.as_bytes())
    }

    /// Compares `other`'s predictions of the same images with these (the base): the mean AUC
    /// as [`score`] takes it, then each class's AUC, every one with a paired bootstrap interval
    /// of `other - base` over the same resamples of the images. Both files must hold the same
    /// ids, classes and labels.
    pub fn compare(&self, other: &Predictions, bootstrap: &BootstrapConfig) -> Result<Comparison> {
        if self.classes != other.classes {
            return Err(Error::Parse {
                path: other.path.clone(),
                msg: format!(
                    "classes {} differ from {}'s ({})",
                    other.classes.join(", "),
                    self.path.display(),
                    self.classes.join(", ")
                ),
            });
        }
        let pairs = table::pair_ids(&self.ids, &self.path, &other.ids, &other.path)?;
        if let Some(i) = (0..pairs.len()).find(|&i| self.labels[i] != other.labels[pairs[i]]) {
            return Err(Error::Parse {
                path: other.path.clone(),
                msg: format!("id {}'s label differs from {}'s", self.ids[i], self.path.display()),
            });
        }
        let other_probs: Vec<&Vec<f64>> = pairs.iter().map(|&j| &other.probs[j]).collect();
        let auc = |probs: &dyn Fn(usize) -> f64, class: usize, idx: &[usize]| {
            let s: Vec<f64> = idx.iter().map(|&i| probs(i)).collect();
            let y: Vec<bool> = idx.iter().map(|&i| self.labels[i] == class).collect();
            metrics::roc_auc(&s, &y)
        };
        let pair_auc = |c: usize, idx: &[usize]| -> Option<(f64, f64)> {
            Some((auc(&|i: usize| self.probs[i][c], c, idx)?, auc(&|i: usize| other_probs[i][c], c, idx)?))
        };
        let pair_auc = &pair_auc;
        let scored = &scored_classes(&self.classes);
        let names: Vec<&str> = scored.iter().map(|&c| self.classes[c].as_str()).collect();
        let mean_auc: (String, PairedMetric) = (
            format!("mean AUC ({})", names.join(", ")),
            Box::new(move |idx: &[usize]| {
                let each = scored.iter().map(|&c| pair_auc(c, idx)).collect::<Option<Vec<_>>>()?;
                let n = each.len() as f64;
                Some((each.iter().map(|p| p.0).sum::<f64>() / n, each.iter().map(|p| p.1).sum::<f64>() / n))
            }),
        );
        let per_class = (0..self.classes.len()).map(|c| -> (String, PairedMetric) {
            (format!("{} AUC", self.classes[c]), Box::new(move |idx: &[usize]| pair_auc(c, idx)))
        });
        Ok(Comparison::of(self.ids.len(), bootstrap, std::iter::once(mean_auc).chain(per_class)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operating_point_lifts_balanced_accuracy_on_skewed_probabilities() {
        // A model that ranks well but always favours the majority class 2.
        let mut probs = Vec::new();
        let mut labels = Vec::new();
        for i in 0..30 {
            let x = i as f64 / 30.0;
            probs.push(vec![0.25 + 0.05 * x, 0.05, 0.70 - 0.05 * x]);
            labels.push(0);
            probs.push(vec![0.05, 0.25 + 0.05 * x, 0.70 - 0.05 * x]);
            labels.push(1);
            probs.push(vec![0.1, 0.1, 0.8]);
            labels.push(2);
        }
        assert_eq!(decide(&probs, &[]), vec![2; 90]);
        let (w, before, after) = choose_decision_weights(&probs, &labels, 3, None);
        assert!((before - 1.0 / 3.0).abs() < 1e-9, "{before}");
        assert!(after > 0.95, "balanced accuracy {before} -> {after} with {w:?}");
        assert_eq!(w[0], 1.0);
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let r = score(&probs, &labels, &names, None, &w);
        assert!((r.balanced_accuracy - after).abs() < 1e-12);
        // AUCs do not depend on the operating point.
        assert_eq!(r.auc, score(&probs, &labels, &names, None, &[]).auc);
    }

    /// 60 images (12 of class 0, 12 of class 1, 36 of class 2) whose probabilities come from a
    /// 32-bit linear congruential generator, leaning to the true class and to class 2.
    fn lcg_probabilities(seed: u64) -> (Vec<Vec<f64>>, Vec<usize>) {
        let mut state = seed;
        let mut next = || {
            state = (state * 1_664_525 + 1_013_904_223) % (1 << 32);
            state as f64 / (1u64 << 32) as f64
        };
        let (mut probs, mut labels) = (Vec::new(), Vec::new());
        for i in 0..60 {
            let label = match i % 5 {
                0 => 0,
                1 => 1,
                _ => 2,
            };
            let raw: Vec<f64> =
                (0..3).map(|c| next() + if c == label { 0.5 } else { 0.0 } + if c == 2 { 0.4 } else { 0.0 }).collect();
            let sum: f64 = raw.iter().sum();
            probs.push(raw.iter().map(|v| v / sum).collect());
            labels.push(label);
        }
        (probs, labels)
    }

    #[test]
    fn every_combination_is_tried_where_coordinate_ascent_misses_the_floor() {
        let (probs, labels) = lcg_probabilities(27);
        let floor = Some((0, 0.7));
        let sens0 =
            |w: &[f64]| ConfusionMatrix::new(&labels, &decide(&probs, w), 3).per_class_sensitivity()[0].unwrap();
        // One weight at a time, the search never reaches the floor on these probabilities ...
        let score = |w: &[f64]| objective(&probs, &labels, 3, w, floor);
        let stuck = coordinate_ascent_weights(&score, 3, &weight_grid());
        assert!(sens0(&stuck) < 0.7, "the test needs a case coordinate ascent misses: {stuck:?}");
        // ... which a pair of weights does, at a balanced accuracy of 0.78.
        let (w, _, ba) = choose_decision_weights(&probs, &labels, 3, floor);
        assert!(sens0(&w) >= 0.7 && ba > 0.77, "sensitivity {} balanced accuracy {ba} with {w:?}", sens0(&w));
    }

    #[test]
    fn a_sensitivity_floor_keeps_enough_melanomas_called() {
        // Melanomas (class 0) overlap the nevi (class 2) in their melanoma probability, so the
        // best balanced accuracy gives some of them up.
        let (mut probs, mut labels) = (Vec::new(), Vec::new());
        for i in 0..10 {
            let p0 = 0.04 * (i + 1) as f64;
            probs.push(vec![p0, 0.0, 1.0 - p0]);
            labels.push(0);
        }
        for i in 0..30 {
            let p0 = 0.01 * i as f64;
            probs.push(vec![p0, 0.0, 1.0 - p0]);
            labels.push(2);
        }
        for _ in 0..10 {
            probs.push(vec![0.05, 0.9, 0.05]);
            labels.push(1);
        }
        let sens0 =
            |w: &[f64]| ConfusionMatrix::new(&labels, &decide(&probs, w), 3).per_class_sensitivity()[0].unwrap();
        let (free, _, free_ba) = choose_decision_weights(&probs, &labels, 3, None);
        assert!(sens0(&free) < 0.9, "the test needs a free operating point below the floor: {}", sens0(&free));
        let (held, _, held_ba) = choose_decision_weights(&probs, &labels, 3, Some((0, 0.9)));
        assert!(sens0(&held) >= 0.9, "{} with {held:?}", sens0(&held));
        assert!(held_ba <= free_ba + 1e-12 && held_ba > 0.6, "{held_ba} vs {free_ba}");
        // An unreachable floor (the grid cannot call the faintest melanoma) gives the nearest.
        let (most, _, _) = choose_decision_weights(&probs, &labels, 3, Some((0, 1.0)));
        assert!(sens0(&most) >= sens0(&held), "{} < {}", sens0(&most), sens0(&held));
    }

    fn classes() -> Vec<String> {
        ["melanoma", "seborrheic_keratosis", "nevus"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn isic2017_scores_on_hand_made_probabilities() {
        // Six images, two per class.
        let labels = vec![0, 0, 1, 1, 2, 2];
        let probs = vec![
            vec![0.8, 0.1, 0.1],
            vec![0.3, 0.3, 0.4], // melanoma called nevus
            vec![0.1, 0.7, 0.2],
            vec![0.2, 0.5, 0.3],
            vec![0.4, 0.1, 0.5], // nevus with a higher melanoma score than the second melanoma
            vec![0.1, 0.2, 0.7],
        ];
        let r = score(&probs, &labels, &classes(), None, &[]);
        // Melanoma scores: positives 0.8, 0.3; negatives 0.1, 0.2, 0.4, 0.1. Pairs won: 0.8 beats
        // all 4; 0.3 beats 3 of 4: AUC 7/8.
        assert_eq!(r.auc[0], Some(7.0 / 8.0));
        // Seborrheic keratosis: positives 0.7, 0.5 beat all four negatives (0.1, 0.3, 0.1, 0.2).
        assert_eq!(r.auc[1], Some(1.0));
        assert_eq!(r.scored_classes, vec![0, 1]);
        assert_eq!(r.mean_auc, Some((7.0 / 8.0 + 1.0) / 2.0));
        assert_eq!(r.confusion.counts, vec![vec![1, 0, 1], vec![0, 2, 0], vec![0, 0, 2]]);
        assert!((r.accuracy - 5.0 / 6.0).abs() < 1e-12);
        assert!((r.balanced_accuracy - (0.5 + 1.0 + 1.0) / 3.0).abs() < 1e-12);
        assert_eq!(r.sensitivity, vec![Some(0.5), Some(1.0), Some(1.0)]);
        // Nevus specificity: 4 non-nevus images, one (the missed melanoma) called nevus.
        assert_eq!(r.specificity[2], Some(0.75));
        // 82% (and 89, 95) melanoma sensitivity needs both melanomas: threshold 0.3 lets in the
        // 0.4 nevus, so specificity is 3/4.
        let s: Vec<Option<f64>> = r.melanoma_specificity.iter().map(|s| s.specificity).collect();
        assert_eq!(s, vec![Some(0.75); 3]);
        assert_eq!(r.selection_metric(), r.mean_auc.unwrap());
        let curves = roc_curves(&probs, &labels, 3);
        assert_eq!(curves[1].last().map(|p| (p.fpr, p.tpr)), Some((1.0, 1.0)));
    }

    #[test]
    fn other_class_sets_average_every_class_and_absent_classes_are_none() {
        let names: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        assert_eq!(scored_classes(&names), vec![0, 1]);
        let r = score(&[vec![0.9, 0.1], vec![0.6, 0.4]], &[0, 0], &names, None, &[]);
        assert_eq!(r.auc, vec![None, None]);
        assert_eq!(r.mean_auc, None);
        assert_eq!(r.selection_metric(), r.balanced_accuracy);
        assert_eq!(r.melanoma_specificity[0].specificity, None);
    }

    fn write_predictions(dir: &Path, name: &str, rows: &[(&str, &str, [f64; 3])]) -> PathBuf {
        let mut text = String::from("id,label,melanoma,seborrheic_keratosis,nevus\n");
        for (id, label, p) in rows {
            text.push_str(&format!("{id},{label},{},{},{}\n", p[0], p[1], p[2]));
        }
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn predictions_compare_as_the_scorer_scores_them() {
        let d = tempfile::tempdir().unwrap();
        let (probs, labels) = lcg_probabilities(7);
        let names = classes();
        // `shift` moves each image's true-class probability up: a better classifier.
        let rows = |shift: f64| -> Vec<(String, String, [f64; 3])> {
            let row = |(i, (p, &l)): (usize, (&Vec<f64>, &usize))| {
                let mut q = [p[0], p[1], p[2]];
                q[l] = (q[l] + shift).min(1.0);
                (format!("ISIC_{i:07}"), names[l].clone(), q)
            };
            probs.iter().zip(&labels).enumerate().map(row).collect()
        };
        let read = |name: &str, rows: &[(String, String, [f64; 3])]| {
            let borrowed: Vec<(&str, &str, [f64; 3])> =
                rows.iter().map(|(i, l, p)| (i.as_str(), l.as_str(), *p)).collect();
            Predictions::read(&write_predictions(d.path(), name, &borrowed)).unwrap()
        };
        let base = read("a.csv", &rows(0.0));
        let mut better_rows = rows(0.2);
        better_rows.reverse(); // paired by id, not by line
        let better = read("b.csv", &better_rows);
        let cfg = BootstrapConfig { resamples: 200, ..BootstrapConfig::default() };
        let c = base.compare(&better, &cfg).unwrap();
        assert_eq!(c.items, probs.len());
        assert_eq!(c.metrics[0].metric, "mean AUC (melanoma, seborrheic_keratosis)");
        let (a, b) = (
            score(&base.probs, &base.labels, &names, None, &[]),
            score(&better.probs, &better.labels, &names, None, &[]),
        );
        let m = &c.metrics[0].difference;
        assert!((m.base - a.mean_auc.unwrap()).abs() < 1e-12 && (m.other - b.mean_auc.unwrap()).abs() < 1e-12, "{m:?}");
        assert!(m.difference > 0.0 && m.low <= m.difference && m.difference <= m.high, "{m:?}");
        assert_eq!(c.metrics.len(), 4);
        assert!((c.metrics[3].difference.base - a.auc[2].unwrap()).abs() < 1e-12);
        // Against itself: nothing between them.
        let same = base.compare(&base, &cfg).unwrap();
        assert!(same.metrics.iter().all(|m| m.difference.difference == 0.0 && m.difference.high == 0.0));
    }

    #[test]
    fn bad_prediction_files_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p.csv");
        let err = |text: &str| {
            std::fs::write(&p, text).unwrap();
            Predictions::read(&p).unwrap_err().to_string()
        };
        let e = err("id,melanoma,nevus\nA,0.5,0.5\n");
        assert!(e.contains("p.csv") && e.contains("missing column \"label\""), "{e}");
        let e = err("id,label,melanoma,nevus\nA,melanoma,0.5\n");
        assert!(e.contains("p.csv") && e.contains("line 2"), "{e}");
        let e = err("id,label,melanoma,nevus\nA,wart,0.5,0.5\n");
        assert!(e.contains("line 2") && e.contains("\"wart\""), "{e}");
        let e = err("id,label,melanoma,nevus\nA,nevus,x,0.5\n");
        assert!(e.contains("line 2") && e.contains("melanoma \"x\" is not a probability"), "{e}");
        let e = err("id,label,melanoma\nA,melanoma,1\n");
        assert!(e.contains("1 class columns"), "{e}");
        let a = write_predictions(
            d.path(),
            "a.csv",
            &[("A", "melanoma", [0.6, 0.2, 0.2]), ("B", "nevus", [0.1, 0.1, 0.8])],
        );
        let b =
            write_predictions(d.path(), "b.csv", &[("A", "nevus", [0.6, 0.2, 0.2]), ("B", "nevus", [0.1, 0.1, 0.8])]);
        let (a, b) = (Predictions::read(&a).unwrap(), Predictions::read(&b).unwrap());
        let e = a.compare(&b, &BootstrapConfig::default()).unwrap_err().to_string();
        assert!(e.contains("b.csv") && e.contains("id A's label differs"), "{e}");
    }
}
