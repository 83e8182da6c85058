//! Binary mask post-processing: hole filling and connected components; the moments of a region.
//!
//! Masks are `GrayImage`s where any non-zero value is foreground; results are 0/255.

use image::{GrayImage, Luma};

/// Fills holes: background regions not connected (4-connectivity) to the image border become
/// foreground.
pub fn fill_holes(mask: &GrayImage) -> GrayImage {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let src = mask.as_raw();
    let mut outside = vec![false; w * h];
    let mut stack = Vec::new();
    let seed = |i: usize, outside: &mut Vec<bool>, stack: &mut Vec<usize>| {
        if src[i] == 0 && !outside[i] {
            outside[i] = true;
            stack.push(i);
        }
    };
    for x in 0..w {
        seed(x, &mut outside, &mut stack);
        seed((h - 1) * w + x, &mut outside, &mut stack);
    }
    for y in 0..h {
        seed(y * w, &mut outside, &mut stack);
        seed(y * w + w - 1, &mut outside, &mut stack);
    }
    while let Some(i) = stack.pop() {
        let (x, y) = (i % w, i / w);
        if x > 0 {
            seed(i - 1, &mut outside, &mut stack);
        }
        if x + 1 < w {
            seed(i + 1, &mut outside, &mut stack);
        }
        if y > 0 {
            seed(i - w, &mut outside, &mut stack);
        }
        if y + 1 < h {
            seed(i + w, &mut outside, &mut stack);
        }
    }
    let data = outside.iter().map(|&o| if o { 0 } else { 255 }).collect();
    GrayImage::from_raw(w as u32, h as u32, data).unwrap_or_else(|| GrayImage::new(w as u32, h as u32))
}

/// Labels 8-connected foreground components; returns the label image (0 = background, labels
/// from 1) and the size of each label (index 0 unused).
pub fn label_components(mask: &GrayImage) -> (Vec<u32>, Vec<usize>) {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let src = mask.as_raw();
    let mut labels = vec![0u32; w * h];
    let mut sizes = vec![0usize];
    let mut stack = Vec::new();
    for start in 0..w * h {
        if src[start] == 0 || labels[start] != 0 {
            continue;
        }
        let l = sizes.len() as u32;
        sizes.push(0);
        labels[start] = l;
        stack.push(start);
        while let Some(i) = stack.pop() {
            sizes[l as usize] += 1;
            let (x, y) = ((i % w) as isize, (i / w) as isize);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if src[j] != 0 && labels[j] == 0 {
                        labels[j] = l;
                        stack.push(j);
                    }
                }
            }
        }
    }
    (labels, sizes)
}

/// Keeps only the largest 8-connected foreground component.
pub fn largest_component(mask: &GrayImage) -> GrayImage {
    let (labels, sizes) = label_components(mask);
    let Some(best) = (1..sizes.len()).max_by_key(|&l| sizes[l]) else {
        return GrayImage::new(mask.width(), mask.height());
    };
    let data = labels.iter().map(|&l| if l as usize == best { 255 } else { 0 }).collect();
    GrayImage::from_raw(mask.width(), mask.height(), data)
        .unwrap_or_else(|| GrayImage::new(mask.width(), mask.height()))
}

/// Thresholds a probability map (values in [0, 1], row-major, `w` x `h`) at `t` into 0/255.
pub fn threshold(probs: &[f32], w: u32, h: u32, t: f32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| Luma([if probs[(y * w + x) as usize] >= t { 255 } else { 0 }]))
}

/// The first and second moments of a set of pixel positions, gathered one pixel at a time: a
/// region's size, centroid and covariance (its spread and orientation).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    n: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    syy: f64,
    sxy: f64,
}

impl Moments {
    /// Adds the pixel at column `x`, row `y`.
    pub fn add(&mut self, x: usize, y: usize) {
        let (xf, yf) = (x as f64, y as f64);
        self.n += 1.0;
        self.sx += xf;
        self.sy += yf;
        self.sxx += xf * xf;
        self.syy += yf * yf;
        self.sxy += xf * yf;
    }

    /// How many pixels were added.
    pub fn count(&self) -> usize {
        self.n as usize
    }

    /// The mean position (x, y); (0, 0) for no pixels.
    pub fn centroid(&self) -> (f64, f64) {
        let n = self.n.max(1.0);
        (self.sx / n, self.sy / n)
    }

    /// The covariance of the positions, (var x, var y, cov xy); zeros for no pixels.
    pub fn covariance(&self) -> (f64, f64, f64) {
        let n = self.n.max(1.0);
        let (mx, my) = self.centroid();
        (self.sxx / n - mx * mx, self.syy / n - my * my, self.sxy / n - mx * my)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(rows: &[&str]) -> GrayImage {
        GrayImage::from_fn(rows[0].len() as u32, rows.len() as u32, |x, y| {
            Luma([if rows[y as usize].as_bytes()[x as usize] == b'#' { 255 } else { 0 }])
        })
    }

    #[test]
    fn fills_enclosed_holes_only() {
        let m = from(&["#####.", "#..#..", "#####.", "......"]);
        let f = fill_holes(&m);
        assert_eq!(f, from(&["#####.", "####..", "#####.", "......"]));
        // A hole open to the border stays.
        let m = from(&["###", "#..", "###"]);
        assert_eq!(fill_holes(&m), m);
    }

    #[test]
    fn largest_component_keeps_the_biggest() {
        let m = from(&["##...#", "##....", "....##", "......"]);
        assert_eq!(largest_component(&m), from(&["##....", "##....", "......", "......"]));
        let (_, sizes) = label_components(&m);
        assert_eq!(sizes, vec![0, 4, 1, 2]);
        assert_eq!(largest_component(&GrayImage::new(3, 3)), GrayImage::new(3, 3));
    }

    #[test]
    fn moments_of_a_tilted_bar_give_its_centre_and_direction() {
        let mut m = Moments::default();
        assert_eq!((m.count(), m.centroid(), m.covariance()), (0, (0.0, 0.0), (0.0, 0.0, 0.0)));
        // The diagonal (2, 3) .. (6, 7): centre (4, 5), equal spreads, perfectly correlated.
        for k in 0..5 {
            m.add(2 + k, 3 + k);
        }
        assert_eq!(m.count(), 5);
        assert_eq!(m.centroid(), (4.0, 5.0));
        let (cxx, cyy, cxy) = m.covariance();
        assert!((cxx - 2.0).abs() < 1e-12 && (cyy - 2.0).abs() < 1e-12 && (cxy - 2.0).abs() < 1e-12);
    }
}
