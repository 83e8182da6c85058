//! Grayscale morphology with line structuring elements, and the binary-mask helpers the hair
//! mask needs (connected components, hole filling, disc dilation).
//!
//! Line maxima and minima use the van Herk / Gil-Werman algorithm: the signal along each line is
//! cut into blocks of the element's length `k`, a running maximum is taken forwards and
//! backwards within each block, and the maximum over any window of length `k` is the larger of
//! one backward and one forward value. That is three comparisons per pixel whatever `k` is. The
//! vertical and diagonal directions are run a whole image row at a time (each row's running
//! values follow from the previous row's, shifted by the direction), so the inner loops are
//! contiguous and vectorise.
//!
//! Pixels outside the image are ignored (they never win a maximum or a minimum), so a closing
//! leaves a constant image unchanged up to its border.

/// Orientation of a line structuring element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineDir {
    /// Along a row (0°).
    Horizontal,
    /// Along a column (90°).
    Vertical,
    /// Down and to the right (x and y grow together; 135° with y pointing up, as seen on screen
    /// it runs from top-left to bottom-right).
    Diagonal,
    /// Down and to the left (45° as seen on screen).
    AntiDiagonal,
}

impl LineDir {
    /// All four orientations.
    pub const ALL: [LineDir; 4] = [LineDir::Horizontal, LineDir::Vertical, LineDir::Diagonal, LineDir::AntiDiagonal];

    /// The column step per row step for the row-at-a-time directions.
    fn dx(self) -> isize {
        match self {
            LineDir::Diagonal => 1,
            LineDir::AntiDiagonal => -1,
            _ => 0,
        }
    }
}

/// Maximum (dilation) or minimum (erosion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MorphOp {
    /// Maximum over the element: grayscale dilation.
    Max,
    /// Minimum over the element: grayscale erosion.
    Min,
}

impl MorphOp {
    /// The value that never wins.
    fn identity(self) -> u8 {
        match self {
            MorphOp::Max => 0,
            MorphOp::Min => 255,
        }
    }
}

/// A plane with `r` pixels of padding on every side.
struct Padded {
    data: Vec<u8>,
    wp: usize,
    hp: usize,
    r: usize,
}

impl Padded {
    fn new(src: &[u8], w: usize, h: usize, r: usize, fill: u8) -> Padded {
        let (wp, hp) = (w + 2 * r, h + 2 * r);
        let mut data = vec![fill; wp * hp];
        for y in 0..h {
            data[(y + r) * wp + r..(y + r) * wp + r + w].copy_from_slice(&src[y * w..(y + 1) * w]);
        }
        Padded { data, wp, hp, r }
    }

    fn refill_border(&mut self, fill: u8) {
        let (wp, hp, r) = (self.wp, self.hp, self.r);
        self.data[..r * wp].fill(fill);
        self.data[(hp - r) * wp..].fill(fill);
        for y in r..hp - r {
            self.data[y * wp..y * wp + r].fill(fill);
            self.data[(y + 1) * wp - r..(y + 1) * wp].fill(fill);
        }
    }

    fn interior(&self) -> Vec<u8> {
        let (w, h, r) = (self.wp - 2 * self.r, self.hp - 2 * self.r, self.r);
        let mut out = Vec::with_capacity(w * h);
        for y in 0..h {
            out.extend_from_slice(&self.data[(y + r) * self.wp + r..(y + r) * self.wp + r + w]);
        }
        out
    }

    /// Filters in place with a centred line of half-length `self.r`. Interior pixels (at least
    /// `r` from every side) are exact; the padding ring holds garbage afterwards.
    fn filter(&mut self, dir: LineDir, op: MorphOp) {
        match op {
            MorphOp::Max => self.filter_with(dir, |a: u8, b: u8| a.max(b)),
            MorphOp::Min => self.filter_with(dir, |a: u8, b: u8| a.min(b)),
        }
    }

