//! `derm data check`: validates a folder against its manifest and reports, with file names,
//! everything that is wrong. Nothing here panics on bad data; every problem becomes an issue.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use derm_core::image_io::{load_mask, load_rgb};
use derm_core::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dataset::{rel, scan_split, Dataset, Sample};
use crate::manifest::{pattern_base, ExtraKind, Manifest};

/// How many file names an issue lists before it only counts.
pub const EXAMPLES: usize = 5;

/// The kinds of problem a check reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueKind {
    /// A split asked for with `--split` is not there.
    SplitAbsent,
    /// The label table is missing or unreadable.
    LabelsMissing,
    /// The label table lacks a column the manifest names.
    CsvMissingColumn,
    /// Two images, or two label rows, share an id.
    DuplicateId,
    /// An image has no mask.
    MissingMask,
    /// An image lacks a declared extra file.
    MissingExtra,
    /// An image has no row in the label table.
    UnlabelledImage,
    /// A label row names an id with no image.
    LabelWithoutImage,
    /// A label cell or folder that is not a class, or a malformed row.
    BadLabel,
    /// An image that cannot be decoded (corrupt, truncated, empty, unknown format).
    UnreadableImage,
    /// A mask (or extra file) that cannot be decoded.
    UnreadableMask,
    /// A mask (or extra file) whose size differs from its image's.
    MaskSizeMismatch,
    /// The number of images (per class) differs from the published count.
    CountMismatch,
    /// The manifest names a lesion/patient grouping table that is missing or unreadable.
    GroupsMissing,
}

impl IssueKind {
    /// A short human description.
    pub fn describe(self) -> &'static str {
        match self {
            IssueKind::SplitAbsent => "split absent",
            IssueKind::LabelsMissing => "label table missing or unreadable",
            IssueKind::CsvMissingColumn => "label table lacks a column",
            IssueKind::DuplicateId => "duplicate ids",
            IssueKind::MissingMask => "images without a mask",
            IssueKind::MissingExtra => "images without an extra file",
            IssueKind::UnlabelledImage => "images without a label",
            IssueKind::LabelWithoutImage => "labels without an image",
            IssueKind::BadLabel => "bad label values or rows",
            IssueKind::UnreadableImage => "unreadable or corrupt images",
            IssueKind::UnreadableMask => "unreadable or corrupt masks",
            IssueKind::MaskSizeMismatch => "masks of the wrong size",
            IssueKind::CountMismatch => "counts differ from the published ones",
            IssueKind::GroupsMissing => "lesion/patient grouping table missing (splits fall back to ids)",
        }
    }
}

/// Problems collected while scanning, by kind, with every file concerned.
#[derive(Debug, Clone, Default)]
pub struct Issues {
    by_kind: BTreeMap<IssueKind, Vec<String>>,
    fatal: Option<(IssueKind, String)>,
}

impl Issues {
    /// Records one problem.
    pub fn push(&mut self, kind: IssueKind, what: impl Into<String>) {
        self.by_kind.entry(kind).or_default().push(what.into());
    }

    /// Records a problem that makes the split unusable for loading (kept as its error text).
    pub(crate) fn push_fatal(&mut self, kind: IssueKind, what: String, err: Error) {
        self.push(kind, what);
        if self.fatal.is_none() {
            self.fatal = Some((kind, err.to_string()));
        }
    }

    /// The first fatal problem as an error.
    pub(crate) fn fatal(&self) -> Option<Error> {
        self.fatal.as_ref().map(|(_, msg)| Error::invalid(msg.clone()))
    }

    /// Number of problems.
    pub fn len(&self) -> usize {
        self.by_kind.values().map(Vec::len).sum()
    }

    /// True when nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One [`Issue`] per kind, listing the first [`EXAMPLES`] files.
    pub fn summarise(&self) -> Vec<Issue> {
        self.by_kind
            .iter()
            .map(|(&kind, all)| Issue {
                kind,
                count: all.len(),
                examples: all.iter().take(EXAMPLES).cloned().collect(),
            })
            .collect()
    }
}

/// One kind of problem in a split: how many, and the first few files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issue {
    /// What is wrong.
    pub kind: IssueKind,
    /// How many times.
    pub count: usize,
    /// The first few occurrences, naming files (relative to the root).
    pub examples: Vec<String>,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.count, self.kind.describe(), self.examples.join("; "))?;
        if self.count > self.examples.len() {
            write!(f, "; and {} more", self.count - self.examples.len())?;
        }
        Ok(())
    }
}

