//! Writes montages for eyeballing phantoms next to real images, and times phantom drawing.
//!
//! `cargo run -p derm-data --example phantom_montage -- OUT_DIR [REAL_IMAGE_DIR]`

use std::path::PathBuf;
use std::time::Instant;

use derm_data::phantom::{draw_phantom, draw_phantoms, PhantomConfig};
use image::{GrayImage, RgbImage};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().unwrap_or_else(|| "phantom-montage".into()));
    std::fs::create_dir_all(&out)?;
    let cfg = PhantomConfig::balanced();
    // Timing: one thread, then all threads.
    let t = Instant::now();
    let n = 50;
    for i in 0..n {
        std::hint::black_box(draw_phantom(&cfg, 1, i));
    }
    let single = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
    let t = Instant::now();
    let ps = draw_phantoms(&cfg, 1, 200);
    let par = t.elapsed().as_secs_f64() * 1000.0 / 200.0;
    println!(
        "256x256 phantom: {single:.2} ms each on one thread, {par:.2} ms each with rayon ({} threads)",
        rayon::current_num_threads()
    );
    let cols = 4u32;
    let rows = 3u32;
    let mut m = RgbImage::new(256 * cols, 256 * rows * 2);
    let mut masks = GrayImage::new(256 * cols, 256 * rows * 2);
    for (k, p) in ps.iter().take((cols * rows) as usize).enumerate() {
        let (x, y) = ((k as u32 % cols) * 256, (k as u32 / cols) * 512);
        image::imageops::replace(&mut m, &p.image, x as i64, y as i64);
        image::imageops::replace(&mut m, &p.clean, x as i64, y as i64 + 256);
        image::imageops::replace(&mut masks, &p.lesion, x as i64, y as i64);
        image::imageops::replace(&mut masks, &p.occlusion, x as i64, y as i64 + 256);
        println!("tile {k}: {} class {}", p.id, derm_data::PHANTOM_CLASSES[p.class]);
    }
    m.save(out.join("phantoms.png"))?;
    masks.save(out.join("phantom_masks.png"))?;
    if let Some(real) = args.next() {
        let mut files: Vec<_> = std::fs::read_dir(&real)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
            .collect();
        files.sort();
        let mut r = RgbImage::new(256 * cols, 256 * rows);
        for (k, f) in files.iter().step_by(97).take((cols * rows) as usize).enumerate() {
            let img = derm_core::image_io::load_rgb(f)?;
            let img = derm_core::image_io::resize_rgb(&img, 256, 256);
            image::imageops::replace(&mut r, &img, (k as u32 % cols * 256) as i64, (k as u32 / cols * 256) as i64);
        }
        r.save(out.join("real.png"))?;
    }
    Ok(())
}
