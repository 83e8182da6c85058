//! Data-set manifests: one TOML file per data set, describing the official download layout.
//!
//! A manifest names the classes, and for each split where the images, masks, extra per-sample
//! files and labels live, as patterns relative to the folder the user unpacked. Patterns are
//! paths with `/` separators whose components may hold the placeholders `{id}` (the sample id),
//! `{label}` (a class folder, for data sets labelled by folder) and the wildcard `*`. The
//! built-in manifests (`data-manifests/*.toml`, see its README) are embedded in the crate, so
//! `isic2017` works by name; a path to any other TOML in the same format works too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use derm_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// The manifests shipped with derm, by name.
const BUILTIN: &[(&str, &str)] = &[
    ("isic2017", include_str!("../../../data-manifests/isic2017.toml")),
    ("isic2018-task1", include_str!("../../../data-manifests/isic2018-task1.toml")),
    ("isic2018-task3", include_str!("../../../data-manifests/isic2018-task3.toml")),
    ("ph2", include_str!("../../../data-manifests/ph2.toml")),
    ("dermofit", include_str!("../../../data-manifests/dermofit.toml")),
    ("isic2016-task1", include_str!("../../../data-manifests/isic2016-task1.toml")),
    ("isic2016-task3", include_str!("../../../data-manifests/isic2016-task3.toml")),
    ("isic2019", include_str!("../../../data-manifests/isic2019.toml")),
    ("isic2020", include_str!("../../../data-manifests/isic2020.toml")),
    ("phantom", include_str!("../../../data-manifests/phantom.toml")),
];

/// A data set's layout and facts: classes, splits, file patterns, labels, expected counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Short name (`isic2017`).
    pub name: String,
    /// Full title of the data set.
    #[serde(default)]
    pub title: String,
    /// Where the data is officially obtained.
    #[serde(default)]
    pub homepage: String,
    /// Licence of the images and annotations.
    #[serde(default)]
    pub license: String,
    /// How to cite it.
    #[serde(default)]
    pub citation: String,
    /// Free-form remarks (assumptions about the layout, how labels were exported).
    #[serde(default)]
    pub notes: String,
    /// Class names, in label order. Empty for segmentation-only data sets.
    #[serde(default)]
    pub classes: Vec<String>,
    /// The class whose AUC and specificities reports headline as "melanoma" (ISIC 2017's first
    /// metric); default: the class named `melanoma`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub melanoma_class: Option<String>,
    /// The splits, in the order they are listed.
    #[serde(rename = "split", default)]
    pub splits: Vec<SplitSpec>,
    /// For generated data sets: what generated them (for example the phantom configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator: Option<toml::Table>,
}

/// One split (`train`, `validation`, `test`) of a data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    /// Split name.
    pub name: String,
    /// Pattern of the image files, relative to the root; must contain `{id}`.
    pub images: String,
    /// Pattern of the lesion masks; `{id}` (and `{label}`) are filled in from the image's match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masks: Option<String>,
    /// File-name globs that are never images of this split (`*_superpixels.png`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Extra per-sample files (clean images, occlusion masks), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extras: BTreeMap<String, ExtraSpec>,
    /// Where the labels come from; absent for unlabelled splits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<LabelSpec>,
    /// Which lesion or patient each image belongs to, where the data set publishes it: images of
    /// one group never fall on both sides of a train/validation split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<GroupSpec>,
    /// Published number of images of the split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// Published number of images per class.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub class_counts: BTreeMap<String, usize>,
}

/// Whether an extra file is a colour image or a binary mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtraKind {
    /// Read as RGB (for example the clean image of a phantom).
    Image,
    /// Read as a binary mask of the image's size (for example the occlusion mask).
    Mask,
}

/// An extra per-sample file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraSpec {
    /// Pattern, filled in like the mask pattern.
    pub pattern: String,
    /// Image or mask.
    pub kind: ExtraKind,
}

/// Where a split's labels come from. Exactly one of `one_hot`, `column`, `folder` applies.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSpec {
    /// The label table, relative to the root (CSV, or another delimiter with `delimiter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csv: Option<String>,
    /// Cell separator of the table (`,` unless given; PH2's table uses `||`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<String>,
    /// Column holding the sample id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_column: Option<String>,
    /// One-hot columns: class name to column name. A row is of the class whose column is 1
    /// (any value >= 0.5); a row with no column set is of class `rest`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub one_hot: BTreeMap<String, String>,
    /// The class of one-hot rows with no column set (ISIC 2017: `nevus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rest: Option<String>,
    /// A single column holding the label (a class name, or a key of `values`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// The label is the `{label}` folder of the image pattern.
    #[serde(default)]
    pub folder: bool,
    /// Label values (cells or folder names) to class names, where they differ.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, String>,
    /// Column names of a table that has no header line (its first line is already data).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
}