/// Found and published numbers of images of one class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCount {
    /// Class name.
    pub class: String,
    /// Images found with this label.
    pub found: usize,
    /// The published count, if the manifest gives one.
    pub expected: Option<usize>,
}

/// What a check found in one split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitReport {
    /// Split name.
    pub split: String,
    /// Whether the split's image folder exists.
    pub present: bool,
    /// Images found.
    pub images: usize,
    /// Published number of images.
    pub expected_images: Option<usize>,
    /// Images with a mask.
    pub masks: usize,
    /// Images with a label.
    pub labelled: usize,
    /// Distinct lesion/patient groups (images without one count as their own), when the
    /// manifest declares a grouping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<usize>,
    /// Per-class counts (empty for unlabelled data sets).
    pub classes: Vec<ClassCount>,
    /// Everything wrong.
    pub issues: Vec<Issue>,
}

/// What a check found in every split it looked at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Manifest name.
    pub manifest: String,
    /// The folder checked.
    pub root: PathBuf,
    /// Whether image files were decoded.
    pub decoded: bool,
    /// One report per split.
    pub splits: Vec<SplitReport>,
}

impl CheckReport {
    /// Total number of problems over all splits.
    pub fn problems(&self) -> usize {
        self.splits.iter().flat_map(|s| &s.issues).map(|i| i.count).sum()
    }

    /// Errors when there is any problem (for `--strict`), summarising them.
    pub fn into_strict(self) -> Result<CheckReport> {
        let n = self.problems();
        if n == 0 {
            return Ok(self);
        }
        let first: Vec<String> = self
            .splits
            .iter()
            .flat_map(|s| s.issues.iter().map(move |i| format!("{}: {i}", s.split)))
            .take(3)
            .collect();
        Err(Error::invalid(format!(
            "{} under {}: {n} problem(s): {}",
            self.manifest,
            self.root.display(),
            first.join(" | ")
        )))
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} at {}", self.manifest, self.root.display())?;
        for s in &self.splits {
            if !s.present {
                writeln!(f, "  {}: absent", s.split)?;
                for i in &s.issues {
                    writeln!(f, "    problem: {i}")?;
                }
                continue;
            }
            let exp = s.expected_images.map(|e| format!(" (expected {e})")).unwrap_or_default();
            let groups = s.groups.map(|g| format!(", {g} lesion/patient groups")).unwrap_or_default();
            writeln!(
                f,
                "  {}: {} images{exp}, {} with masks, {} labelled{groups}",
                s.split, s.images, s.masks, s.labelled
            )?;
            for c in &s.classes {
                let exp = c.expected.map(|e| format!(" (expected {e})")).unwrap_or_default();
                writeln!(f, "    {:<28} {:>6}{exp}", c.class, c.found)?;
            }
            for i in &s.issues {
                writeln!(f, "    problem: {i}")?;
            }
        }
        let n = self.problems();
        if n == 0 {
            write!(f, "ok: no problems")
        } else {
            write!(f, "{n} problem(s)")
        }
    }
}

/// What to check.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// Only this split; it must be present. `None` checks every split and reports absent ones
    /// without counting them as problems.
    pub split: Option<String>,
    /// Skip decoding images and masks (only file presence, labels and counts).
    pub no_decode: bool,
}

