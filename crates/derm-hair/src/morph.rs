//! Grayscale morphology with line structuring elements, and the binary-mask helpers the hair
//! mask needs (connected components, hole filling, disc dilation).
//!
//! Line maxima and minima are taken on the image padded by the line's half-length on every side
//! and laid out as one flat array, where a step along the line in any of the four orientations
//! is a fixed offset (1, the padded width, or the padded width plus or minus one). The maximum
//! over `2^j` samples is built by doubling (`m[p] = max(m[p], m[p + 2^(j-1) * step])`), and the
//! maximum over the `k = 2r + 1` samples of a line is the larger of two overlapping power-of-two
//! windows. That is about `log2 k + 1` passes, each a plain element-wise maximum of two shifted
//! slices that the compiler vectorises, with no transposes and no per-row bookkeeping.
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

/// The flat-array offset of one step along `dir` in a plane `wp` wide.
fn step_of(dir: LineDir, wp: usize) -> usize {
    match dir {
        LineDir::Horizontal => 1,
        LineDir::Vertical => wp,
        LineDir::Diagonal => wp + 1,
        LineDir::AntiDiagonal => wp - 1,
    }
}

/// Scratch planes for line filters of one image size and radius, reused across calls.
struct LineFilter {
    w: usize,
    r: usize,
    wp: usize,
    /// The padded plane.
    pad: Vec<u8>,
    /// A second plane of the same size for the doubling passes.
    tmp: Vec<u8>,
}

impl LineFilter {
    fn new(w: usize, h: usize, r: usize) -> LineFilter {
        let wp = w + 2 * r;
        let n = wp * (h + 2 * r);
        LineFilter { w, r, wp, pad: vec![0; n], tmp: vec![0; n] }
    }

    /// Copies `src` (`w` x `h`) into the padded plane with `fill` around it.
    fn load(&mut self, src: &[u8], fill: u8) {
        let (w, r, wp) = (self.w, self.r, self.wp);
        let (h, len) = (src.len() / w.max(1), self.pad.len());
        self.pad[..r * wp + r].fill(fill);
        for (y, row) in src.chunks_exact(w).enumerate() {
            let o = (y + r) * wp + r;
            self.pad[o..o + w].copy_from_slice(row);
            // The right margin of this row and the left margin of the next.
            let end = ((y + r + 1) * wp + r).min(len);
            self.pad[o + w..end].fill(fill);
        }
        self.pad[((h + r) * wp).min(len)..].fill(fill);
    }

    /// Writes into `out` (`w` x `h`) the maximum or minimum of the padded plane over a centred
    /// line of `2r + 1` samples along `dir`. The padded plane is used as scratch space.
    fn run(&mut self, dir: LineDir, op: MorphOp, out: &mut [u8]) {
        match op {
            MorphOp::Max => self.run_with(dir, out, |a: u8, b: u8| a.max(b)),
            MorphOp::Min => self.run_with(dir, out, |a: u8, b: u8| a.min(b)),
        }
    }