    fn filter_with(&mut self, dir: LineDir, f: impl Fn(u8, u8) -> u8 + Copy) {
        let (wp, hp, r) = (self.wp, self.hp, self.r);
        let k = 2 * r + 1;
        if r == 0 {
            return;
        }
        debug_assert!(dir != LineDir::Horizontal, "rows are filtered through the transpose");
        let dx = dir.dx();
        let src = &self.data;
        let mut g = vec![0u8; wp * hp];
        let mut hb = vec![0u8; wp * hp];
        // Forward running values: restart at each block start (y % k == 0).
        for y in 0..hp {
            let (prev, cur) = g.split_at_mut(y * wp);
            let cur = &mut cur[..wp];
            let fr = &src[y * wp..(y + 1) * wp];
            if y % k == 0 {
                cur.copy_from_slice(fr);
                continue;
            }
            let pr = &prev[(y - 1) * wp..y * wp];
            shifted_combine(cur, pr, fr, dx, f);
        }
        // Backward running values: restart at each block end and at the last row.
        for y in (0..hp).rev() {
            let (cur, next) = hb.split_at_mut((y + 1) * wp);
            let cur = &mut cur[y * wp..];
            let fr = &src[y * wp..(y + 1) * wp];
            if y % k == k - 1 || y == hp - 1 {
                cur.copy_from_slice(fr);
                continue;
            }
            let nx = &next[..wp];
            shifted_combine(cur, nx, fr, -dx, f);
        }
        let out = &mut self.data;
        let sh = dx * r as isize;
        for y in r..hp - r {
            let hr = &hb[(y - r) * wp..(y - r + 1) * wp];
            let gr = &g[(y + r) * wp..(y + r + 1) * wp];
            let orow = &mut out[y * wp..(y + 1) * wp];
            // out[x] = f(h[y - r][x - sh], g[y + r][x + sh]) for x in [r, wp - r).
            let xs = r..wp - r;
            let hs = &hr[(r as isize - sh) as usize..(wp as isize - r as isize - sh) as usize];
            let gs = &gr[(r as isize + sh) as usize..(wp as isize - r as isize + sh) as usize];
            for ((o, &a), &b) in orow[xs].iter_mut().zip(hs).zip(gs) {
                *o = f(a, b);
            }
        }
    }
}

/// `cur[x] = f(prev[x - dx], fr[x])`, and `fr[x]` where `x - dx` is outside the row.
#[inline]
fn shifted_combine(cur: &mut [u8], prev: &[u8], fr: &[u8], dx: isize, f: impl Fn(u8, u8) -> u8) {
    let n = cur.len();
    match dx {
        0 => {
            for ((c, &p), &v) in cur.iter_mut().zip(prev).zip(fr) {
                *c = f(p, v);
            }
        }
        1 => {
            cur[0] = fr[0];
            for ((c, &p), &v) in cur[1..].iter_mut().zip(&prev[..n - 1]).zip(&fr[1..]) {
                *c = f(p, v);
            }
        }
        _ => {
            cur[n - 1] = fr[n - 1];
            for ((c, &p), &v) in cur[..n - 1].iter_mut().zip(&prev[1..]).zip(&fr[..n - 1]) {
                *c = f(p, v);
            }
        }
    }
}

/// The transpose of a `w` x `h` row-major plane (so `h` x `w`), in cache-sized tiles.
pub fn transpose(src: &[u8], w: usize, h: usize) -> Vec<u8> {
    const T: usize = 32;
    let mut out = vec![0u8; w * h];
    for by in (0..h).step_by(T) {
        for bx in (0..w).step_by(T) {
            for y in by..(by + T).min(h) {
                for x in bx..(bx + T).min(w) {
                    out[x * h + y] = src[y * w + x];
                }
            }
        }
    }
    out
}

/// Maximum or minimum of `src` (`w` x `h`, row-major) over a centred line of `2 * radius + 1`
/// pixels in direction `dir`. Pixels outside the image are ignored.
pub fn line_filter(src: &[u8], w: usize, h: usize, dir: LineDir, radius: usize, op: MorphOp) -> Vec<u8> {
    if dir == LineDir::Horizontal {
        // Rows are filtered as the columns of the transpose, where the inner loops vectorise.
        let t = line_filter(&transpose(src, w, h), h, w, LineDir::Vertical, radius, op);
        return transpose(&t, h, w);
    }
    let mut p = Padded::new(src, w, h, radius, op.identity());
    p.filter(dir, op);
    p.interior()
}

