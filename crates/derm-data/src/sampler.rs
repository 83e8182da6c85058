//! Epoch-based, seeded samplers: a plain shuffle, and a class-balanced sampler whose every
//! mini-batch holds the classes equally (as the paper does for ISIC 2018's imbalance).

use derm_core::{Error, Result, Rng};

/// Gives the sample indices of each epoch, in order. The same (seed, epoch) gives the same
/// indices.
pub trait Sampler: Send + Sync {
    /// The indices of epoch `epoch`.
    fn epoch_indices(&self, epoch: u64) -> Vec<usize>;
}

/// Every sample once per epoch, in a fresh seeded order.
#[derive(Debug, Clone)]
pub struct ShuffleSampler {
    n: usize,
    seed: u64,
}

impl ShuffleSampler {
    /// A shuffle of `0..n`.
    pub fn new(n: usize, seed: u64) -> Self {
        ShuffleSampler { n, seed }
    }

    /// A shuffle of `0..n` independent of the other streams of the same seed (for example one
    /// per GAN head).
    pub fn stream(n: usize, seed: u64, stream: u64) -> Self {
        ShuffleSampler { n, seed: Rng::new(seed).fork(stream).next_u64() }
    }
}

impl Sampler for ShuffleSampler {
    fn epoch_indices(&self, epoch: u64) -> Vec<usize> {
        Rng::new(self.seed).fork(epoch).permutation(self.n)
    }
}

/// Mini-batches with every class equally represented: each batch of `batch_size` takes
/// `batch_size / C` samples of each of the C classes present (the remainder goes to classes
/// chosen at random), drawn without replacement from per-class pools that are reshuffled when
/// used up. Minority classes are therefore repeated within an epoch and majority classes
/// subsampled. Unlabelled samples are never drawn.
#[derive(Debug, Clone)]
pub struct BalancedSampler {
    by_class: Vec<Vec<usize>>,
    batch_size: usize,
    batches: usize,
    seed: u64,
}

impl BalancedSampler {
    /// A sampler over samples labelled `labels` (index = sample index). An epoch has as many
    /// batches as the labelled samples fill (at least one).
    pub fn new(labels: &[Option<usize>], batch_size: usize, seed: u64) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::invalid("balanced sampler: batch size must be at least 1"));
        }
        let classes = labels.iter().flatten().max().map_or(0, |m| m + 1);
        let mut by_class = vec![Vec::new(); classes];
        for (i, l) in labels.iter().enumerate() {
            if let Some(l) = l {
                by_class[*l].push(i);
            }
        }
        by_class.retain(|c| !c.is_empty());
        if by_class.is_empty() {
            return Err(Error::invalid("balanced sampler: no labelled samples"));
        }
        let labelled: usize = by_class.iter().map(Vec::len).sum();
        Ok(BalancedSampler { by_class, batch_size, batches: (labelled / batch_size).max(1), seed })
    }

    /// Sets the number of batches per epoch.
    pub fn with_batches(mut self, batches: usize) -> Self {
        self.batches = batches.max(1);
        self
    }

    /// Batches per epoch.
    pub fn batches(&self) -> usize {
        self.batches
    }
}

impl Sampler for BalancedSampler {
    fn epoch_indices(&self, epoch: u64) -> Vec<usize> {
        let mut rng = Rng::new(self.seed).fork(epoch);
        let c = self.by_class.len();
        let mut pools: Vec<(Vec<usize>, usize)> = self
            .by_class
            .iter()
            .map(|p| {
                let mut p = p.clone();
                rng.shuffle(&mut p);
                (p, 0)
            })
            .collect();
        let mut out = Vec::with_capacity(self.batches * self.batch_size);
        for _ in 0..self.batches {
            let mut take = vec![self.batch_size / c; c];
            for &k in rng.permutation(c).iter().take(self.batch_size % c) {
                take[k] += 1;
            }
            let mut batch = Vec::with_capacity(self.batch_size);
            for (k, n) in take.into_iter().enumerate() {
                let (pool, pos) = &mut pools[k];
                for _ in 0..n {
                    if *pos == pool.len() {
                        rng.shuffle(pool);
                        *pos = 0;
                    }
                    batch.push(pool[*pos]);
                    *pos += 1;
                }
            }
            rng.shuffle(&mut batch);
            out.extend(batch);
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn paper_like_labels() -> Vec<Option<usize>> {
        // ISIC 2017's 374 / 254 / 1372 divided by ten, and two unlabelled samples.
        let mut l = Vec::new();
        for (c, n) in [(0, 37), (1, 25), (2, 137)] {
            l.extend(std::iter::repeat_n(Some(c), n));
        }
        l.push(None);
        l.push(None);
        l
    }

    #[test]
    fn every_balanced_batch_holds_the_classes_equally() {
        let labels = paper_like_labels();
        let s = BalancedSampler::new(&labels, 6, 1).unwrap();
        let idx = s.epoch_indices(0);
        assert_eq!(idx.len(), s.batches() * 6);
        assert_eq!(s.batches(), 199 / 6);
        for b in idx.chunks(6) {
            let mut c = [0; 3];
            for &i in b {
                c[labels[i].unwrap()] += 1;
            }
            assert_eq!(c, [2, 2, 2], "{b:?}");
        }
        // With a batch size that does not divide, classes differ by at most one per batch and
        // even out over the epoch.
        let s = BalancedSampler::new(&labels, 8, 2).unwrap().with_batches(300);
        let mut total = [0usize; 3];
        for b in s.epoch_indices(3).chunks(8) {
            let mut c = [0i32; 3];
            for &i in b {
                c[labels[i].unwrap()] += 1;
            }
            assert!(c.iter().max().unwrap() - c.iter().min().unwrap() <= 1, "{c:?}");
            for k in 0..3 {
                total[k] += c[k] as usize;
            }
        }
        assert!(total.iter().all(|&t| (t as f64 - 800.0).abs() < 60.0), "{total:?}");
    }

    #[test]
    fn balanced_pools_cover_the_minority_before_repeating() {
        let labels = paper_like_labels();
        let s = BalancedSampler::new(&labels, 3, 4).unwrap().with_batches(25);
        let idx = s.epoch_indices(0);
        let mut sk: Vec<usize> = idx.iter().copied().filter(|&i| labels[i] == Some(1)).collect();
        sk.sort();
        sk.dedup();
        assert_eq!(sk.len(), 25, "all 25 keratoses are drawn once in 25 batches");
        assert!(idx.iter().all(|&i| labels[i].is_some()));
    }

    #[test]
    fn samplers_are_seeded_and_epochs_differ() {
        let labels = paper_like_labels();
        let s = BalancedSampler::new(&labels, 6, 1).unwrap();
        assert_eq!(s.epoch_indices(5), s.epoch_indices(5));
        assert_ne!(s.epoch_indices(5), s.epoch_indices(6));
        let p = ShuffleSampler::new(50, 7);
        let mut e = p.epoch_indices(0);
        assert_ne!(e, p.epoch_indices(1));
        assert_eq!(e, ShuffleSampler::new(50, 7).epoch_indices(0));
        e.sort();
        assert_eq!(e, (0..50).collect::<Vec<_>>());
        assert!(BalancedSampler::new(&[None, None], 4, 0).is_err());
        assert!(BalancedSampler::new(&labels, 0, 0).is_err());
    }
}