/// Where a split's lesion or patient groups come from: a column of a table keyed by image id.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// The table, relative to the root; default: the split's label table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csv: Option<String>,
    /// Cell separator (`,` unless given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<String>,
    /// Column holding the image id.
    pub id_column: String,
    /// Column holding the group (`lesion_id`, `patient_id`); an empty cell is a group of one.
    pub column: String,
    /// Column names of a table without a header line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
}

impl Manifest {
    /// Parses a manifest from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Manifest> {
        let m: Manifest = toml::from_str(text).map_err(|e| Error::Parse { path: origin.into(), msg: e.to_string() })?;
        m.validate().map_err(|msg| Error::Parse { path: origin.into(), msg })?;
        Ok(m)
    }

    /// A built-in manifest by name (`isic2016-task1`, `isic2016-task3`, `isic2017`,
    /// `isic2018-task1`, `isic2018-task3`, `isic2019`, `isic2020`, `ph2`, `dermofit`, `phantom`).
    pub fn builtin(name: &str) -> Result<Manifest> {
        let (n, text) = BUILTIN.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            Error::invalid(format!("no built-in manifest {name:?}; built-in: {}", builtin_names().join(", ")))
        })?;
        Manifest::from_toml(text, Path::new(&format!("<built-in {n}>")))
    }

    /// A built-in manifest's name, or the path of a TOML file. A name that is an existing file
    /// is read as a file; anything ending in `.toml` is always a path.
    pub fn load(name_or_path: &str) -> Result<Manifest> {
        let p = Path::new(name_or_path);
        if p.is_file() || name_or_path.ends_with(".toml") {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            Manifest::from_toml(&text, p)
        } else {
            Manifest::builtin(name_or_path)
        }
    }

    /// Writes the manifest as TOML (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string_pretty(self).map_err(|e| Error::Parse { path: path.into(), msg: e.to_string() })?;
        derm_core::fsutil::write_atomic(path, text.as_bytes())
    }

    /// The split named `name`.
    pub fn split(&self, name: &str) -> Result<&SplitSpec> {
        self.splits.iter().find(|s| s.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.splits.iter().map(|s| s.name.as_str()).collect();
            Error::invalid(format!("manifest {} has no split {name:?}; it has: {}", self.name, names.join(", ")))
        })
    }

    /// The index of class `name`.
    pub fn class_index(&self, name: &str) -> Option<usize> {
        self.classes.iter().position(|c| c == name)
    }

    /// Checks the manifest for internal consistency; returns what is wrong.
    /// Index of the melanoma class ([`Manifest::melanoma_class`], else the class named
    /// `melanoma`), if the data set has one.
    pub fn melanoma_index(&self) -> Option<usize> {
        self.class_index(self.melanoma_class.as_deref().unwrap_or("melanoma"))
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.splits.is_empty() {
            return Err(format!("manifest {} declares no [[split]]", self.name));
        }
        if let Some(m) = &self.melanoma_class {
            if self.class_index(m).is_none() {
                return Err(format!("melanoma_class {m:?} is not one of the classes"));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.splits {
            if !seen.insert(&s.name) {
                return Err(format!("split {:?} is declared twice", s.name));
            }
            let at = |m: String| format!("split {}: {m}", s.name);
            if !s.images.contains("{id}") {
                return Err(at(format!("images pattern {:?} has no {{id}}", s.images)));
            }
            for c in s.class_counts.keys() {
                if self.class_index(c).is_none() {
                    return Err(at(format!("class_counts names unknown class {c:?}")));
                }
            }
            for e in &s.exclude {
                glob::Pattern::new(e).map_err(|err| at(format!("exclude {e:?}: {err}")))?;
            }
            if let Some(l) = &s.labels {
                l.validate(self, &s.images).map_err(at)?;
            }
            if let Some(g) = &s.groups {
                if g.csv.is_none() && s.labels.as_ref().and_then(|l| l.csv.as_ref()).is_none() {
                    return Err(at("groups need a csv (the split has no label table to default to)".into()));
                }
                let named = |c: &String| g.columns.is_empty() || g.columns.contains(c);
                if !named(&g.id_column) || !named(&g.column) {
                    return Err(at("groups name a column that is not in its `columns`".into()));
                }
            }
        }
        Ok(())
    }
}

impl LabelSpec {
    fn validate(&self, m: &Manifest, images: &str) -> std::result::Result<(), String> {
        let kinds = [!self.one_hot.is_empty(), self.column.is_some(), self.folder];
        if kinds.iter().filter(|&&k| k).count() != 1 {
            return Err("labels need exactly one of one_hot, column, folder = true".into());
        }
        if m.classes.is_empty() {
            return Err("labels are declared but the manifest lists no classes".into());
        }
        if self.folder {
            if !images.contains("{label}") {
                return Err("labels.folder needs {label} in the images pattern".into());
            }
        } else if self.csv.is_none() || self.id_column.is_none() {
            return Err("labels from a table need csv and id_column".into());
        }
        let known = |c: &String| m.class_index(c).is_some();
        for c in self.one_hot.keys().chain(self.rest.iter()).chain(self.values.values()) {
            if !known(c) {
                return Err(format!("labels name unknown class {c:?}"));
            }
        }
        Ok(())
    }
}

/// Names of the built-in manifests.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

/// One component of a pattern, split into literal text, placeholders and wildcards.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Var(String),
    Star,
}

