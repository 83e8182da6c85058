//! The real-image hair benchmark without the CLI (for development):
//!
//! `cargo run --release -p derm-hair --example hair_real -- ROOT [SIZE] [LIMIT] [SEED] [EXPORT_DIR]`
//!
//! Selects the hair-free ISIC 2017 images under ROOT ([`derm_hair::bench`]), paints hairs at SIZE
//! px (256 keeps the images), and prints derm's numbers as JSON. With `stats` as SIZE, prints the
//! hair-free statistics of every image instead. `score EXPORT PRED` scores another method's
//! outputs.

use std::path::PathBuf;

use derm_hair::bench::{hair_free_stats, read_isic2017, run_derm, score_dir, select_hair_free, BenchConfig, Detector};
use derm_hair::paint::PaintConfig;
use derm_hair::HairConfig;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("score") {
        let t = score_dir(&PathBuf::from(&args[1]), &PathBuf::from(&args[2]))?;
        println!("{}", serde_json::to_string_pretty(&t.summary())?);
        return Ok(());
    }
    let root = PathBuf::from(args.first().map(String::as_str).unwrap_or("/work/shared/data/isic2017-train-256"));
    let size = args.get(1).cloned().unwrap_or_else(|| "256".into());
    let limit = args.get(2).and_then(|s| s.parse().ok());
    let seed = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(18);
    let export = args.get(4).map(PathBuf::from);
    let all = read_isic2017(&root, None)?;
    if size == "stats" {
        for b in &all {
            let s = hair_free_stats(&b.image, &b.lesion);
            println!("{} {:.5} {:.1} {}", b.id, s.thin_share, s.longest_piece, s.hair_free());
        }
        return Ok(());
    }
    let mut free = select_hair_free(all);
    eprintln!("hair-free images: {}", free.len());
    if let Some(k) = limit {
        free.truncate(k);
    }
    let bench = BenchConfig { seed, size: size.parse()?, paint: PaintConfig::default(), export };
    let det = if std::env::var("HAIR_LEGACY").is_ok() { Detector::Legacy } else { Detector::Current };
    let mut cfg = HairConfig::default();
    if let Ok(j) = std::env::var("HAIR_CFG") {
        cfg = serde_json::from_str(&j)?;
    }
    let t = run_derm(&free, &bench, &cfg, det)?;
    println!("{}", serde_json::to_string_pretty(&t.summary())?);
    Ok(())
}
