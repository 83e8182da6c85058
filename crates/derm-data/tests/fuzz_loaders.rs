//! Bounded, seeded fuzzing of derm-data's loaders in the normal test run: mutated manifests
//! (every built-in TOML) and mutated label and group tables joined onto a real folder. Any input
//! may be rejected with an error naming the file; none may panic. The same loaders are
//! cargo-fuzz targets in `fuzz/` for unbounded runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use derm_core::mutate::panics;
use derm_data::dataset::Dataset;
use derm_data::manifest::{builtin_names, Manifest};
use derm_data::table::Table;

/// Cases per loader: 10 000 in the normal run; `DERM_FUZZ_CASES=N` for a longer one.
fn cases() -> usize {
    std::env::var("DERM_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}

#[test]
fn mutated_manifests_never_panic_and_errors_name_the_file() {
    let seeds: Vec<Vec<u8>> =
        builtin_names().iter().map(|n| toml::to_string(&Manifest::builtin(n).unwrap()).unwrap().into_bytes()).collect();
    let found = panics(&seeds, cases(), 21, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        if let Err(e) = Manifest::from_toml(&text, Path::new("fuzzed.toml")) {
            assert!(e.to_string().contains("fuzzed.toml"), "{e}");
        }
    });
    assert!(found.is_empty(), "{} of {} mutated manifests panicked, first: {:?}", found.len(), cases(), found.first());
}

#[test]
fn mutated_label_and_group_tables_never_panic() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    let mut gt = String::from("image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n");
    let mut meta = String::from("image,age_approx,anatom_site_general,lesion_id,sex\n");
    for i in 0..6 {
        let id = format!("ISIC_{i:07}");
        let p = r.join(format!("ISIC_2019_Training_Input/{id}.jpg"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(4, 3, image::Rgb([9, 9, 9])).save(&p).unwrap();
        let row: Vec<&str> = (0..9).map(|c| if c == i { "1.0" } else { "0.0" }).collect();
        gt.push_str(&format!("{id},{}\n", row.join(",")));
        meta.push_str(&format!("{id},40.0,\"lower extremity, left\",HAM_{:07},female\n", i / 2));
    }
    let m = Manifest::builtin("isic2019").unwrap();
    let gt_path = r.join("ISIC_2019_Training_GroundTruth.csv");
    let meta_path = r.join("ISIC_2019_Training_Metadata.csv");
    std::fs::write(&meta_path, &meta).unwrap();
    let seeds = vec![gt.clone().into_bytes(), meta.clone().into_bytes()];
    let found = panics(&seeds, cases(), 22, |bytes| {
        // Alternate which table is mutated; the other stays valid.
        let (mutated, valid, valid_text) =
            if bytes.len() % 2 == 0 { (&gt_path, &meta_path, &meta) } else { (&meta_path, &gt_path, &gt) };
        std::fs::write(mutated, bytes).unwrap();
        std::fs::write(valid, valid_text).unwrap();
        if let Err(e) = Dataset::open(&m, r, "train") {
            let msg = e.to_string();
            assert!(msg.contains(".csv") || msg.contains("no image matches"), "{msg}");
        }
        for delim in [",", "||"] {
            let _ = Table::read(mutated, delim);
        }
    });
    assert!(found.is_empty(), "{} of {} mutated tables panicked, first: {:?}", found.len(), cases(), found.first());
}