fn parse_component(c: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut rest = c;
    while let Some(ch) = rest.chars().next() {
        if ch == '{' {
            if let Some(end) = rest.find('}') {
                if !lit.is_empty() {
                    out.push(Piece::Lit(std::mem::take(&mut lit)));
                }
                out.push(Piece::Var(rest[1..end].to_string()));
                rest = &rest[end + 1..];
                continue;
            }
        }
        if ch == '*' {
            if !lit.is_empty() {
                out.push(Piece::Lit(std::mem::take(&mut lit)));
            }
            out.push(Piece::Star);
        } else {
            lit.push(ch);
        }
        rest = &rest[ch.len_utf8()..];
    }
    if !lit.is_empty() {
        out.push(Piece::Lit(lit));
    }
    out
}

/// Matches `name` against `pieces`, extending `vars` (placeholders already bound must repeat).
fn match_pieces(pieces: &[Piece], name: &str, vars: &mut BTreeMap<String, String>) -> bool {
    match pieces.split_first() {
        None => name.is_empty(),
        Some((Piece::Lit(l), rest)) => name.starts_with(l.as_str()) && match_pieces(rest, &name[l.len()..], vars),
        Some((Piece::Var(v), rest)) => {
            if let Some(bound) = vars.get(v).cloned() {
                return name.starts_with(bound.as_str()) && match_pieces(rest, &name[bound.len()..], vars);
            }
            // Placeholders match one or more characters; try the shortest first.
            for (i, _) in name.char_indices().skip(1).chain(std::iter::once((name.len(), ' '))) {
                vars.insert(v.clone(), name[..i].to_string());
                if match_pieces(rest, &name[i..], vars) {
                    return true;
                }
            }
            vars.remove(v);
            false
        }
        Some((Piece::Star, rest)) => {
            let ends = name.char_indices().map(|(i, _)| i).chain(std::iter::once(name.len()));
            for i in ends {
                if match_pieces(rest, &name[i..], vars) {
                    return true;
                }
            }
            false
        }
    }
}

/// One file matched by a pattern, with its placeholder values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternMatch {
    /// The file.
    pub path: PathBuf,
    /// `id`, `label`, ... as matched.
    pub vars: BTreeMap<String, String>,
}