/// Checks the folder `root` against `manifest`. `progress` is called once per decoded sample
/// (from several threads).
pub fn check(
    manifest: &Manifest,
    root: &Path,
    opts: &CheckOptions,
    progress: &(dyn Fn() + Sync),
) -> Result<CheckReport> {
    if !root.is_dir() {
        return Err(Error::invalid(format!("{} is not a folder", root.display())));
    }
    let specs = match &opts.split {
        Some(s) => vec![manifest.split(s)?],
        None => manifest.splits.iter().collect(),
    };
    let mut splits = Vec::new();
    for spec in specs {
        let scan = scan_split(manifest, spec, root)?;
        let mut issues = scan.issues;
        if !scan.present {
            if opts.split.is_some() {
                issues.push(
                    IssueKind::SplitAbsent,
                    format!("no folder {}", rel(root, &pattern_base(root, &spec.images))),
                );
            }
            splits.push(SplitReport {
                split: spec.name.clone(),
                present: false,
                images: 0,
                expected_images: spec.count,
                masks: 0,
                labelled: 0,
                groups: None,
                classes: Vec::new(),
                issues: issues.summarise(),
            });
            continue;
        }
        if !opts.no_decode {
            let found: Vec<(IssueKind, String)> = scan
                .samples
                .par_iter()
                .flat_map_iter(|s| {
                    let r = decode_sample(root, s);
                    progress();
                    r
                })
                .collect();
            for (k, w) in found {
                issues.push(k, w);
            }
        }
        let samples = &scan.samples;
        let mut classes: Vec<ClassCount> = manifest
            .classes
            .iter()
            .enumerate()
            .map(|(i, c)| ClassCount {
                class: c.clone(),
                found: samples.iter().filter(|s| s.label == Some(i)).count(),
                expected: spec.class_counts.get(c).copied(),
            })
            .collect();
        if spec.labels.is_none() {
            classes.clear();
        }
        if let Some(e) = spec.count.filter(|&e| e != samples.len()) {
            issues.push(IssueKind::CountMismatch, format!("{} images, expected {e}", samples.len()));
        }
        for c in &classes {
            if let Some(e) = c.expected.filter(|&e| e != c.found) {
                issues.push(IssueKind::CountMismatch, format!("{}: {}, expected {e}", c.class, c.found));
            }
        }
        splits.push(SplitReport {
            split: spec.name.clone(),
            present: true,
            images: samples.len(),
            expected_images: spec.count,
            masks: samples.iter().filter(|s| s.mask.is_some()).count(),
            labelled: samples.iter().filter(|s| s.label.is_some()).count(),
            groups: spec
                .groups
                .as_ref()
                .map(|_| samples.iter().map(Sample::split_key).collect::<std::collections::BTreeSet<_>>().len()),
            classes,
            issues: issues.summarise(),
        });
    }
    Ok(CheckReport { manifest: manifest.name.clone(), root: root.to_path_buf(), decoded: !opts.no_decode, splits })
}

/// A sample left out of training because one of its files could not be used.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BadSample {
    /// The sample id.
    pub id: String,
    /// What is wrong, naming the file (relative to the root).
    pub problem: String,
}

/// Decodes every image, mask and extra file of `ds` once, in parallel, before training starts,
/// so that a corrupt or truncated file stops the run at once (naming it) instead of after
/// minutes of training. With `skip_bad` the samples concerned are left out instead and listed.
/// `progress` is called once per sample (from several threads).
pub fn screen(ds: &Dataset, skip_bad: bool, progress: &(dyn Fn() + Sync)) -> Result<(Dataset, Vec<BadSample>)> {
    let bad: Vec<BadSample> = ds
        .samples
        .par_iter()
        .filter_map(|s| {
            let problems = decode_sample(&ds.root, s);
            progress();
            (!problems.is_empty()).then(|| BadSample {
                id: s.id.clone(),
                problem: problems.into_iter().map(|(_, w)| w).collect::<Vec<_>>().join("; "),
            })
        })
        .collect();
    if bad.is_empty() {
        return Ok((ds.clone(), bad));
    }
    if !skip_bad {
        let shown: Vec<&str> = bad.iter().take(5).map(|b| b.problem.as_str()).collect();
        let more = if bad.len() > 5 { format!(" (and {} more)", bad.len() - 5) } else { String::new() };
        return Err(Error::invalid(format!(
            "{} of {} samples in {} have unusable files: {}{more}; run `derm data check` for the full list, or pass --skip-bad to train without them",
            bad.len(),
            ds.len(),
            ds.root.display(),
            shown.join("; ")
        )));
    }
    for b in &bad {
        tracing::warn!(id = %b.id, "skipped: {}", b.problem);
    }
    let dropped: std::collections::HashSet<&str> = bad.iter().map(|b| b.id.as_str()).collect();
    Ok((ds.filter(|s| !dropped.contains(s.id.as_str())), bad))
}