/// Grayscale closing (maximum, then minimum) with a centred line of `2 * radius + 1` pixels.
/// Thin dark structures that the line cannot fit inside are filled with their surroundings.
///
/// Outside the image counts as black (0) for the minimum and is ignored by the maximum, so a dark
/// region that touches the border (the black corners of a dermoscope's field of view) is never
/// "thin": it continues outwards. The price is that a line reaching past the border closes to
/// 0 there, so a hair running along the border within `radius` of it is found only by the
/// orientations that stay inside.
pub fn line_closing(src: &[u8], w: usize, h: usize, dir: LineDir, radius: usize) -> Vec<u8> {
    if dir == LineDir::Horizontal {
        let t = line_closing(&transpose(src, w, h), h, w, LineDir::Vertical, radius);
        return transpose(&t, h, w);
    }
    let mut p = Padded::new(src, w, h, radius, MorphOp::Max.identity());
    p.filter(dir, MorphOp::Max);
    p.refill_border(0);
    p.filter(dir, MorphOp::Min);
    p.interior()
}

/// Black-hat: the largest `closing - src` over the four line orientations, computed on both
/// cores.
pub fn black_hat_lines(src: &[u8], w: usize, h: usize, radius: usize) -> Vec<u8> {
    let mut out = vec![0u8; w * h];
    black_hat_into(src, w, h, radius, &mut out);
    out
}

fn black_hat_into(src: &[u8], w: usize, h: usize, radius: usize, out: &mut [u8]) {
    let close = |d: LineDir| line_closing(src, w, h, d, radius);
    let ((a, b), (c, d)) = rayon::join(
        || rayon::join(|| close(LineDir::Horizontal), || close(LineDir::Vertical)),
        || rayon::join(|| close(LineDir::Diagonal), || close(LineDir::AntiDiagonal)),
    );
    for (i, o) in out.iter_mut().enumerate() {
        *o = a[i].max(b[i]).max(c[i]).max(d[i]).saturating_sub(src[i]);
    }
}

/// One connected piece of a binary mask, as runs of consecutive pixels in rows.
#[derive(Debug, Clone, Default)]
pub struct Component {
    /// Runs `(y, x0, x1)`: pixels `x0..=x1` of row `y`.
    pub runs: Vec<(u32, u32, u32)>,
    /// Number of pixels.
    pub area: usize,
    /// Smallest and largest column and row: `[x0, y0, x1, y1]`.
    pub bbox: [u32; 4],
}

impl Component {
    /// Number of pixels.
    pub fn area(&self) -> usize {
        self.area
    }

    /// Row-major indices of the pixels of an image `w` wide.
    pub fn pixels(&self, w: usize) -> impl Iterator<Item = usize> + '_ {
        self.runs.iter().flat_map(move |&(y, x0, x1)| (x0..=x1).map(move |x| y as usize * w + x as usize))
    }

    /// Length of the piece: the square root of twelve times the larger eigenvalue of its pixel
    /// covariance (a uniform segment of length `L` has variance `L² / 12` along itself).
    pub fn length(&self) -> f32 {
        let n = self.area as f64;
        if n < 2.0 {
            return n as f32;
        }
        let (mut sx, mut sy, mut sxx, mut syy, mut sxy) = (0f64, 0f64, 0f64, 0f64, 0f64);
        for &(y, x0, x1) in &self.runs {
            for x in x0..=x1 {
                let (xf, yf) = (x as f64, y as f64);
                sx += xf;
                sy += yf;
                sxx += xf * xf;
                syy += yf * yf;
                sxy += xf * yf;
            }
        }
        let (mx, my) = (sx / n, sy / n);
        let cxx = sxx / n - mx * mx;
        let cyy = syy / n - my * my;
        let cxy = sxy / n - mx * my;
        let tr = cxx + cyy;
        let det = cxx * cyy - cxy * cxy;
        let l1 = tr / 2.0 + (tr * tr / 4.0 - det).max(0.0).sqrt();
        ((12.0 * l1).sqrt() as f32).max(1.0)
    }
}

