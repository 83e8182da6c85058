//! `cargo xtask vendor`: `third_party/candle-core` rebuilt from the published candle-core 0.11.1
//! (the `.crate` archive in cargo's registry cache) plus `third_party/candle-core.patch`.
//!
//! Vendoring rule: of the published crate only `Cargo.toml` (the normalised one from the `.crate`),
//! `LICENSE*`, `README.md` and `src/` are kept; examples, tests, benches, `Cargo.toml.orig`,
//! `Cargo.lock` and `.cargo_vcs_info.json` are dropped (the patch removes their entries from
//! `Cargo.toml`). `DERM-PATCH.md` is the one hand-written file in the vendored folder: `vendor`
//! keeps it, `--check` skips it. Everything else must be exactly what the patch produces.
//!
//! - `cargo xtask vendor`: rewrite `third_party/candle-core` (hand edits there are lost).
//! - `cargo xtask vendor --check`: rebuild into a temporary folder and compare byte by byte with
//!   `third_party/candle-core`; fails listing the files that differ.
//! - `cargo xtask vendor --write-patch`: after editing `third_party/candle-core` by hand, record
//!   the edit: regenerate the patch file from the folder.
//!
//! External tools: `tar` (extracts the `.crate`), `git` (`git apply`, and `git diff --no-index`
//! for `--write-patch`) and `cargo` (`cargo fetch` when the `.crate` is not in the cache yet: the
//! `[patch.crates-io]` entry means a build never downloads it).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The published crate that is vendored.
const CRATE: &str = "candle-core";
/// Its version: keep in step with the root `Cargo.toml` and `Cargo.lock`.
const VERSION: &str = "0.11.1";
/// The hand-written documentation kept in the vendored folder, not produced by the patch.
const DOC: &str = "DERM-PATCH.md";
/// Written above the diff in the patch file (`git apply` skips text before the first `diff`).
const PATCH_HEADER: &str = "\
# derm's change to the published candle-core 0.11.1: see third_party/candle-core/DERM-PATCH.md.
# Applied with `git apply` by `cargo xtask vendor` to the crate's Cargo.toml, LICENSE*, README.md
# and src/ (from the crates.io .crate; examples, tests and benches are not vendored), checked by
# `cargo xtask vendor --check`, regenerated from an edited third_party/candle-core by
# `cargo xtask vendor --write-patch`. Do not edit the diff by hand.

";

#[derive(Debug, clap::Args)]
pub struct VendorArgs {
    /// Rebuild into a temporary folder and compare with third_party/candle-core byte by byte;
    /// fail (listing the files) on any difference.
    #[arg(long, conflicts_with = "write_patch")]
    check: bool,
    /// Regenerate third_party/candle-core.patch from the (edited) third_party/candle-core.
    #[arg(long)]
    write_patch: bool,
}

impl VendorArgs {
    pub fn run(&self) -> Result<()> {
        let root = crate::project_root();
        let vendored = root.join("third_party").join(CRATE);
        let patch = root.join("third_party").join(format!("{CRATE}.patch"));
        let archive = find_or_fetch_crate(&root)?;
        let tmp = tempfile::tempdir().context("creating a temporary folder")?;
        let pristine = extract_pristine(&archive, tmp.path())?;

        if self.write_patch {
            let diff = diff_trees(tmp.path(), &pristine, &vendored)?;
            fs::write(&patch, format!("{PATCH_HEADER}{diff}"))
                .with_context(|| format!("writing {}", patch.display()))?;
            println!("wrote {} ({} lines of diff)", rel(&root, &patch), diff.lines().count());
            return Ok(());
        }

        apply_patch(&pristine, &patch)?;
        if self.check {
            let drift = compare_trees(&pristine, &vendored, &[DOC])?;
            if drift.is_empty() {
                println!(
                    "{} matches {CRATE} {VERSION} + {} ({})",
                    rel(&root, &vendored),
                    rel(&root, &patch),
                    archive.display()
                );
                return Ok(());
            }
            let list: Vec<String> = drift.iter().map(|d| format!("  {d}")).collect();
            bail!(
                "{} differs from {CRATE} {VERSION} + {}:\n{}\n\
                 Regenerate it with `cargo xtask vendor` (dropping the edit), or record an intended \
                 edit with `cargo xtask vendor --write-patch`.",
                rel(&root, &vendored),
                rel(&root, &patch),
                list.join("\n")
            );
        }
        sync_tree(&pristine, &vendored, DOC)?;
        println!("rebuilt {} from {} + {}", rel(&root, &vendored), archive.display(), rel(&root, &patch));
        Ok(())
    }
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

/// Cargo's home: `$CARGO_HOME`, else `$HOME/.cargo`.
fn cargo_home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".cargo")),
        None => bail!("neither CARGO_HOME nor HOME is set: cannot find cargo's registry cache"),
    }
}

