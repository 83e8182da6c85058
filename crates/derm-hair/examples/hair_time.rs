//! Times `hair_mask` and `clean` on a large image (default 4000 x 3000): a skin-like textured
//! background with a lesion and painted hairs ([`derm_hair::paint`]), or a real image enlarged.
//!
//! `cargo run -p derm-hair --example hair_time [-- W H REPEATS [IMAGE]]` (the dev profile is
//! optimised). Prints the best and the median time of each step.

use std::time::Instant;

use derm_hair::paint::{paint_hairs, PaintConfig};
use derm_hair::{clean_mask, hair_mask, HairConfig};
use image::{GrayImage, RgbImage};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let w: u32 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(4000);
    let h: u32 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(3000);
    let reps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let base = match args.get(3) {
        Some(p) => {
            let img = derm_core::image_io::load_rgb(std::path::Path::new(p))?;
            image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle)
        }
        None => {
            let mut rng = derm_core::Rng::new(3);
            RgbImage::from_fn(w, h, |x, y| {
                let n = (rng.normal() * 4.0) as f32;
                let (dx, dy) = (x as f32 / w as f32 - 0.5, y as f32 / h as f32 - 0.5);
                let les = if dx * dx + dy * dy < 0.05 { 0.6 } else { 1.0 };
                image::Rgb([(215.0 * les + n) as u8, (168.0 * les + n) as u8, (148.0 * les + n) as u8])
            })
        }
    };
    let lesion = GrayImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 / w as f32 - 0.5, y as f32 / h as f32 - 0.5);
        image::Luma([if dx * dx + dy * dy < 0.05 { 255 } else { 0 }])
    });
    let painted = paint_hairs(&base, Some(&lesion), 1, &PaintConfig { min_hairs: 16, ..PaintConfig::default() });
    let cfg = HairConfig::default();
    let (mut tm, mut tc) = (Vec::new(), Vec::new());
    let mut frac = 0.0;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let m = hair_mask(&painted.image, Some(&lesion), &cfg)?;
        let t1 = Instant::now();
        let r = clean_mask(&painted.image, m, &cfg)?;
        let t2 = Instant::now();
        frac = r.masked_fraction;
        tm.push((t1 - t0).as_secs_f64());
        tc.push((t2 - t1).as_secs_f64());
    }
    let stat = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2])
    };
    let ((bm, mm), (bc, mc)) = (stat(&mut tm), stat(&mut tc));
    println!("{w}x{h}, masked {:.3}, {} threads", frac, rayon::current_num_threads());
    println!("hair_mask: best {bm:.3} s, median {mm:.3} s");
    println!("inpaint (clean_mask): best {bc:.3} s, median {mc:.3} s");
    println!("hair_mask + clean: best {:.3} s, median {:.3} s", bm + bc, mm + mc);
    Ok(())
}