fn find(parent: &mut [u32], mut i: u32) -> u32 {
    while parent[i as usize] != i {
        parent[i as usize] = parent[parent[i as usize] as usize];
        i = parent[i as usize];
    }
    i
}

/// Connected pieces of the pixels of `mask` that are non-zero (`fg`) or zero (`!fg`),
/// 8-connected when `eight`, else 4-connected, in scan order of their first pixel. Works on runs
/// with union-find, so the cost follows the number of runs rather than of pixels.
pub fn components_of(mask: &[u8], w: usize, h: usize, fg: bool, eight: bool) -> Vec<Component> {
    let mut runs: Vec<(u32, u32, u32)> = Vec::new();
    let mut row_start = Vec::with_capacity(h + 1);
    for y in 0..h {
        row_start.push(runs.len());
        let row = &mask[y * w..(y + 1) * w];
        let mut x = 0;
        while x < w {
            if (row[x] != 0) == fg {
                let x0 = x;
                while x < w && (row[x] != 0) == fg {
                    x += 1;
                }
                runs.push((y as u32, x0 as u32, (x - 1) as u32));
            } else {
                x += 1;
            }
        }
    }
    row_start.push(runs.len());
    let mut parent: Vec<u32> = (0..runs.len() as u32).collect();
    let slack = u32::from(eight);
    for y in 1..h {
        let (mut a, a_end) = (row_start[y - 1], row_start[y]);
        let (mut b, b_end) = (row_start[y], row_start[y + 1]);
        while a < a_end && b < b_end {
            let (_, ax0, ax1) = runs[a];
            let (_, bx0, bx1) = runs[b];
            if ax0 <= bx1 + slack && bx0 <= ax1 + slack {
                let (ra, rb) = (find(&mut parent, a as u32), find(&mut parent, b as u32));
                if ra != rb {
                    parent[ra.max(rb) as usize] = ra.min(rb);
                }
            }
            if ax1 < bx1 {
                a += 1;
            } else {
                b += 1;
            }
        }
    }
    let mut index = vec![u32::MAX; runs.len()];
    let mut out: Vec<Component> = Vec::new();
    for (i, &(y, x0, x1)) in runs.iter().enumerate() {
        let r = find(&mut parent, i as u32) as usize;
        if index[r] == u32::MAX {
            index[r] = out.len() as u32;
            out.push(Component { runs: Vec::new(), area: 0, bbox: [u32::MAX, u32::MAX, 0, 0] });
        }
        let c = &mut out[index[r] as usize];
        c.runs.push((y, x0, x1));
        c.area += (x1 - x0 + 1) as usize;
        c.bbox = [c.bbox[0].min(x0), c.bbox[1].min(y), c.bbox[2].max(x1), c.bbox[3].max(y)];
    }
    out
}

/// Connected pieces of the non-zero pixels of `mask` (8-connected when `eight`).
pub fn components(mask: &[u8], w: usize, h: usize, eight: bool) -> Vec<Component> {
    components_of(mask, w, h, true, eight)
}

/// Zeroes the 8-connected pieces of `mask` with fewer than `min_area` pixels.
pub fn remove_small(mask: &mut [u8], w: usize, h: usize, min_area: usize) {
    if min_area <= 1 {
        return;
    }
    for c in components(mask, w, h, true) {
        if c.area() < min_area {
            for &(y, x0, x1) in &c.runs {
                mask[y as usize * w + x0 as usize..=y as usize * w + x1 as usize].fill(0);
            }
        }
    }
}

/// Sets to 255 every hole of `mask` (a 4-connected piece of zeros that does not touch the image
/// border) with at most `max_area` pixels; `usize::MAX` fills every hole.
pub fn fill_holes(mask: &mut [u8], w: usize, h: usize, max_area: usize) {
    for c in components_of(mask, w, h, false, false) {
        let [x0, y0, x1, y1] = c.bbox;
        let touches = x0 == 0 || y0 == 0 || x1 as usize == w - 1 || y1 as usize == h - 1;
        if !touches && c.area() <= max_area {
            for &(y, x0, x1) in &c.runs {
                mask[y as usize * w + x0 as usize..=y as usize * w + x1 as usize].fill(255);
            }
        }
    }
}

