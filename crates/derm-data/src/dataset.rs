//! A split of a data set as a list of samples: the files of each image, its mask, its extra
//! files and its label. Nothing is decoded here; see [`crate::cache`] for lazy, cached loading.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use derm_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::check::{IssueKind, Issues};
use crate::manifest::{
    fill_pattern, match_pattern, pattern_base, resolve_filled, ExtraKind, GroupSpec, LabelSpec, Manifest, SplitSpec,
};
use crate::table::Table;

/// One sample: an image and what belongs to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Sample id (`ISIC_0000000`), unique in its split.
    pub id: String,
    /// The image file.
    pub image: PathBuf,
    /// The lesion mask, when the split has masks and this one exists.
    pub mask: Option<PathBuf>,
    /// Class index into [`Dataset::classes`], when known.
    pub label: Option<usize>,
    /// The lesion or patient this image belongs to, where the manifest knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Extra files by name (`clean`, `occlusion` for phantoms), with their kind.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extras: BTreeMap<String, (ExtraKind, PathBuf)>,
}

impl Sample {
    /// What a train/validation split keeps together: the group where known, else the id.
    pub fn split_key(&self) -> &str {
        self.group.as_deref().unwrap_or(&self.id)
    }

    /// The path of extra file `name`, if this sample has it.
    pub fn extra(&self, name: &str) -> Option<&Path> {
        self.extras.get(name).map(|(_, p)| p.as_path())
    }
}

/// One split of a data set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dataset {
    /// The manifest's name.
    pub name: String,
    /// The split's name.
    pub split: String,
    /// The folder the data lives in.
    pub root: PathBuf,
    /// Class names, in label order.
    pub classes: Vec<String>,
    /// Index of the melanoma class (from the manifest's `melanoma_class`), if any.
    pub melanoma_class: Option<usize>,
    /// The samples, sorted by id.
    pub samples: Vec<Sample>,
}

/// What scanning a split found: its samples and everything wrong on the way.
#[derive(Debug, Clone)]
pub(crate) struct Scan {
    pub present: bool,
    pub samples: Vec<Sample>,
    pub issues: Issues,
}

impl Dataset {
    /// Opens split `split` of the data set under `root` laid out as `manifest` says.
    ///
    /// Problems that leave the split unusable (absent folder, no images, a label table that
    /// is missing or lacks a column) are errors naming the file; the others (missing masks,
    /// images without labels, ...) are logged as warnings and the samples concerned are kept
    /// with `mask`/`label` set to `None`. Run [`crate::check::check`] for the full report.
    pub fn open(manifest: &Manifest, root: &Path, split: &str) -> Result<Dataset> {
        let spec = manifest.split(split)?;
        let scan = scan_split(manifest, spec, root)?;
        if !scan.present {
            return Err(Error::invalid(format!(
                "split {split} of {} is absent: no folder {}",
                manifest.name,
                pattern_base(root, &spec.images).display()
            )));
        }
        if let Some(e) = scan.issues.fatal() {
            return Err(e);
        }
        if scan.samples.is_empty() {
            return Err(Error::invalid(format!(
                "split {split} of {}: no image matches {} under {}",
                manifest.name,
                spec.images,
                root.display()
            )));
        }
        for issue in scan.issues.summarise() {
            tracing::warn!(dataset = %manifest.name, split, "{issue}");
        }
        tracing::info!(dataset = %manifest.name, split, samples = scan.samples.len(), "opened");
        Ok(Dataset {
            name: manifest.name.clone(),
            split: split.to_string(),
            root: root.to_path_buf(),
            classes: manifest.classes.clone(),
            melanoma_class: manifest.melanoma_index(),
            samples: scan.samples,
        })
    }

    /// Opens a folder with a manifest given by name or path, or, when `manifest` is `None`, the
    /// folder's own `manifest.toml` (as written by the phantom generator). `split` defaults to
    /// the manifest's first split that is present.
    pub fn open_dir(root: &Path, manifest: Option<&str>, split: Option<&str>) -> Result<Dataset> {
        let m = match manifest {
            Some(m) => Manifest::load(m)?,
            None => {
                let p = root.join("manifest.toml");
                let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
                Manifest::from_toml(&text, &p)?
            }
        };
        let split = match split {
            Some(s) => s.to_string(),
            None => {
                m.splits.iter().find(|s| pattern_base(root, &s.images).is_dir()).unwrap_or(&m.splits[0]).name.clone()
            }
        };
        Dataset::open(&m, root, &split)
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Number of samples per class (unlabelled ones are not counted).
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        for s in &self.samples {
            if let Some(l) = s.label {
                c[l] += 1;
            }
        }
        c
    }