/// Decodes one sample's files; returns its problems.
fn decode_sample(root: &Path, s: &Sample) -> Vec<(IssueKind, String)> {
    let mut out = Vec::new();
    let strip = |e: Error, p: &Path| {
        let msg = e.to_string();
        let full = p.display().to_string();
        msg.strip_prefix(&full).map(|m| format!("{}{m}", rel(root, p))).unwrap_or(msg)
    };
    let dims = match load_rgb(&s.image) {
        Ok(img) => Some(img.dimensions()),
        Err(e) => {
            out.push((IssueKind::UnreadableImage, strip(e, &s.image)));
            None
        }
    };
    let mut paired: Vec<(&PathBuf, bool)> = s.mask.iter().map(|p| (p, true)).collect();
    paired.extend(s.extras.values().map(|(k, p)| (p, *k == ExtraKind::Mask)));
    for (p, is_mask) in paired {
        let got =
            if is_mask { load_mask(p, None).map(|m| m.dimensions()) } else { load_rgb(p).map(|m| m.dimensions()) };
        let got = match got {
            Ok(d) => d,
            Err(e) => {
                out.push((IssueKind::UnreadableMask, strip(e, p)));
                continue;
            }
        };
        if let Some((w, h)) = dims.filter(|&d| d != got) {
            out.push((
                IssueKind::MaskSizeMismatch,
                format!("{} is {}x{}, its image is {w}x{h}", rel(root, p), got.0, got.1),
            ));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::dataset::tests::{isic2017_tree, put_mask, put_rgb, put_text};

    fn run(root: &Path, split: Option<&str>) -> CheckReport {
        let m = Manifest::builtin("isic2017").unwrap();
        let opts = CheckOptions { split: split.map(String::from), no_decode: false };
        check(&m, root, &opts, &|| {}).unwrap()
    }

    fn issue(r: &CheckReport, kind: IssueKind) -> Option<Issue> {
        r.splits.iter().flat_map(|s| &s.issues).find(|i| i.kind == kind).cloned()
    }

    #[test]
    fn clean_tree_reports_counts_and_absent_splits_are_not_problems() {
        let d = tempfile::tempdir().unwrap();
        isic2017_tree(d.path(), 6);
        let r = run(d.path(), None);
        assert_eq!(r.splits.len(), 3);
        let t = &r.splits[0];
        assert!(t.present && !r.splits[1].present && !r.splits[2].present);
        assert_eq!((t.images, t.masks, t.labelled), (6, 6, 6));
        let found: Vec<usize> = t.classes.iter().map(|c| c.found).collect();
        assert_eq!(found, [2, 2, 2]);
        // Only the published counts differ from this tiny tree.
        assert!(t.issues.iter().all(|i| i.kind == IssueKind::CountMismatch), "{r}");
        assert_eq!(issue(&r, IssueKind::CountMismatch).unwrap().count, 4);
        assert!(r.to_string().contains("validation: absent"), "{r}");
        // Asking for an absent split is a problem.
        let r = run(d.path(), Some("test"));
        assert!(issue(&r, IssueKind::SplitAbsent).unwrap().examples[0].contains("ISIC-2017_Test_v2_Data"));
        assert!(r.clone().into_strict().is_err());
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("split_absent"), "{json}");
    }

    #[test]
    fn truncated_jpeg_is_reported_and_screening_refuses_or_skips_it() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        isic2017_tree(r, 6);
        let img = r.join("ISIC-2017_Training_Data/ISIC_0000004.jpg");
        let bytes = std::fs::read(&img).unwrap();
        std::fs::write(&img, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let rep = run(r, Some("train"));
        let i = issue(&rep, IssueKind::UnreadableImage).unwrap();
        assert!(i.examples[0].contains("ISIC_0000004.jpg") && i.examples[0].contains("truncated"), "{i}");

        let ds = Dataset::open(&Manifest::builtin("isic2017").unwrap(), r, "train").unwrap();
        let e = screen(&ds, false, &|| {}).unwrap_err().to_string();
        assert!(e.contains("ISIC_0000004.jpg") && e.contains("--skip-bad"), "{e}");
        let seen = std::sync::atomic::AtomicUsize::new(0);
        let (kept, bad) = screen(&ds, true, &|| {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(seen.into_inner(), 6);
        assert_eq!(kept.len(), 5);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].id, "ISIC_0000004");
        assert!(kept.samples.iter().all(|s| s.id != "ISIC_0000004"));
    }

    #[test]
    fn every_bad_input_is_reported_with_its_file() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        isic2017_tree(r, 9);
        let img = |id: &str| r.join(format!("ISIC-2017_Training_Data/{id}.jpg"));
        let mask = |id: &str| r.join(format!("ISIC-2017_Training_Part1_GroundTruth/{id}_segmentation.png"));
        // Missing mask.
        std::fs::remove_file(mask("ISIC_0000001")).unwrap();
        // Corrupt image: a truncated PNG under a .jpg name, and an empty one.
        std::fs::write(img("ISIC_0000002"), b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").unwrap();
        std::fs::write(img("ISIC_0000003"), b"").unwrap();
        // Mask of the wrong size.
        put_mask(&mask("ISIC_0000004"), 5, 5);
        // Corrupt mask.
        std::fs::write(mask("ISIC_0000005"), b"not a png").unwrap();
        // Image without a label.
        put_rgb(&img("ISIC_0000100"), 12, 9);
        put_mask(&mask("ISIC_0000100"), 12, 9);
        // Label without image, duplicate row, bad value.
        let csv = r.join("ISIC-2017_Training_Part3_GroundTruth.csv");
        let mut text = std::fs::read_to_string(&csv).unwrap();
        text.push_str("ISIC_0000200,1.0,0.0\nISIC_0000006,0.0,0.0\nISIC_0000007,1.0,1.0\nISIC_0000008,x,0\n");
        text = text
            .lines()
            .filter(|l| !l.starts_with("ISIC_0000007,0") && !l.starts_with("ISIC_0000008,0"))
            .map(|l| format!("{l}\n"))
            .collect();
        put_text(&csv, &text);
        // Duplicate image id (same id, second extension).
        put_rgb(&r.join("ISIC-2017_Training_Data/ISIC_0000000.JPG"), 12, 9);
        let m = Manifest::builtin("isic2017").unwrap();
        let mut m2 = m.clone();
        m2.splits[0].images = "ISIC-2017_Training_Data/{id}.*".into();
        let rep = check(&m2, r, &CheckOptions::default(), &|| {}).unwrap();
        let text = rep.to_string();
        let has = |k: IssueKind, s: &str| {
            let i = issue(&rep, k).unwrap_or_else(|| panic!("no {k:?} in {text}"));
            assert!(i.examples.iter().any(|e| e.contains(s)), "{k:?} lacks {s}: {i}");
        };
        has(IssueKind::MissingMask, "ISIC_0000001");
        has(IssueKind::UnreadableImage, "ISIC_0000002.jpg");
        has(IssueKind::UnreadableImage, "ISIC_0000003.jpg: empty");
        has(IssueKind::MaskSizeMismatch, "ISIC_0000004_segmentation.png is 5x5, its image is 12x9");
        has(IssueKind::UnreadableMask, "ISIC_0000005_segmentation.png");
        has(IssueKind::UnlabelledImage, "ISIC_0000100.jpg");
        has(IssueKind::LabelWithoutImage, "ISIC_0000200");
        has(IssueKind::DuplicateId, "ISIC_0000006 on lines");
        has(IssueKind::DuplicateId, "ISIC_0000000.JPG");
        has(IssueKind::BadLabel, "several one-hot");
        has(IssueKind::BadLabel, "\"x\" is not a number");
        let e = rep.into_strict().unwrap_err().to_string();
        assert!(e.contains("problem"), "{e}");
        // Loading still works and keeps the unlabelled image without a label.
        let ds = crate::Dataset::open(&m, r, "train").unwrap();
        assert_eq!(ds.samples.iter().find(|s| s.id == "ISIC_0000100").unwrap().label, None);
    }

    #[test]
    fn missing_column_and_missing_table_are_reported_not_panicked() {
        let d = tempfile::tempdir().unwrap();
        isic2017_tree(d.path(), 3);
        let csv = d.path().join("ISIC-2017_Training_Part3_GroundTruth.csv");
        put_text(&csv, "image_id,mel\nISIC_0000000,1\n");
        let r = run(d.path(), None);
        let i = issue(&r, IssueKind::CsvMissingColumn).unwrap();
        assert!(i.examples[0].contains("ISIC-2017_Training_Part3_GroundTruth.csv"), "{i}");
        std::fs::remove_file(&csv).unwrap();
        let r = run(d.path(), None);
        assert!(issue(&r, IssueKind::LabelsMissing).is_some(), "{r}");
        assert!(!d.path().join("nope").exists());
        let m = Manifest::builtin("isic2017").unwrap();
        assert!(check(&m, &d.path().join("nope"), &CheckOptions::default(), &|| {}).is_err());
    }

    #[test]
    fn issue_lists_first_few_and_counts_the_rest() {
        let mut is = Issues::default();
        for i in 0..12 {
            is.push(IssueKind::MissingMask, format!("f{i}"));
        }
        let s = is.summarise();
        assert_eq!(s[0].count, 12);
        assert_eq!(s[0].examples.len(), EXAMPLES);
        assert!(s[0].to_string().ends_with("and 7 more"), "{}", s[0]);
    }
}