/// Binary dilation of the non-zero pixels of `mask` by a disc of `radius` pixels (pixel centres
/// within the radius), returning a 0/255 mask.
pub fn dilate_disc(mask: &[u8], w: usize, h: usize, radius: f32) -> Vec<u8> {
    let mut out: Vec<u8> = mask.iter().map(|&v| if v != 0 { 255 } else { 0 }).collect();
    let r = radius.floor() as isize;
    if r < 1 {
        return out;
    }
    let r2 = radius * radius + 1e-3;
    let offsets: Vec<(isize, isize)> = (-r..=r)
        .flat_map(|dy| (-r..=r).map(move |dx| (dx, dy)))
        .filter(|&(dx, dy)| (dx * dx + dy * dy) as f32 <= r2 && (dx, dy) != (0, 0))
        .collect();
    let (wi, hi) = (w as isize, h as isize);
    for y in 0..hi {
        for x in 0..wi {
            let i = (y * wi + x) as usize;
            if mask[i] == 0 {
                continue;
            }
            // Interior pixels of the mask spread nothing new.
            let interior = x > 0
                && y > 0
                && x < wi - 1
                && y < hi - 1
                && mask[i - 1] != 0
                && mask[i + 1] != 0
                && mask[i - w] != 0
                && mask[i + w] != 0;
            if interior {
                continue;
            }
            for &(dx, dy) in &offsets {
                let (nx, ny) = (x + dx, y + dy);
                if nx >= 0 && ny >= 0 && nx < wi && ny < hi {
                    out[(ny * wi + nx) as usize] = 255;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(src: &[u8], w: usize, h: usize, dir: LineDir, r: usize, op: MorphOp) -> Vec<u8> {
        let (sx, sy): (isize, isize) = match dir {
            LineDir::Horizontal => (1, 0),
            LineDir::Vertical => (0, 1),
            LineDir::Diagonal => (1, 1),
            LineDir::AntiDiagonal => (-1, 1),
        };
        let mut out = vec![0u8; w * h];
        for y in 0..h as isize {
            for x in 0..w as isize {
                let mut acc = op.identity();
                for t in -(r as isize)..=r as isize {
                    let (nx, ny) = (x + sx * t, y + sy * t);
                    if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                        continue;
                    }
                    let v = src[(ny * w as isize + nx) as usize];
                    acc = match op {
                        MorphOp::Max => acc.max(v),
                        MorphOp::Min => acc.min(v),
                    };
                }
                out[(y * w as isize + x) as usize] = acc;
            }
        }
        out
    }

    fn random(w: usize, h: usize, seed: u64) -> Vec<u8> {
        let mut rng = derm_core::Rng::new(seed);
        (0..w * h).map(|_| rng.below(256) as u8).collect()
    }

    #[test]
    fn van_herk_equals_brute_force() {
        for (w, h) in [(17, 23), (23, 17), (5, 3), (1, 9), (31, 31)] {
            let src = random(w, h, (w * 100 + h) as u64);
            for r in [0, 1, 2, 3, 5, 8, 20] {
                for dir in LineDir::ALL {
                    for op in [MorphOp::Max, MorphOp::Min] {
                        let fast = line_filter(&src, w, h, dir, r, op);
                        let slow = brute(&src, w, h, dir, r, op);
                        assert_eq!(fast, slow, "{w}x{h} r={r} {dir:?} {op:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn transpose_round_trips() {
        let src = random(37, 70, 9);
        let t = transpose(&src, 37, 70);
        assert_eq!(t[5 * 70 + 3], src[3 * 37 + 5]);
        assert_eq!(transpose(&t, 70, 37), src);
    }

    #[test]
    fn closing_is_max_then_min() {
        let (w, h) = (19, 13);
        let src = random(w, h, 5);
        for dir in LineDir::ALL {
            for r in [1, 3, 6] {
                let d = brute(&src, w, h, dir, r, MorphOp::Max);
                // The erosion sees black outside: pad with a ring of zeros and crop.
                let (pw, ph) = (w + 2 * r, h + 2 * r);
                let mut padded = vec![0u8; pw * ph];
                for y in 0..h {
                    padded[(y + r) * pw + r..(y + r) * pw + r + w].copy_from_slice(&d[y * w..(y + 1) * w]);
                }
                let e = brute(&padded, pw, ph, dir, r, MorphOp::Min);
                let want: Vec<u8> = (0..h).flat_map(|y| e[(y + r) * pw + r..(y + r) * pw + r + w].to_vec()).collect();
                assert_eq!(line_closing(&src, w, h, dir, r), want, "{dir:?} r={r}");
            }
        }
        // A constant image is unchanged away from the border.
        let flat = vec![77u8; w * h];
        let c = line_closing(&flat, w, h, LineDir::Diagonal, 4);
        assert_eq!(c[6 * w + 9], 77);
        assert_eq!(c[0], 0);
    }

    #[test]
    fn black_hat_lights_up_a_thin_dark_line() {
        let (w, h) = (32, 32);
        let mut src = vec![200u8; w * h];
        for y in 0..h {
            src[y * w + 10] = 40;
        }
        let bh = black_hat_lines(&src, w, h, 3);
        assert_eq!(bh[5 * w + 10], 160);
        assert_eq!(bh[5 * w + 20], 0);
    }

    #[test]
    fn holes_are_filled_up_to_the_area_limit() {
        let (w, h) = (12, 10);
        let mut m = vec![0u8; w * h];
        // A 5x5 ring with a 3x3 hole, and a ring touching the border.
        for y in 1..6 {
            for x in 1..6 {
                m[y * w + x] = if (2..5).contains(&x) && (2..5).contains(&y) { 0 } else { 255 };
            }
        }
        let mut small = m.clone();
        fill_holes(&mut small, w, h, 8);
        assert_eq!(small[3 * w + 3], 0, "9-pixel hole is above the limit of 8");
        fill_holes(&mut m, w, h, 9);
        assert_eq!(m[3 * w + 3], 255);
        assert_eq!(m[8 * w + 8], 0, "outside stays");
        let mut all = vec![255u8; 9];
        all[4] = 0;
        fill_holes(&mut all, 3, 3, usize::MAX);
        assert!(all.iter().all(|&v| v == 255));
    }

    #[test]
    fn components_sizes_and_small_removal() {
        let (w, h) = (8, 4);
        #[rustfmt::skip]
        let mut m = vec![
            1, 0, 0, 0, 0, 0, 1, 1,
            0, 1, 0, 0, 0, 0, 1, 1,
            0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 1, 0, 0, 0, 0u8,
        ];
        let c8: Vec<usize> = components(&m, w, h, true).iter().map(|c| c.area()).collect();
        assert_eq!(c8, vec![2, 4, 1]);
        assert_eq!(components(&m, w, h, false).len(), 4);
        remove_small(&mut m, w, h, 2);
        assert_eq!(m.iter().filter(|&&v| v != 0).count(), 6);
    }

    #[test]
    fn disc_dilation() {
        let (w, h) = (9, 9);
        let mut m = vec![0u8; w * h];
        m[4 * w + 4] = 1;
        let d = dilate_disc(&m, w, h, 1.0);
        assert_eq!(d.iter().filter(|&&v| v == 255).count(), 5);
        let d = dilate_disc(&m, w, h, 2.0);
        assert_eq!(d.iter().filter(|&&v| v == 255).count(), 13);
        let d = dilate_disc(&m, w, h, 0.4);
        assert_eq!(d.iter().filter(|&&v| v == 255).count(), 1);
    }

    #[test]
    fn segment_length() {
        let w = 50;
        let mut m = vec![0u8; w * 30];
        for x in 5..45 {
            m[10 * w + x] = 1;
        }
        let c = &components(&m, w, 30, true)[0];
        assert!((c.length() - 40.0).abs() < 0.5, "{}", c.length());
        assert_eq!(c.pixels(w).next(), Some(10 * w + 5));
    }
}