    /// Every sample's label, `None` for unlabelled ones.
    pub fn labels(&self) -> Vec<Option<usize>> {
        self.samples.iter().map(|s| s.label).collect()
    }

    /// The same split keeping only the samples for which `keep` is true.
    pub fn filter(&self, keep: impl Fn(&Sample) -> bool) -> Dataset {
        Dataset { samples: self.samples.iter().filter(|s| keep(s)).cloned().collect(), ..self.meta() }
    }

    /// The samples named in `ids`, in the data set's order. Fails, naming `origin` (the id
    /// file), when an id is not in the data set or when no id is given: a split file from
    /// another archive or a typo must not silently train on a subset.
    pub fn select_ids(&self, ids: &[String], origin: &Path) -> Result<Dataset> {
        if ids.is_empty() {
            return Err(Error::Parse { path: origin.into(), msg: "no image ids in the file".into() });
        }
        let want: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
        let have: std::collections::HashSet<&str> = self.samples.iter().map(|s| s.id.as_str()).collect();
        let missing: Vec<&str> = ids.iter().map(String::as_str).filter(|i| !have.contains(i)).collect();
        if !missing.is_empty() {
            return Err(Error::Parse {
                path: origin.into(),
                msg: format!(
                    "{} of its {} ids are not in the data set at {} (first: {})",
                    missing.len(),
                    ids.len(),
                    self.root.display(),
                    missing.iter().take(3).copied().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        Ok(self.filter(|s| want.contains(s.id.as_str())))
    }

    fn meta(&self) -> Dataset {
        Dataset {
            name: self.name.clone(),
            split: self.split.clone(),
            root: self.root.clone(),
            classes: self.classes.clone(),
            melanoma_class: self.melanoma_class,
            samples: Vec::new(),
        }
    }

    /// Splits into (train, validation) by hashing each sample's [`Sample::split_key`] (its
    /// lesion or patient group where the manifest gives one, else its id) with `seed`: a sample
    /// goes to validation when its hash falls below `val_fraction`. All images of one group land
    /// on the same side, so one lesion is never both trained on and validated on. The assignment
    /// depends only on the key and the seed, so it does not change when samples are added or
    /// removed.
    pub fn split_by_id(&self, val_fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let (mut train, mut val) = (self.meta(), self.meta());
        train.split = format!("{}-train", self.split);
        val.split = format!("{}-val", self.split);
        let grouped = self.samples.iter().filter(|s| s.group.is_some()).count();
        if grouped > 0 {
            let groups: std::collections::BTreeSet<&str> = self.samples.iter().map(Sample::split_key).collect();
            tracing::info!(
                images = self.samples.len(),
                groups = groups.len(),
                grouped,
                "splitting by lesion/patient group"
            );
        }
        for s in &self.samples {
            if id_unit(s.split_key(), seed) < val_fraction {
                val.samples.push(s.clone());
            } else {
                train.samples.push(s.clone());
            }
        }
        if val_fraction > 0.0 && val.is_empty() && !train.is_empty() {
            tracing::warn!(
                samples = train.len(),
                val_fraction,
                seed,
                "{} split {}: the validation part is empty (too few samples, or the set was already cut by \
                 split_by_id with this seed: its held-out ids are exactly those that would validate here)",
                self.name,
                self.split
            );
        }
        (train, val)
    }

    /// The error of a stage that must choose `what` on a validation part cut from this set with
    /// `val_fraction`, when that part came out empty.
    pub fn no_validation_error(&self, what: &str, val_fraction: f64) -> Error {
        Error::invalid(format!(
            "{} split {}: choosing {what} needs a validation part, but a fraction of {val_fraction} of {} samples \
             gave none (raise --val-fraction, or hold test ids out with another seed)",
            self.name,
            self.split,
            self.len()
        ))
    }

    /// Holds out about `fraction` of the samples as a test part, as [`Dataset::split_by_id`]
    /// does (by group where known, else by id), but from a draw independent of its draw with
    /// the same seed. Cut with one draw, the training part would keep none of the keys that fall
    /// below a smaller validation fraction, and a training stage's validation part would be
    /// empty. Returns (training part, test part).
    pub fn split_held_out(&self, fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let (train, mut test) = self.split_by_id(fraction, seed ^ HELD_OUT_STREAM);
        test.split = format!("{}-test", self.split);
        (train, test)
    }

    /// The samples in a seeded random order.
    pub fn shuffled(&self, seed: u64) -> Dataset {
        let mut d = self.clone();
        derm_core::Rng::new(seed).shuffle(&mut d.samples);
        d
    }
}

/// Reads a list of image ids: one per line (blank lines and lines starting with `#` skipped),
/// or a CSV whose header names an `image_id` or `id` column (that column). The format of
/// `bench/peer/reference_train.py --make-split`, so that derm and the PyTorch reference train and
/// score on the same images.
pub fn read_id_list(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let first = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or("");
    if first.contains(',') {
        let table = Table::parse(text, path, ",", None)?;
        let col = table.column("image_id").or_else(|_| table.column("id"))?;
        return Ok(table.rows.iter().map(|(_, r)| r[col].clone()).filter(|v| !v.is_empty()).collect());
    }
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect())
}

/// Mixed into the seed of [`Dataset::split_held_out`], so that its draw is independent of
/// [`Dataset::split_by_id`]'s.
const HELD_OUT_STREAM: u64 = 0x6865_6c64_5f6f_7574;

/// A number in [0, 1) from an id and a seed (FNV-1a, then SplitMix64's mixer).
pub fn id_unit(id: &str, seed: u64) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (derm_core::rng::splitmix_mix(h ^ derm_core::rng::splitmix_mix(seed)) >> 11) as f64 / (1u64 << 53) as f64
}

/// `path` relative to `root` for messages.
pub(crate) fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).display().to_string()
}

