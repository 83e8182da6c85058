//! Times `hair_mask` and `clean` on a large image (default 4000 x 3000): a skin-like textured
//! background with a lesion and painted hairs ([`derm_hair::paint`]), or a real image enlarged.
//!
//! `cargo run -p derm-hair --example hair_time [-- W H REPEATS [IMAGE]]` (the dev profile is
//! optimised). Prints the best and the median time of each step.

use std::time::Instant;

use derm_hair::eval::large_benchmark_scene;
use derm_hair::{clean_mask, hair_mask, HairConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let w: u32 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(4000);
    let h: u32 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(3000);
    let reps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let base = args.get(3).map(|p| derm_core::image_io::load_rgb(std::path::Path::new(p))).transpose()?;
    let (image, lesion) = large_benchmark_scene(w, h, base.as_ref());
    let cfg: HairConfig = match std::env::var("HAIR_CFG") {
        Ok(j) => serde_json::from_str(&j)?,
        Err(_) => HairConfig::default(),
    };
    let (mut tm, mut tc) = (Vec::new(), Vec::new());
    let mut frac = 0.0;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let m = hair_mask(&image, Some(&lesion), &cfg)?;
        let t1 = Instant::now();
        let r = clean_mask(&image, m, &cfg)?;
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