/// The `.crate` archive in cargo's registry cache (crates.io's index only), if it is there.
fn find_crate(cargo_home: &Path) -> Option<PathBuf> {
    let cache = cargo_home.join("registry").join("cache");
    let file = format!("{CRATE}-{VERSION}.crate");
    let mut found: Vec<PathBuf> = fs::read_dir(cache)
        .ok()?
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("index.crates.io-") || name.starts_with("github.com-")
        })
        .map(|e| e.path().join(&file))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.into_iter().next()
}

fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Finds the `.crate` archive, downloading it with `cargo fetch` (cargo checks it against the
/// index's checksum) from a throwaway package that depends on exactly this version. The
/// workspace's `Cargo.lock` is copied in so that nothing else needs downloading.
fn find_or_fetch_crate(root: &Path) -> Result<PathBuf> {
    let home = cargo_home()?;
    if let Some(p) = find_crate(&home) {
        return Ok(p);
    }
    eprintln!("{CRATE}-{VERSION}.crate is not in {}: cargo fetch", home.display());
    let tmp = tempfile::tempdir().context("creating a temporary folder")?;
    let manifest = tmp.path().join("Cargo.toml");
    fs::write(
        &manifest,
        format!(
            "[package]\nname = \"derm-vendor-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
             publish = false\n\n[dependencies]\n{CRATE} = \"={VERSION}\"\n\n[workspace]\n"
        ),
    )?;
    fs::create_dir(tmp.path().join("src"))?;
    fs::write(tmp.path().join("src").join("lib.rs"), "")?;
    fs::copy(root.join("Cargo.lock"), tmp.path().join("Cargo.lock")).context("copying Cargo.lock")?;
    let status = Command::new(cargo())
        .arg("fetch")
        .arg("--manifest-path")
        .arg(&manifest)
        .status()
        .context("running cargo fetch")?;
    if !status.success() {
        bail!("cargo fetch of {CRATE} {VERSION} failed ({status})");
    }
    match find_crate(&home) {
        Some(p) => Ok(p),
        None => bail!("cargo fetch succeeded but {CRATE}-{VERSION}.crate is not in {}", home.display()),
    }
}

/// Whether a top-level entry of the published crate is vendored.
fn vendored_entry(name: &str) -> bool {
    matches!(name, "Cargo.toml" | "README.md" | "src") || name.starts_with("LICENSE")
}

/// Extracts the `.crate` into `dir` and removes what is not vendored; returns the crate's folder.
fn extract_pristine(archive: &Path, dir: &Path) -> Result<PathBuf> {
    let status = Command::new("tar").arg("-xzf").arg(archive).arg("-C").arg(dir).status().context("running tar")?;
    if !status.success() {
        bail!("tar -xzf {} failed ({status})", archive.display());
    }
    let top = dir.join(format!("{CRATE}-{VERSION}"));
    prune(&top)?;
    Ok(top)
}

/// Removes the top-level entries of `top` that are not vendored.
fn prune(top: &Path) -> Result<()> {
    for e in fs::read_dir(top).with_context(|| format!("reading {}", top.display()))? {
        let e = e?;
        if vendored_entry(&e.file_name().to_string_lossy()) {
            continue;
        }
        if e.file_type()?.is_dir() {
            fs::remove_dir_all(e.path())?;
        } else {
            fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// `git apply` with `dir` as the root of the paths in the patch. `GIT_CEILING_DIRECTORIES` stops
/// git from finding a repository above `dir` (it would then apply relative to that repository).
fn apply_patch(dir: &Path, patch: &Path) -> Result<()> {
    let ceiling = dir.parent().unwrap_or(dir);
    let out = Command::new("git")
        .env("GIT_CEILING_DIRECTORIES", ceiling)
        .current_dir(dir)
        .args(["apply", "--whitespace=nowarn"])
        .arg(patch)
        .output()
        .context("running git apply (is git installed?)")?;
    if !out.status.success() {
        bail!("git apply {} failed ({}):\n{}", patch.display(), out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The diff from `pristine` to `edited` (without `DOC`), paths `a/...` and `b/...`: copies both
/// into `work/a` and `work/b` and runs `git diff --no-index` there.
fn diff_trees(work: &Path, pristine: &Path, edited: &Path) -> Result<String> {
    let a = work.join("a");
    let b = work.join("b");
    fs::rename(pristine, &a)?;
    copy_tree(edited, &b)?;
    let doc = b.join(DOC);
    if doc.exists() {
        fs::remove_file(doc)?;
    }
    let out = Command::new("git")
        .current_dir(work)
        .args([
            "diff",
            "--no-index",
            "--no-prefix",
            "--no-color",
            "--no-ext-diff",
            "--no-textconv",
            "--no-renames",
            "--diff-algorithm=myers",
            "a",
            "b",
        ])
        .output()
        .context("running git diff")?;
    // `git diff --no-index` exits 1 when the trees differ, 0 when they do not.
    match out.status.code() {
        Some(0) | Some(1) => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        _ => bail!("git diff --no-index failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr)),
    }
}

/// The files under `dir`, as paths relative to it, sorted.
fn files(dir: &Path) -> Result<BTreeSet<PathBuf>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) -> Result<()> {
        for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out)?;
            } else {
                out.insert(p.strip_prefix(base)?.to_path_buf());
            }
        }
        Ok(())
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// One difference between the expected and the actual tree.
#[derive(Debug, PartialEq, Eq)]
enum Drift {
    /// In both, with different bytes.
    Changed(PathBuf),
    /// Expected, absent from the actual tree.
    Missing(PathBuf),
    /// In the actual tree only (and not allowed there).
    Extra(PathBuf),
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::Changed(p) => write!(f, "changed: {}", p.display()),
            Drift::Missing(p) => write!(f, "missing: {}", p.display()),
            Drift::Extra(p) => write!(f, "not from the patch: {}", p.display()),
        }
    }
}

/// Compares `actual` with `expected` byte by byte, file by file; the `allowed` relative paths
/// are skipped in `actual`. Returns the differences in path order (empty when identical).
fn compare_trees(expected: &Path, actual: &Path, allowed: &[&str]) -> Result<Vec<Drift>> {
    let want = files(expected)?;
    let have = files(actual)?;
    let allowed: BTreeSet<PathBuf> = allowed.iter().map(PathBuf::from).collect();
    let mut drift = Vec::new();
    for p in want.union(&have) {
        match (want.contains(p), have.contains(p)) {
            (true, true) => {
                let a = fs::read(expected.join(p)).with_context(|| format!("reading {}", p.display()))?;
                let b = fs::read(actual.join(p)).with_context(|| format!("reading {}", p.display()))?;
                if a != b {
                    drift.push(Drift::Changed(p.clone()));
                }
            }
            (true, false) => drift.push(Drift::Missing(p.clone())),
            (false, true) if !allowed.contains(p) => drift.push(Drift::Extra(p.clone())),
            _ => {}
        }
    }
    Ok(drift)
}

/// Copies the tree `from` to `to` (created).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_tree(&e.path(), &dst)?;
        } else {
            fs::copy(e.path(), &dst).with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Makes `dst` a copy of `src`, except that `dst`'s top-level `keep` file stays as it is.
fn sync_tree(src: &Path, dst: &Path, keep: &str) -> Result<()> {
    if dst.exists() {
        for e in fs::read_dir(dst)? {
            let e = e?;
            if e.file_name() == keep {
                continue;
            }
            if e.file_type()?.is_dir() {
                fs::remove_dir_all(e.path())?;
            } else {
                fs::remove_file(e.path())?;
            }
        }
    }
    copy_tree(src, dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    #[test]
    fn identical_trees_have_no_drift() {
        let t = tempfile::tempdir().unwrap();
        for side in ["want", "have"] {
            write(&t.path().join(side), "Cargo.toml", "[package]\n");
            write(&t.path().join(side), "src/lib.rs", "pub fn f() {}\n");
        }
        write(&t.path().join("have"), DOC, "# notes\n");
        let drift = compare_trees(&t.path().join("want"), &t.path().join("have"), &[DOC]).unwrap();
        assert_eq!(drift, vec![]);
    }

    #[test]
    fn drift_reports_changed_missing_and_extra_files() {
        let t = tempfile::tempdir().unwrap();
        let (want, have) = (t.path().join("want"), t.path().join("have"));
        write(&want, "Cargo.toml", "[package]\n");
        write(&want, "src/lib.rs", "pub fn f() {}\n");
        write(&want, "src/gone.rs", "\n");
        write(&have, "Cargo.toml", "[package]\n");
        write(&have, "src/lib.rs", "pub fn f() { }\n"); // one byte more
        write(&have, "src/new.rs", "\n");
        write(&have, DOC, "# notes\n");
        let drift = compare_trees(&want, &have, &[DOC]).unwrap();
        assert_eq!(
            drift,
            vec![
                Drift::Missing(PathBuf::from("src/gone.rs")),
                Drift::Changed(PathBuf::from("src/lib.rs")),
                Drift::Extra(PathBuf::from("src/new.rs")),
            ]
        );
        assert_eq!(drift[1].to_string(), "changed: src/lib.rs");
        // The allowed file is allowed only where listed: a DERM-PATCH.md elsewhere is drift.
        write(&have, "src/DERM-PATCH.md", "\n");
        let drift = compare_trees(&want, &have, &[DOC]).unwrap();
        assert!(drift.contains(&Drift::Extra(PathBuf::from("src/DERM-PATCH.md"))));
    }

    #[test]
    fn sync_keeps_the_doc_and_removes_stale_files() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        write(&src, "src/lib.rs", "new\n");
        write(&dst, "src/lib.rs", "old\n");
        write(&dst, "src/stale.rs", "\n");
        write(&dst, DOC, "# notes\n");
        sync_tree(&src, &dst, DOC).unwrap();
        assert_eq!(compare_trees(&src, &dst, &[DOC]).unwrap(), vec![]);
        assert_eq!(fs::read_to_string(dst.join(DOC)).unwrap(), "# notes\n");
    }

    /// `--write-patch` then `vendor` on a tiny tree (needs git, not the registry): the patch,
    /// applied to the pristine tree, gives the edited tree back, `DOC` aside.
    #[test]
    fn written_patch_applies_back() {
        let t = tempfile::tempdir().unwrap();
        let (pristine, edited, work) = (t.path().join("pristine"), t.path().join("edited"), t.path().join("work"));
        for root in [&pristine, &edited] {
            write(root, "Cargo.toml", "[package]\nname = \"x\"\n\n[[example]]\nname = \"e\"\n");
            write(root, "src/lib.rs", "/// Doc.\npub fn f() {}\n");
        }
        write(&edited, "Cargo.toml", "[package]\nname = \"x\"\n");
        write(&edited, "src/lib.rs", "/// Doc.\npub fn f() {}\n\n/// New.\npub fn g() {}\n");
        write(&edited, DOC, "# notes\n");
        fs::create_dir(&work).unwrap();
        let staged = work.join("staged");
        copy_tree(&pristine, &staged).unwrap();
        let diff = diff_trees(&work, &staged, &edited).unwrap();
        assert!(diff.starts_with("diff --git a/Cargo.toml b/Cargo.toml\n"), "{diff}");
        assert!(!diff.contains(DOC), "{diff}");
        let patch = t.path().join("x.patch");
        fs::write(&patch, format!("{PATCH_HEADER}{diff}")).unwrap();
        apply_patch(&pristine, &patch).unwrap();
        assert_eq!(compare_trees(&pristine, &edited, &[DOC]).unwrap(), vec![]);
    }

    #[test]
    fn only_the_library_files_are_vendored() {
        let t = tempfile::tempdir().unwrap();
        for f in ["Cargo.toml", "Cargo.toml.orig", "Cargo.lock", ".cargo_vcs_info.json", "LICENSE", "README.md"] {
            write(t.path(), f, "x");
        }
        for f in ["src/lib.rs", "tests/t.rs", "benches/b.rs", "examples/e.rs"] {
            write(t.path(), f, "x");
        }
        prune(t.path()).unwrap();
        let left: Vec<String> = files(t.path()).unwrap().iter().map(|p| p.display().to_string()).collect();
        assert_eq!(left, ["Cargo.toml", "LICENSE", "README.md", "src/lib.rs"]);
    }
}