/// Scans one split: lists its images, pairs masks, extras and labels, and records every problem.
pub(crate) fn scan_split(m: &Manifest, spec: &SplitSpec, root: &Path) -> Result<Scan> {
    let mut issues = Issues::default();
    let base = pattern_base(root, &spec.images);
    if !base.is_dir() {
        return Ok(Scan { present: false, samples: Vec::new(), issues });
    }
    let excludes: Vec<glob::Pattern> = spec.exclude.iter().filter_map(|e| glob::Pattern::new(e).ok()).collect();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    let mut samples: Vec<Sample> = Vec::new();
    let mut folder_labels: Vec<Option<String>> = Vec::new();
    for hit in match_pattern(root, &spec.images)? {
        let name = hit.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        if excludes.iter().any(|g| g.matches(&name)) || !derm_core::image_io::is_image_path(&hit.path) {
            continue;
        }
        let Some(id) = hit.vars.get("id").cloned() else { continue };
        if let Some(&first) = by_id.get(&id) {
            issues.push(
                IssueKind::DuplicateId,
                format!("{id}: {} and {}", rel(root, &samples[first].image), rel(root, &hit.path)),
            );
            continue;
        }
        let mut sample = Sample {
            id: id.clone(),
            image: hit.path.clone(),
            mask: None,
            label: None,
            group: None,
            extras: BTreeMap::new(),
        };
        if let Some(mp) = &spec.masks {
            if let Some(filled) = fill_pattern(mp, &hit.vars) {
                sample.mask = resolve_filled(root, &filled)?;
                if sample.mask.is_none() {
                    issues.push(IssueKind::MissingMask, format!("{id}: no {filled}"));
                }
            }
        }
        for (name, e) in &spec.extras {
            if let Some(filled) = fill_pattern(&e.pattern, &hit.vars) {
                match resolve_filled(root, &filled)? {
                    Some(p) => {
                        sample.extras.insert(name.clone(), (e.kind, p));
                    }
                    None => issues.push(IssueKind::MissingExtra, format!("{id}: no {name} {filled}")),
                }
            }
        }
        by_id.insert(id, samples.len());
        folder_labels.push(hit.vars.get("label").cloned());
        samples.push(sample);
    }
    if let Some(ls) = &spec.labels {
        if ls.folder {
            for (s, value) in samples.iter_mut().zip(&folder_labels) {
                let value = value.as_deref().unwrap_or_default();
                match class_of_value(m, ls, value) {
                    Some(c) => s.label = Some(c),
                    None => issues
                        .push(IssueKind::BadLabel, format!("{}: folder {value:?} is not a class", rel(root, &s.image))),
                }
            }
        } else {
            label_from_table(m, ls, root, &mut samples, &by_id, &mut issues);
        }
    }
    if let Some(gs) = &spec.groups {
        groups_from_table(gs, spec.labels.as_ref(), root, &mut samples, &by_id, &mut issues);
    }
    samples.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Scan { present: true, samples, issues })
}

fn class_of_value(m: &Manifest, ls: &LabelSpec, value: &str) -> Option<usize> {
    let name = ls.values.get(value).map(String::as_str).unwrap_or(value);
    m.class_index(name)
}