    fn run_with(&mut self, dir: LineDir, out: &mut [u8], f: impl Fn(u8, u8) -> u8 + Copy) {
        let (w, r, wp) = (self.w, self.r, self.wp);
        if r == 0 {
            for (y, row) in out.chunks_exact_mut(w).enumerate() {
                row.copy_from_slice(&self.pad[y * wp..y * wp + w]);
            }
            return;
        }
        let step = step_of(dir, wp);
        let k = 2 * r + 1;
        // After the loop, m[p] = f over the `span` samples p, p + step, ... (for every p whose
        // samples lie in the plane; the last ones are left stale and never read). Each pass reads
        // one plane and writes the other, so the two slices never alias and the loop vectorises.
        let mut span = 1;
        while span * 2 <= k {
            let off = span * step;
            let n = self.pad.len().saturating_sub(off);
            let (src, dst) = (&self.pad, &mut self.tmp);
            for ((d, &a), &b) in dst[..n].iter_mut().zip(&src[..n]).zip(&src[off..off + n]) {
                *d = f(a, b);
            }
            std::mem::swap(&mut self.pad, &mut self.tmp);
            span *= 2;
        }
        let m = &self.pad;
        // Window [c - r, c + r] = [c - r, c - r + span) and [c + r + 1 - span, c + r].
        let back = r * step;
        let second = (k - span) * step;
        for (y, row) in out.chunks_exact_mut(w).enumerate() {
            let c0 = (y + r) * wp + r;
            let a = &m[c0 - back..c0 - back + w];
            let b = &m[c0 - back + second..c0 - back + second + w];
            for ((o, &x), &z) in row.iter_mut().zip(a).zip(b) {
                *o = f(x, z);
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
    let mut lf = LineFilter::new(w, h, radius);
    lf.load(src, op.identity());
    let mut out = vec![0u8; w * h];
    lf.run(dir, op, &mut out);
    out
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
    let mut lf = LineFilter::new(w, h, radius);
    let mut out = vec![0u8; w * h];
    closing_into(&mut lf, src, dir, &mut out);
    out
}

/// [`line_closing`] with reused scratch space.
fn closing_into(lf: &mut LineFilter, src: &[u8], dir: LineDir, out: &mut [u8]) {
    lf.load(src, MorphOp::Max.identity());
    lf.run(dir, MorphOp::Max, out);
    lf.load(out, 0);
    lf.run(dir, MorphOp::Min, out);
}

/// Black-hat: the largest `closing - src` over the four line orientations, computed on both
/// cores.
pub fn black_hat_lines(src: &[u8], w: usize, h: usize, radius: usize) -> Vec<u8> {
    let mut out = vec![0u8; w * h];
    black_hat_into(src, w, h, radius, &mut out);
    out
}

fn black_hat_into(src: &[u8], w: usize, h: usize, radius: usize, out: &mut [u8]) {
    // Two orientations per task: each keeps the larger closing of its pair.
    let pair = |dirs: [LineDir; 2]| {
        let mut lf = LineFilter::new(w, h, radius);
        let mut best = vec![0u8; w * h];
        let mut cur = vec![0u8; w * h];
        closing_into(&mut lf, src, dirs[0], &mut best);
        closing_into(&mut lf, src, dirs[1], &mut cur);
        for (b, &c) in best.iter_mut().zip(&cur) {
            *b = (*b).max(c);
        }
        best
    };
    let (a, b) = rayon::join(
        || pair([LineDir::Horizontal, LineDir::Vertical]),
        || pair([LineDir::Diagonal, LineDir::AntiDiagonal]),
    );
    for ((o, (&x, &y)), &s) in out.iter_mut().zip(a.iter().zip(&b)).zip(src) {
        *o = x.max(y).saturating_sub(s);
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
        let mut m = derm_core::binary::Moments::default();
        for &(y, x0, x1) in &self.runs {
            for x in x0..=x1 {
                m.add(x as usize, y as usize);
            }
        }
        let (cxx, cyy, cxy) = m.covariance();
        let tr = cxx + cyy;
        let det = cxx * cyy - cxy * cxy;
        let l1 = tr / 2.0 + (tr * tr / 4.0 - det).max(0.0).sqrt();
        ((12.0 * l1).sqrt() as f32).max(1.0)
    }
}

/// The index of the first non-zero byte of `row` at or after `from` (`row.len()` if none),
/// skipping zeros eight at a time.
fn skip_zeros(row: &[u8], mut from: usize) -> usize {
    while from < row.len() && row[from] == 0 && !from.is_multiple_of(8) {
        from += 1;
    }
    while from + 8 <= row.len() {
        let word = u64::from_ne_bytes(row[from..from + 8].try_into().unwrap_or([1; 8]));
        if word != 0 {
            break;
        }
        from += 8;
    }
    while from < row.len() && row[from] == 0 {
        from += 1;
    }
    from
}

fn find(parent: &mut [u32], mut i: u32) -> u32 {
    while parent[i as usize] != i {
        parent[i as usize] = parent[parent[i as usize] as usize];
        i = parent[i as usize];
    }
    i
}

/// Runs `(y, x0, x1)` of the pixels of `mask` that are non-zero (`fg`) or zero (`!fg`), and for
/// each run the label of its connected piece (8-connected when `eight`), labels numbered in scan
/// order of the pieces' first runs. Union-find on runs: the cost follows the number of runs.
#[allow(clippy::type_complexity)]
fn label_runs(mask: &[u8], w: usize, h: usize, fg: bool, eight: bool) -> (Vec<(u32, u32, u32)>, Vec<u32>, usize) {
    let mut runs: Vec<(u32, u32, u32)> = Vec::new();
    let mut row_start = Vec::with_capacity(h + 1);
    for y in 0..h {
        row_start.push(runs.len());
        let row = &mask[y * w..(y + 1) * w];
        let mut x = 0;
        while x < w {
            // Zeros are the long stretches in both cases: outside the runs when looking for
            // non-zero pixels, inside them when looking for zeros.
            let x0 = if fg { skip_zeros(row, x) } else { x };
            if x0 >= w {
                break;
            }
            if !fg && row[x0] != 0 {
                x = x0 + 1;
                continue;
            }
            let x1 =
                if fg { row[x0..].iter().position(|&v| v == 0).map_or(w, |n| x0 + n) } else { skip_zeros(row, x0) };
            runs.push((y as u32, x0 as u32, (x1 - 1) as u32));
            x = x1;
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
    let mut label = vec![0u32; runs.len()];
    let mut index = vec![u32::MAX; runs.len()];
    let mut count = 0usize;
    for (i, l) in label.iter_mut().enumerate() {
        let r = find(&mut parent, i as u32) as usize;
        if index[r] == u32::MAX {
            index[r] = count as u32;
            count += 1;
        }
        *l = index[r];
    }
    (runs, label, count)
}

/// Connected pieces of the pixels of `mask` that are non-zero (`fg`) or zero (`!fg`),
/// 8-connected when `eight`, else 4-connected, in scan order of their first pixel. Works on runs
/// with union-find, so the cost follows the number of runs rather than of pixels.
pub fn components_of(mask: &[u8], w: usize, h: usize, fg: bool, eight: bool) -> Vec<Component> {
    let (runs, label, count) = label_runs(mask, w, h, fg, eight);
    let mut out: Vec<Component> =
        (0..count).map(|_| Component { runs: Vec::new(), area: 0, bbox: [u32::MAX, u32::MAX, 0, 0] }).collect();
    for (&(y, x0, x1), &l) in runs.iter().zip(&label) {
        let c = &mut out[l as usize];
        c.runs.push((y, x0, x1));
        c.area += (x1 - x0 + 1) as usize;
        c.bbox = [c.bbox[0].min(x0), c.bbox[1].min(y), c.bbox[2].max(x1), c.bbox[3].max(y)];
    }
    out
}

/// Area of each labelled piece, and whether it touches the image border.
fn piece_stats(runs: &[(u32, u32, u32)], label: &[u32], count: usize, w: usize, h: usize) -> (Vec<usize>, Vec<bool>) {
    let mut area = vec![0usize; count];
    let mut border = vec![false; count];
    for (&(y, x0, x1), &l) in runs.iter().zip(label) {
        area[l as usize] += (x1 - x0 + 1) as usize;
        if y == 0 || y as usize == h - 1 || x0 == 0 || x1 as usize == w - 1 {
            border[l as usize] = true;
        }
    }
    (area, border)
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
    let (runs, label, count) = label_runs(mask, w, h, true, true);
    let (area, _) = piece_stats(&runs, &label, count, w, h);
    for (&(y, x0, x1), &l) in runs.iter().zip(&label) {
        if area[l as usize] < min_area {
            mask[y as usize * w + x0 as usize..=y as usize * w + x1 as usize].fill(0);
        }
    }
}

/// Sets to 255 every hole of `mask` (a 4-connected piece of zeros that does not touch the image
/// border) with at most `max_area` pixels; `usize::MAX` fills every hole.
pub fn fill_holes(mask: &mut [u8], w: usize, h: usize, max_area: usize) {
    let (runs, label, count) = label_runs(mask, w, h, false, false);
    let (area, border) = piece_stats(&runs, &label, count, w, h);
    for (&(y, x0, x1), &l) in runs.iter().zip(&label) {
        if !border[l as usize] && area[l as usize] <= max_area {
            mask[y as usize * w + x0 as usize..=y as usize * w + x1 as usize].fill(255);
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