/// Lists the files under `root` matching `pattern`, sorted by path. A missing folder yields no
/// matches; a folder that cannot be read is an error naming it.
pub fn match_pattern(root: &Path, pattern: &str) -> Result<Vec<PatternMatch>> {
    let comps: Vec<Vec<Piece>> =
        pattern.split('/').filter(|c| !c.is_empty() && *c != ".").map(parse_component).collect();
    let mut out = Vec::new();
    walk(root, &comps, BTreeMap::new(), &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn walk(dir: &Path, comps: &[Vec<Piece>], vars: BTreeMap<String, String>, out: &mut Vec<PatternMatch>) -> Result<()> {
    let Some((first, rest)) = comps.split_first() else {
        return Ok(());
    };
    let last = rest.is_empty();
    // A literal component needs no listing.
    if let [Piece::Lit(l)] = first.as_slice() {
        let p = dir.join(l);
        if last && p.is_file() {
            out.push(PatternMatch { path: p, vars });
        } else if !last && p.is_dir() {
            walk(&p, rest, vars, out)?;
        }
        return Ok(());
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let mut v = vars.clone();
        if !match_pieces(first, name, &mut v) {
            continue;
        }
        let p = entry.path();
        if last {
            if p.is_file() {
                out.push(PatternMatch { path: p, vars: v });
            }
        } else if p.is_dir() {
            walk(&p, rest, v, out)?;
        }
    }
    Ok(())
}

/// Fills the placeholders of `pattern` from `vars`; `None` when one is unbound.
pub fn fill_pattern(pattern: &str, vars: &BTreeMap<String, String>) -> Option<String> {
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut rest = pattern;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}')? + start;
        out.push_str(vars.get(&rest[start + 1..end])?);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// Resolves a filled pattern to a file: the path itself, or, when it holds `*`, the first file
/// it matches.
pub fn resolve_filled(root: &Path, filled: &str) -> Result<Option<PathBuf>> {
    if filled.contains('*') {
        Ok(match_pattern(root, filled)?.into_iter().next().map(|m| m.path))
    } else {
        let p = root.join(filled);
        Ok(p.is_file().then_some(p))
    }
}

/// The folder of a pattern before its first placeholder or wildcard (where the split lives).
pub fn pattern_base(root: &Path, pattern: &str) -> PathBuf {
    let mut p = root.to_path_buf();
    let comps: Vec<&str> = pattern.split('/').collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        if c.contains('{') || c.contains('*') {
            break;
        }
        p.push(c);
    }
    p
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_manifest_parses_and_names_known_classes() {
        for name in builtin_names() {
            let m = Manifest::builtin(name).unwrap();
            assert_eq!(m.name, name);
            for s in &m.splits {
                if let Some(c) = s.count {
                    let sum: usize = s.class_counts.values().sum();
                    assert!(s.class_counts.is_empty() || sum == c, "{name}/{}: {sum} != {c}", s.name);
                }
            }
        }
        let e = Manifest::builtin("isic2099").unwrap_err().to_string();
        assert!(e.contains("isic2017"), "{e}");
    }

    #[test]
    fn isic2017_facts() {
        let m = Manifest::builtin("isic2017").unwrap();
        assert_eq!(m.classes, ["melanoma", "seborrheic_keratosis", "nevus"]);
        let t = m.split("train").unwrap();
        assert_eq!(t.count, Some(2000));
        assert_eq!(t.class_counts["melanoma"], 374);
        assert_eq!(m.split("test").unwrap().count, Some(600));
        assert!(m.split("holdout").unwrap_err().to_string().contains("validation"));
    }

    #[test]
    fn patterns_match_with_placeholders_and_wildcards() {
        let mut v = BTreeMap::new();
        let p = parse_component("{id}_segmentation.png");
        assert!(match_pieces(&p, "ISIC_0000001_segmentation.png", &mut v));
        assert_eq!(v["id"], "ISIC_0000001");
        let mut v = BTreeMap::new();
        assert!(!match_pieces(&parse_component("{id}.jpg"), "x.png", &mut v));
        let mut v = BTreeMap::from([("id".to_string(), "A1".to_string())]);
        assert!(match_pieces(&parse_component("{id}mask.png"), "A1mask.png", &mut v));
        assert!(!match_pieces(&parse_component("{id}mask.png"), "A2mask.png", &mut v));
        let mut v = BTreeMap::new();
        assert!(match_pieces(&parse_component("*_{id}.bmp"), "a_b_c.bmp", &mut v));
        assert_eq!(v["id"], "b_c");
        let filled = fill_pattern(
            "{label}/{id}/{id}mask.png",
            &BTreeMap::from([("id".to_string(), "B7".to_string()), ("label".to_string(), "BCC".to_string())]),
        );
        assert_eq!(filled.as_deref(), Some("BCC/B7/B7mask.png"));
        assert_eq!(fill_pattern("{x}.png", &BTreeMap::new()), None);
        assert_eq!(pattern_base(Path::new("/r"), "a/b/{id}.png"), PathBuf::from("/r/a/b"));
    }

    #[test]
    fn walks_nested_folders_binding_the_same_id() {
        let d = tempfile::tempdir().unwrap();
        for (dir, file) in [("IMD1/IMD1_img", "IMD1.bmp"), ("IMD2/IMD2_img", "IMD2.bmp"), ("IMD3/IMD3_img", "IMD9.bmp")]
        {
            std::fs::create_dir_all(d.path().join(dir)).unwrap();
            std::fs::write(d.path().join(dir).join(file), b"x").unwrap();
        }
        let m = match_pattern(d.path(), "{id}/{id}_img/{id}.bmp").unwrap();
        let ids: Vec<&str> = m.iter().map(|m| m.vars["id"].as_str()).collect();
        assert_eq!(ids, ["IMD1", "IMD2"]);
        assert!(match_pattern(&d.path().join("absent"), "{id}.png").unwrap().is_empty());
    }

    #[test]
    fn bad_manifests_are_rejected_with_the_reason() {
        let bad = r#"
name = "x"
classes = ["a", "b"]
[[split]]
name = "train"
images = "imgs/{id}.png"
[split.labels]
csv = "l.csv"
id_column = "id"
column = "dx"
values = { "1" = "c" }
"#;
        let e = Manifest::from_toml(bad, Path::new("x.toml")).unwrap_err().to_string();
        assert!(e.contains("x.toml") && e.contains("unknown class"), "{e}");
        let e = Manifest::from_toml("name = \"y\"\n[[split]]\nname = \"t\"\nimages = \"a.png\"\n", Path::new("y.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("{id}"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.toml");
        let m = Manifest::builtin("isic2017").unwrap();
        m.save(&p).unwrap();
        assert_eq!(Manifest::load(p.to_str().unwrap()).unwrap(), m);
    }
}