/// Joins the label table onto the samples; every problem goes to `issues`.
fn label_from_table(
    m: &Manifest,
    ls: &LabelSpec,
    root: &Path,
    samples: &mut [Sample],
    by_id: &HashMap<String, usize>,
    issues: &mut Issues,
) {
    let (Some(csv), Some(id_col)) = (&ls.csv, &ls.id_column) else { return };
    let path = root.join(csv);
    if !path.is_file() {
        issues.push_fatal(
            IssueKind::LabelsMissing,
            csv.clone(),
            Error::Parse { path: path.clone(), msg: "label table not found".into() },
        );
        return;
    }
    let table = match Table::read_with(&path, ls.delimiter.as_deref().unwrap_or(","), opt_columns(&ls.columns)) {
        Ok(t) => t,
        Err(e) => {
            issues.push_fatal(IssueKind::LabelsMissing, format!("{csv}: {e}"), e);
            return;
        }
    };
    if ls.delimiter.as_deref().unwrap_or(",") == "," {
        for no in &table.malformed {
            issues.push(IssueKind::BadLabel, format!("{csv}: line {no} has the wrong number of cells"));
        }
    }
    // Resolve the columns first: a missing one makes the whole table unusable.
    let mut wanted: Vec<&String> = vec![id_col];
    wanted.extend(ls.one_hot.values());
    wanted.extend(ls.column.iter());
    let mut cols = HashMap::new();
    for c in wanted {
        match table.column(c) {
            Ok(i) => {
                cols.insert(c.clone(), i);
            }
            Err(e) => {
                issues.push_fatal(IssueKind::CsvMissingColumn, format!("{csv}: no column {c:?}"), e);
                return;
            }
        }
    }
    let id_i = cols[id_col];
    let one_hot: Vec<(usize, usize)> =
        ls.one_hot.iter().filter_map(|(class, col)| Some((m.class_index(class)?, cols[col]))).collect();
    let rest = ls.rest.as_deref().and_then(|r| m.class_index(r));
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (no, row) in &table.rows {
        let id = row[id_i].as_str();
        if let Some(first) = seen.insert(id, *no) {
            issues.push(IssueKind::DuplicateId, format!("{csv}: {id} on lines {first} and {no}"));
            continue;
        }
        let label = if let Some(col) = &ls.column {
            let v = row[cols[col]].as_str();
            class_of_value(m, ls, v).ok_or_else(|| format!("value {v:?} is not a class"))
        } else {
            one_hot_label(row, &one_hot, rest)
        };
        let label = match label {
            Ok(l) => l,
            Err(why) => {
                issues.push(IssueKind::BadLabel, format!("{csv} line {no} ({id}): {why}"));
                continue;
            }
        };
        match by_id.get(id) {
            Some(&i) => samples[i].label = Some(label),
            None => issues.push(IssueKind::LabelWithoutImage, format!("{id} ({csv} line {no})")),
        }
    }
    for s in samples.iter() {
        if s.label.is_none() && !seen.contains_key(s.id.as_str()) {
            issues.push(IssueKind::UnlabelledImage, format!("{} (not in {csv})", rel(root, &s.image)));
        }
    }
}

/// Joins the group table onto the samples. A missing group table is reported (the split then
/// falls back to ids) rather than fatal: the grouping CSV is often a separate download.
fn groups_from_table(
    gs: &GroupSpec,
    labels: Option<&LabelSpec>,
    root: &Path,
    samples: &mut [Sample],
    by_id: &HashMap<String, usize>,
    issues: &mut Issues,
) {
    let (csv, delimiter, columns) = match (&gs.csv, labels) {
        (Some(c), _) => (c.clone(), gs.delimiter.clone(), gs.columns.clone()),
        (None, Some(LabelSpec { csv: Some(c), delimiter, columns, .. })) => {
            (c.clone(), gs.delimiter.clone().or(delimiter.clone()), columns.clone())
        }
        (None, _) => return,
    };
    let path = root.join(&csv);
    if !path.is_file() {
        issues.push(
            IssueKind::GroupsMissing,
            format!("{csv} not found: images are split by id, and one lesion may fall on both sides"),
        );
        return;
    }
    let table = match Table::read_with(&path, delimiter.as_deref().unwrap_or(","), opt_columns(&columns)) {
        Ok(t) => t,
        Err(e) => {
            issues.push(IssueKind::GroupsMissing, format!("{csv}: {e}"));
            return;
        }
    };
    let (id_i, g_i) = match (table.column(&gs.id_column), table.column(&gs.column)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            issues.push_fatal(IssueKind::CsvMissingColumn, format!("{csv}: {e}"), e);
            return;
        }
    };
    for (_, row) in &table.rows {
        let group = row[g_i].trim();
        if group.is_empty() {
            continue;
        }
        if let Some(&i) = by_id.get(row[id_i].as_str()) {
            samples[i].group = Some(group.to_string());
        }
    }
}

