//! The file names through which derm's stages hand images and masks to each other.
//!
//! Each stage writes into a folder what the next one reads, keyed by the sample id:
//!
//! | file                     | written by                       | read by                          |
//! |--------------------------|----------------------------------|----------------------------------|
//! | `<id>_occlusion.png`     | `derm hair`, `derm purify apply` | `derm purify train` (hole library) |
//! | `<id>_clean.png`         | `derm hair` (classic inpainting) | `derm purify train` (targets)    |
//! | `<id>_segmentation.png`  | `derm segment predict`           | hair, purify, VBP (lesion masks) |
//! | `<id>_purified.png`      | `derm purify apply`              | `derm classify` (train and test) |
//! | `<id>_overlay.png`       | segment and VBP predictions      | reports                          |
//!
//! A lesion mask is looked up by [`find_mask`], which also accepts the names other tools use.

use std::path::{Path, PathBuf};

/// Suffix of an occlusion (hair, ruler, ink) mask, 0/255.
pub const OCCLUSION: &str = "_occlusion.png";
/// Suffix of a classically inpainted image.
pub const CLEAN: &str = "_clean.png";
/// Suffix of a lesion mask, 0/255 (the ISIC ground-truth name).
pub const SEGMENTATION: &str = "_segmentation.png";
/// Suffix of a purified (network-inpainted) image.
pub const PURIFIED: &str = "_purified.png";
/// Suffix of an overlay figure.
pub const OVERLAY: &str = "_overlay.png";

/// Suffixes a lesion mask of `<id>` may have, in the order [`find_mask`] tries them.
pub const MASK_SUFFIXES: [&str; 4] = [SEGMENTATION, ".png", "_lesion.png", "_mask.png"];

/// `<id>_occlusion.png`.
pub fn occlusion(id: &str) -> String {
    format!("{id}{OCCLUSION}")
}

/// `<id>_clean.png`.
pub fn clean(id: &str) -> String {
    format!("{id}{CLEAN}")
}

/// `<id>_segmentation.png`.
pub fn segmentation(id: &str) -> String {
    format!("{id}{SEGMENTATION}")
}

/// `<id>_purified.png`.
pub fn purified(id: &str) -> String {
    format!("{id}{PURIFIED}")
}

/// `<id>_overlay.png`.
pub fn overlay(id: &str) -> String {
    format!("{id}{OVERLAY}")
}

/// The id of a file named `<id><suffix>`, if it is one.
pub fn id_of<'a>(file_name: &'a str, suffix: &str) -> Option<&'a str> {
    file_name.strip_suffix(suffix).filter(|id| !id.is_empty())
}

/// The lesion mask of `id` in `dir`: the first of `<id>_segmentation.png`, `<id>.png`,
/// `<id>_lesion.png` and `<id>_mask.png` that exists.
pub fn find_mask(dir: &Path, id: &str) -> Option<PathBuf> {
    MASK_SUFFIXES.iter().map(|s| dir.join(format!("{id}{s}"))).find(|p| p.is_file())
}

/// The files `<id><suffix>` directly in `dir`, sorted by name, as (id, path).
pub fn list(dir: &Path, suffix: &str) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if let Some(id) = p.file_name().and_then(|n| n.to_str()).and_then(|n| id_of(n, suffix)) {
            out.push((id.to_string(), p.clone()));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_ids_and_mask_lookup_agree() {
        assert_eq!(occlusion("ISIC_1"), "ISIC_1_occlusion.png");
        assert_eq!(id_of(&purified("a_b"), PURIFIED), Some("a_b"));
        assert_eq!(id_of("_clean.png", CLEAN), None);
        assert_eq!(id_of(&clean("x"), OCCLUSION), None);
        let d = tempfile::tempdir().unwrap();
        for f in ["a_segmentation.png", "a.png", "b_lesion.png", "c_mask.png", "d_occlusion.png"] {
            std::fs::write(d.path().join(f), b"x").unwrap();
        }
        assert!(find_mask(d.path(), "a").unwrap().ends_with("a_segmentation.png"), "the ISIC name comes first");
        assert!(find_mask(d.path(), "b").unwrap().ends_with("b_lesion.png"));
        assert!(find_mask(d.path(), "c").unwrap().ends_with("c_mask.png"));
        assert_eq!(find_mask(d.path(), "d"), None);
        let occ = list(d.path(), OCCLUSION).unwrap();
        assert_eq!(occ.len(), 1);
        assert_eq!(occ[0].0, "d");
    }
}
