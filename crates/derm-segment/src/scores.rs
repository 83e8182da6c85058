//! Per-image scores as `derm segment eval` saves them (`per_image.csv`: `id`, `jaccard`, `dice`),
//! and the paired comparison of two segmenters scored on the same images.

use std::path::{Path, PathBuf};

use derm_core::metrics::{self, BootstrapConfig, Comparison, PairedMetric, SegmentationScores};
use derm_core::{Error, Result};
use derm_data::table::{self, Table};

/// Each image's Jaccard and Dice.
#[derive(Debug, Clone, PartialEq)]
pub struct PerImageScores {
    /// The file read or to write.
    pub path: PathBuf,
    /// Image ids.
    pub ids: Vec<String>,
    /// Per-image Jaccard (IoU).
    pub jaccard: Vec<f64>,
    /// Per-image Dice.
    pub dice: Vec<f64>,
}

impl PerImageScores {
    /// The scores of an evaluation, to be written to `path`.
    pub fn of(scores: &SegmentationScores, path: &Path) -> PerImageScores {
        PerImageScores {
            path: path.into(),
            ids: scores.ids.clone(),
            jaccard: scores.per_image.iter().map(|c| c.jaccard()).collect(),
            dice: scores.per_image.iter().map(|c| c.dice()).collect(),
        }
    }

    /// Writes the file (six decimals), atomically.
    pub fn write(&self) -> Result<()> {
        let mut csv = String::from("id,jaccard,dice\n");
        for ((id, j), d) in self.ids.iter().zip(&self.jaccard).zip(&self.dice) {
            csv.push_str(&format!("{id},{j:.6},{d:.6}\n"));
        }
        derm_core::fsutil::write_atomic(&self.path, csv.as_bytes())
    }

    /// Reads a `per_image.csv`; the error names the file and the line of a row that is short or
    /// holds a score outside [0, 1].
    pub fn read(path: &Path) -> Result<PerImageScores> {
        let t = Table::read(path, ",")?;
        let cols = [t.column("id")?, t.column("jaccard")?, t.column("dice")?];
        t.require_well_formed()?;
        let mut s = PerImageScores { path: path.into(), ids: vec![], jaccard: vec![], dice: vec![] };
        for row in &t.rows {
            s.jaccard.push(t.unit_cell(row, cols[1], "a score in [0, 1]")?);
            s.dice.push(t.unit_cell(row, cols[2], "a score in [0, 1]")?);
            s.ids.push(row.1[cols[0]].clone());
        }
        if s.ids.is_empty() {
            return Err(Error::Parse { path: path.into(), msg: "no scores".into() });
        }
        Ok(s)
    }

    /// Compares `other`'s scores of the same images with these (the base): per-image Jaccard,
    /// ISIC 2018's thresholded Jaccard and Dice, each averaged over the images, with paired
    /// bootstrap intervals of `other - base` over the same resamples.
    pub fn compare(&self, other: &PerImageScores, bootstrap: &BootstrapConfig) -> Result<Comparison> {
        let pairs = table::pair_ids(&self.ids, &self.path, &other.ids, &other.path)?;
        let mean = |v: &dyn Fn(usize) -> f64, idx: &[usize]| idx.iter().map(|&i| v(i)).sum::<f64>() / idx.len() as f64;
        let metric = |name: &str, f: fn(&PerImageScores, usize) -> f64| -> (String, PairedMetric) {
            let pairs = &pairs;
            (
                name.to_string(),
                Box::new(move |idx: &[usize]| Some((mean(&|i| f(self, i), idx), mean(&|i| f(other, pairs[i]), idx)))),
            )
        };
        let metrics = [
            metric("per-image Jaccard", |s, i| s.jaccard[i]),
            metric("thresholded Jaccard (ISIC 2018)", |s, i| {
                metrics::thresholded_jaccard(s.jaccard[i], metrics::ISIC2018_JACCARD_THRESHOLD)
            }),
            metric("Dice", |s, i| s.dice[i]),
        ];
        Ok(Comparison::of(self.ids.len(), bootstrap, metrics))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn written_scores_read_back_and_compare_paired_by_id() {
        let d = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..30).map(|i| format!("ISIC_{i:07}")).collect();
        let j: Vec<f64> = (0..30).map(|i| 0.49 + (i % 7) as f64 * 0.05).collect();
        let a = PerImageScores { path: d.path().join("a.csv"), ids: ids.clone(), dice: j.clone(), jaccard: j.clone() };
        a.write().unwrap();
        let a = PerImageScores::read(&a.path).unwrap();
        assert_eq!((a.ids.len(), a.jaccard[3]), (30, 0.64));
        // The other segmenter: 0.02 better on every image, its file in another order.
        let mut b = PerImageScores {
            path: d.path().join("b.csv"),
            ids: ids.iter().rev().cloned().collect(),
            jaccard: j.iter().rev().map(|x| x + 0.02).collect(),
            dice: j.iter().rev().cloned().collect(),
        };
        b.write().unwrap();
        b = PerImageScores::read(&b.path).unwrap();
        let c = a.compare(&b, &BootstrapConfig { resamples: 100, ..BootstrapConfig::default() }).unwrap();
        let names: Vec<&str> = c.metrics.iter().map(|m| m.metric.as_str()).collect();
        assert_eq!(names, ["per-image Jaccard", "thresholded Jaccard (ISIC 2018)", "Dice"]);
        let jac = &c.metrics[0].difference;
        assert!((jac.difference - 0.02).abs() < 1e-9 && (jac.low - 0.02).abs() < 1e-9, "{jac:?}");
        // 0.64 + 0.02 crosses ISIC 2018's threshold: those images gain 0.66 there.
        let thr = &c.metrics[1].difference;
        assert!(thr.difference > 0.02, "{thr:?}");
        assert_eq!(c.metrics[2].difference.difference, 0.0);
    }

    #[test]
    fn bad_score_files_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("per_image.csv");
        let err = |text: &str| {
            std::fs::write(&p, text).unwrap();
            PerImageScores::read(&p).unwrap_err().to_string()
        };
        let e = err("id,jaccard\nA,0.5\n");
        assert!(e.contains("per_image.csv") && e.contains("missing column \"dice\""), "{e}");
        let e = err("id,jaccard,dice\nA,1.5,0.5\n");
        assert!(e.contains("line 2") && e.contains("jaccard \"1.5\""), "{e}");
        let e = err("id,jaccard,dice\n");
        assert!(e.contains("no scores"), "{e}");
    }
}