fn opt_columns(columns: &[String]) -> Option<&[String]> {
    (!columns.is_empty()).then_some(columns)
}

fn one_hot_label(row: &[String], cols: &[(usize, usize)], rest: Option<usize>) -> std::result::Result<usize, String> {
    let mut hot = Vec::new();
    for &(class, col) in cols {
        let v: f64 = row[col].parse().map_err(|_| format!("{:?} is not a number", row[col]))?;
        if v >= 0.5 {
            hot.push(class);
        }
    }
    match (hot.as_slice(), rest) {
        ([c], _) => Ok(*c),
        ([], Some(r)) => Ok(r),
        ([], None) => Err("no one-hot column is set".into()),
        _ => Err("several one-hot columns are set".into()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use image::{GrayImage, RgbImage};

    /// Writes a tiny valid RGB image or mask, creating folders.
    pub(crate) fn put_rgb(path: &Path, w: u32, h: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        RgbImage::from_pixel(w, h, image::Rgb([180, 120, 100])).save(path).unwrap();
    }
    pub(crate) fn put_mask(path: &Path, w: u32, h: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        GrayImage::from_fn(w, h, |x, _| image::Luma([if x < w / 2 { 255 } else { 0 }])).save(path).unwrap();
    }
    pub(crate) fn put_text(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn id_lists_select_samples_and_unknown_ids_are_errors() {
        let d = tempfile::tempdir().unwrap();
        isic2017_tree(&d.path().join("isic"), 6);
        let data = Dataset::open_dir(&d.path().join("isic"), Some("isic2017"), None).unwrap();
        let plain = d.path().join("val.txt");
        put_text(&plain, "# held out\nISIC_0000004\n\nISIC_0000001\n");
        let ids = read_id_list(&plain).unwrap();
        let sub = data.select_ids(&ids, &plain).unwrap();
        assert_eq!(sub.samples.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["ISIC_0000001", "ISIC_0000004"]);
        assert_eq!(sub.classes, data.classes);
        // A CSV with an image_id column works too.
        let csv = d.path().join("train.csv");
        put_text(&csv, "image_id,melanoma\nISIC_0000000,1\nISIC_0000002,0\n");
        assert_eq!(read_id_list(&csv).unwrap(), ["ISIC_0000000", "ISIC_0000002"]);
        // An id the data set lacks, or an empty file, is an error naming the file.
        put_text(&plain, "ISIC_0000004\nISIC_9999999\n");
        let e = data.select_ids(&read_id_list(&plain).unwrap(), &plain).unwrap_err().to_string();
        assert!(e.contains("val.txt") && e.contains("ISIC_9999999") && e.contains("1 of its 2"), "{e}");
        put_text(&plain, "# nothing\n");
        assert!(data
            .select_ids(&read_id_list(&plain).unwrap(), &plain)
            .unwrap_err()
            .to_string()
            .contains("no image ids"));
        let bad = d.path().join("bad.csv");
        put_text(&bad, "name,label\nx,1\n");
        assert!(read_id_list(&bad).unwrap_err().to_string().contains("missing column"));
    }

    /// An ISIC-2017-style training split with `n` images (labels cycle mel, sk, nevus).
    pub(crate) fn isic2017_tree(root: &Path, n: usize) {
        let mut csv = String::from("image_id,melanoma,seborrheic_keratosis\n");
        for i in 0..n {
            let id = format!("ISIC_{i:07}");
            put_rgb(&root.join(format!("ISIC-2017_Training_Data/{id}.jpg")), 12, 9);
            put_mask(&root.join(format!("ISIC-2017_Training_Data/{id}_superpixels.png")), 12, 9);
            put_mask(&root.join(format!("ISIC-2017_Training_Part1_GroundTruth/{id}_segmentation.png")), 12, 9);
            let (m, s) = [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)][i % 3];
            csv.push_str(&format!("{id},{m:.1},{s:.1}\n"));
        }
        put_text(&root.join("ISIC-2017_Training_Part3_GroundTruth.csv"), &csv);
    }

    #[test]
    fn isic2017_layout_opens_with_labels_and_masks() {
        let d = tempfile::tempdir().unwrap();
        isic2017_tree(d.path(), 7);
        let m = Manifest::builtin("isic2017").unwrap();
        let ds = Dataset::open(&m, d.path(), "train").unwrap();
        assert_eq!(ds.len(), 7);
        assert_eq!(ds.class_counts(), [3, 2, 2]);
        assert!(ds.samples.iter().all(|s| s.mask.is_some()));
        assert_eq!(ds.samples[2].id, "ISIC_0000002");
        assert_eq!(ds.samples[2].label, Some(2));
        let e = Dataset::open(&m, d.path(), "test").unwrap_err().to_string();
        assert!(e.contains("absent") && e.contains("ISIC-2017_Test_v2_Data"), "{e}");
    }

    #[test]
    fn isic2018_task3_one_hot_csv() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let mut csv = String::from("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n");
        let codes = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"];
        for (i, code) in codes.iter().enumerate() {
            let id = format!("ISIC_{:07}", 24306 + i);
            put_rgb(&r.join(format!("ISIC2018_Task3_Training_Input/{id}.jpg")), 6, 4);
            let row: Vec<&str> = codes.iter().map(|c| if c == code { "1.0" } else { "0.0" }).collect();
            csv.push_str(&format!("{id},{}\n", row.join(",")));
        }
        put_text(&r.join("ISIC2018_Task3_Training_Input/LICENSE.txt"), "cc");
        put_text(&r.join("ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"), &csv);
        let m = Manifest::builtin("isic2018-task3").unwrap();
        let ds = Dataset::open(&m, r, "train").unwrap();
        assert_eq!(ds.len(), 7);
        // Samples are sorted by id and ids were made in column order, so labels follow classes.
        let labels: Vec<&str> = ds.samples.iter().map(|s| ds.classes[s.label.unwrap()].as_str()).collect();
        assert_eq!(labels, ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"]);
    }

    #[test]
    fn isic2018_task1_masks_without_labels() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for i in 0..3 {
            put_rgb(&r.join(format!("ISIC2018_Task1-2_Training_Input/ISIC_{i:07}.jpg")), 5, 5);
            put_mask(&r.join(format!("ISIC2018_Task1_Training_GroundTruth/ISIC_{i:07}_segmentation.png")), 5, 5);
        }
        let ds = Dataset::open(&Manifest::builtin("isic2018-task1").unwrap(), r, "train").unwrap();
        assert_eq!(ds.len(), 3);
        assert!(ds.samples.iter().all(|s| s.mask.is_some() && s.label.is_none()));
    }

    #[test]
    fn ph2_layout_with_its_pipe_table() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let mut txt = String::from(
            "||   Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry | Streaks ||   Colors ||\n",
        );
        for (i, dx) in [(2, 0), (3, 1), (4, 2), (5, 0)] {
            let id = format!("IMD{i:03}");
            put_rgb(&r.join(format!("PH2 Dataset images/{id}/{id}_Dermoscopic_Image/{id}.bmp")), 8, 6);
            put_mask(&r.join(format!("PH2 Dataset images/{id}/{id}_lesion/{id}_lesion.bmp")), 8, 6);
            txt.push_str(&format!("|| {id} ||    ||    {dx} ||  0 | A ||  4 ||\n"));
        }
        txt.push_str("\nLegend: 0 - Common Nevus; 1 - Atypical Nevus; 2 - Melanoma\n");
        put_text(&r.join("PH2_dataset.txt"), &txt);
        let m = Manifest::builtin("ph2").unwrap();
        let ds = Dataset::open(&m, r, "test").unwrap();
        assert_eq!(ds.len(), 4);
        assert_eq!(ds.class_counts(), [2, 1, 1]);
        assert!(ds.samples.iter().all(|s| s.mask.is_some()));
    }

    #[test]
    fn dermofit_labels_by_folder() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for (class, id) in [("BCC", "B1"), ("BCC", "B2"), ("MEL", "M1"), ("SK", "S1")] {
            put_rgb(&r.join(format!("{class}/{id}/{id}.png")), 7, 5);
            put_mask(&r.join(format!("{class}/{id}/{id}mask.png")), 7, 5);
        }
        let m = Manifest::builtin("dermofit").unwrap();
        let ds = Dataset::open(&m, r, "all").unwrap();
        assert_eq!(ds.len(), 4);
        let c = ds.class_counts();
        assert_eq!(c[m.class_index("basal_cell_carcinoma").unwrap()], 2);
        assert_eq!(c[m.class_index("melanoma").unwrap()], 1);
        assert_eq!(c[m.class_index("seborrheic_keratosis").unwrap()], 1);
        assert!(ds.samples.iter().all(|s| s.mask.as_ref().unwrap().to_string_lossy().ends_with("mask.png")));
    }

    #[test]
    fn missing_column_is_an_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        isic2017_tree(d.path(), 3);
        put_text(&d.path().join("ISIC-2017_Training_Part3_GroundTruth.csv"), "image_id,melanoma\nISIC_0000000,1\n");
        let m = Manifest::builtin("isic2017").unwrap();
        let e = Dataset::open(&m, d.path(), "train").unwrap_err().to_string();
        assert!(e.contains("ISIC-2017_Training_Part3_GroundTruth.csv") && e.contains("seborrheic_keratosis"), "{e}");
    }

    #[test]
    fn isic2016_headerless_tables_with_words_and_numbers() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let (mut train, mut test) = (String::new(), String::new());
        for i in 0..4 {
            let id = format!("ISIC_{i:07}");
            put_rgb(&r.join(format!("ISBI2016_ISIC_Part3_Training_Data/{id}.jpg")), 6, 4);
            train.push_str(&format!("{id},{}\n", if i == 1 { "malignant" } else { "benign" }));
            put_rgb(&r.join(format!("ISBI2016_ISIC_Part3_Test_Data/{id}.jpg")), 6, 4);
            test.push_str(&format!("{id},{}\n", if i < 2 { "1.0" } else { "0.0" }));
            put_rgb(&r.join(format!("ISBI2016_ISIC_Part1_Training_Data/{id}.jpg")), 6, 4);
            put_mask(&r.join(format!("ISBI2016_ISIC_Part1_Training_GroundTruth/{id}_Segmentation.png")), 6, 4);
        }
        put_text(&r.join("ISBI2016_ISIC_Part3_Training_GroundTruth.csv"), &train);
        put_text(&r.join("ISBI2016_ISIC_Part3_Test_GroundTruth.csv"), &test);
        let m = Manifest::builtin("isic2016-task3").unwrap();
        // The first line is data, not a header: all four images are labelled.
        assert_eq!(Dataset::open(&m, r, "train").unwrap().class_counts(), [3, 1]);
        assert_eq!(Dataset::open(&m, r, "test").unwrap().class_counts(), [2, 2]);
        let seg = Dataset::open(&Manifest::builtin("isic2016-task1").unwrap(), r, "train").unwrap();
        assert!(seg.len() == 4 && seg.samples.iter().all(|s| s.mask.is_some()));
    }

    #[test]
    fn isic2019_one_hot_with_lesion_groups_from_the_metadata() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let codes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"];
        let mut gt = format!("image,{}\n", codes.join(","));
        let mut meta = String::from("image,age_approx,anatom_site_general,lesion_id,sex\n");
        for i in 0..8 {
            let id = format!("ISIC_{i:07}");
            put_rgb(&r.join(format!("ISIC_2019_Training_Input/{id}.jpg")), 6, 4);
            let row: Vec<&str> = (0..9).map(|c| if c == i { "1.0" } else { "0.0" }).collect();
            gt.push_str(&format!("{id},{}\n", row.join(",")));
            // Two images per lesion, and one image without a lesion id.
            let lesion = if i == 7 { String::new() } else { format!("BCN_{:07}", i / 2) };
            meta.push_str(&format!("{id},55.0,anterior torso,{lesion},male\n"));
        }
        put_text(&r.join("ISIC_2019_Training_GroundTruth.csv"), &gt);
        put_text(&r.join("ISIC_2019_Training_Metadata.csv"), &meta);
        let m = Manifest::builtin("isic2019").unwrap();
        let ds = Dataset::open(&m, r, "train").unwrap();
        assert_eq!(ds.class_counts(), [1, 1, 1, 1, 1, 1, 1, 1, 0]);
        assert_eq!(ds.samples[0].group.as_deref(), Some("BCN_0000000"));
        assert_eq!(ds.samples[1].group.as_deref(), Some("BCN_0000000"));
        assert_eq!(ds.samples[7].group, None);
        assert_eq!(ds.samples[7].split_key(), "ISIC_0000007");
        // Without the metadata file the split still opens, reporting the missing grouping.
        std::fs::remove_file(r.join("ISIC_2019_Training_Metadata.csv")).unwrap();
        let scan = scan_split(&m, m.split("train").unwrap(), r).unwrap();
        assert!(scan.issues.summarise().iter().any(|i| i.kind == IssueKind::GroupsMissing));
        assert!(Dataset::open(&m, r, "train").unwrap().samples.iter().all(|s| s.group.is_none()));
    }

    #[test]
    fn isic2020_groups_by_patient_from_the_label_table() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let mut gt = String::from("image_name,patient_id,lesion_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target\n");
        for i in 0..6 {
            let id = format!("ISIC_{:07}", 2637011 + i);
            put_rgb(&r.join(format!("ISIC_2020_Training_JPEG/train/{id}.jpg")), 6, 4);
            let t = usize::from(i == 4);
            gt.push_str(&format!("{id},IP_{:07},IL_{i:07},male,45.0,head/neck,unknown,benign,{t}\n", i / 3));
        }
        put_text(&r.join("ISIC_2020_Training_GroundTruth.csv"), &gt);
        let m = Manifest::builtin("isic2020").unwrap();
        let ds = Dataset::open(&m, r, "train").unwrap();
        assert_eq!(ds.class_counts(), [5, 1]);
        assert_eq!(ds.samples[4].group.as_deref(), Some("IP_0000001"));
    }

    /// HAM10000-like: many lesions with one to six images each.
    fn grouped_tree(root: &Path, lesions: usize) -> Dataset {
        let mut gt = String::from("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n");
        let mut groups = String::from("image,lesion_id,diagnosis_confirm_type\n");
        let mut n = 0;
        for l in 0..lesions {
            for _ in 0..(1 + (l * 7) % 6) {
                let id = format!("ISIC_{n:07}");
                put_rgb(&root.join(format!("ISIC2018_Task3_Training_Input/{id}.jpg")), 4, 3);
                gt.push_str(&format!("{id},0.0,1.0,0.0,0.0,0.0,0.0,0.0\n"));
                groups.push_str(&format!("{id},HAM_{l:07},histo\n"));
                n += 1;
            }
        }
        put_text(&root.join("ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"), &gt);
        put_text(&root.join("ISIC2018_Task3_Training_LesionGroupings.csv"), &groups);
        Dataset::open(&Manifest::builtin("isic2018-task3").unwrap(), root, "train").unwrap()
    }

    #[test]
    fn no_lesion_group_crosses_the_split() {
        let d = tempfile::tempdir().unwrap();
        let ds = grouped_tree(d.path(), 60);
        assert!(ds.samples.iter().all(|s| s.group.is_some()));
        for seed in 0..5 {
            let (t, v) = ds.split_by_id(0.25, seed);
            assert_eq!(t.len() + v.len(), ds.len());
            assert!(!v.is_empty() && !t.is_empty());
            let train_groups: std::collections::BTreeSet<_> = t.samples.iter().map(|s| s.group.clone()).collect();
            assert!(v.samples.iter().all(|s| !train_groups.contains(&s.group)), "seed {seed}: a lesion crosses");
        }
        // By id alone the same data would leak: some lesion has images on both sides.
        let ungrouped =
            Dataset { samples: ds.samples.iter().map(|s| Sample { group: None, ..s.clone() }).collect(), ..ds.clone() };
        let (t, v) = ungrouped.split_by_id(0.25, 0);
        let lesion_of = |s: &Sample| ds.samples.iter().find(|o| o.id == s.id).and_then(|o| o.group.clone());
        let train_groups: std::collections::BTreeSet<_> = t.samples.iter().map(lesion_of).collect();
        assert!(v.samples.iter().any(|s| train_groups.contains(&lesion_of(s))));
    }

    #[test]
    fn split_by_id_is_stable_and_disjoint() {
        let d = tempfile::tempdir().unwrap();
        isic2017_tree(d.path(), 40);
        let ds = Dataset::open(&Manifest::builtin("isic2017").unwrap(), d.path(), "train").unwrap();
        let (t, v) = ds.split_by_id(0.25, 3);
        assert_eq!(t.len() + v.len(), 40);
        assert!(v.len() > 3 && v.len() < 20, "{}", v.len());
        assert!(v.samples.iter().all(|s| !t.samples.contains(s)));
        // Removing samples does not move the others.
        let fewer = ds.filter(|s| s.id != "ISIC_0000001");
        let (_, v2) = fewer.split_by_id(0.25, 3);
        assert!(v2.samples.iter().all(|s| v.samples.contains(s)));
        assert_ne!(ds.split_by_id(0.25, 4).1, v);
        // A held-out test part leaves the training part its own validation share; cut with the
        // same draw, a smaller validation fraction would find nothing.
        let (rest, test) = ds.split_held_out(0.3, 3);
        assert_eq!(rest.len() + test.len(), 40);
        assert!(test.len() > 3 && test.samples.iter().all(|s| !rest.samples.contains(s)));
        assert!(!rest.split_by_id(0.25, 3).1.is_empty());
        assert!(ds.split_by_id(0.3, 3).0.split_by_id(0.25, 3).1.is_empty());
        assert_eq!(ds.shuffled(5), ds.shuffled(5));
        assert_ne!(ds.shuffled(5).samples, ds.samples);
    }
}
