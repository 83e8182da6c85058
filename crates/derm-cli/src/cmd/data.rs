//! `derm data`: data-set tools. `derm data check` validates a folder against its manifest;
//! `derm data manifests` lists the built-in manifests.

use std::path::PathBuf;

use anyhow::Context;
use derm_data::check::{check, CheckOptions};
use derm_data::manifest::{builtin_names, Manifest};

use crate::GlobalOpts;

/// Subcommands of `derm data`.
#[derive(Debug, clap::Subcommand)]
pub enum DataCommand {
    /// Validate a data-set folder against its manifest: counts per class and split, missing
    /// masks, unlabelled images, labels without images, corrupt files, wrong-size masks,
    /// duplicate ids, label tables lacking columns.
    Check(CheckArgs),
    /// List the built-in manifests.
    Manifests,
}

/// Arguments of `derm data check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// A built-in manifest name (isic2017, isic2018-task1, isic2018-task3, ph2, dermofit,
    /// phantom) or the path of a manifest TOML. Defaults to the folder's own manifest.toml.
    #[arg(long)]
    pub manifest: Option<String>,
    /// The folder holding the unpacked data set.
    #[arg(long)]
    pub root: PathBuf,
    /// Check only this split; it must be present. Without it, absent splits are reported as
    /// absent but are not problems.
    #[arg(long)]
    pub split: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Fail (exit code 2) on any problem, count mismatches included.
    #[arg(long)]
    pub strict: bool,
    /// Do not decode images and masks (faster; finds missing files and label problems only).
    #[arg(long)]
    pub no_decode: bool,
}

impl DataCommand {
    /// Runs the subcommand.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        match self {
            DataCommand::Check(a) => a.run(g),
            DataCommand::Manifests => {
                for name in builtin_names() {
                    let m = Manifest::builtin(name)?;
                    let splits: Vec<String> = m
                        .splits
                        .iter()
                        .map(|s| match s.count {
                            Some(c) => format!("{} {c}", s.name),
                            None => s.name.clone(),
                        })
                        .collect();
                    println!("{name:<16} {} ({})", m.title, splits.join(", "));
                }
                Ok(())
            }
        }
    }
}

impl CheckArgs {
    /// Checks the folder and prints the report.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let manifest = match &self.manifest {
            Some(m) => Manifest::load(m).with_context(|| format!("cannot load manifest {m}"))?,
            None => {
                let p = self.root.join("manifest.toml");
                Manifest::load(&p.to_string_lossy())
                    .with_context(|| format!("no --manifest given and {} cannot be read", p.display()))?
            }
        };
        let opts = CheckOptions { split: self.split.clone(), no_decode: self.no_decode };
        let total: usize = if self.no_decode {
            0
        } else {
            manifest
                .splits
                .iter()
                .filter(|s| self.split.as_ref().is_none_or(|n| n == &s.name))
                .filter_map(|s| s.count)
                .sum()
        };
        let bar = crate::progress::bar(total as u64, "checking", g.quiet || self.json || total == 0);
        let report = check(&manifest, &self.root, &opts, &|| bar.inc(1))
            .with_context(|| format!("checking {} against {}", self.root.display(), manifest.name))?;
        bar.finish_and_clear();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!("{report}");
        }
        if let Some(absent) = report.splits.iter().find(|s| !s.present).filter(|_| self.split.is_some()) {
            anyhow::bail!("split {} is absent from {}", absent.split, self.root.display());
        }
        if self.strict {
            report.into_strict()?;
        }
        Ok(())
    }
}
