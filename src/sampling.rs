//! Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, repetition
//! and frequency penalties, with a seeded generator (same seed and inputs → same text).
//!
//! Order of application (llama.cpp's default chain): penalties → top-k → top-p → min-p →
//! temperature → draw. Temperature 0 (or below) is greedy: the highest logit, lowest id on ties.

/// Sampling parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `<= 0` means greedy.
    pub temperature: f32,
    /// Keep the `k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `p` (1.0 = all).
    pub top_p: f32,
    /// Drop tokens below `min_p ×` the top probability (0 = off).
    pub min_p: f32,
    /// Divide positive / multiply negative logits of recently seen tokens (1.0 = off).
    pub repeat_penalty: f32,
    /// Subtract `count × frequency_penalty` from seen tokens' logits (0 = off).
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub penalty_last_n: usize,
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0x5EED,
        }
    }
}

impl SamplingParams {
    /// Whether these parameters choose the largest logit with nothing else applied (greedy,
    /// no penalties): the choice a device can make without the host (see
    /// `Model::queue_pick`).
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature <= 0.0 && self.repeat_penalty == 1.0 && self.frequency_penalty == 0.0
    }
}

/// PCG-XSH-RR 32-bit generator (small, fast, reproducible across platforms).
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        let mut r = Rng {
            state: seed.wrapping_add(0x853c_49e6_748f_ea9b),
        };
        r.next_u32();
        r
    }
    /// Next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.state = old
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        xorshifted.rotate_right((old >> 59) as u32)
    }
    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }
}

/// A sampler: parameters plus generator state.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = Rng::new(params.seed);
        Sampler { params, rng }
    }

    /// The parameters it samples with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits`, given the tokens so far (`history`) for penalties.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.is_plain_greedy() {
            return argmax(logits);
        }
        let mut l = logits.to_vec();
        if p.repeat_penalty != 1.0 || p.frequency_penalty != 0.0 {
            let recent = &history[history.len().saturating_sub(p.penalty_last_n)..];
            let mut counts = std::collections::HashMap::new();
            for &t in recent {
                *counts.entry(t).or_insert(0u32) += 1;
            }
            for (&t, &n) in &counts {
                if let Some(v) = l.get_mut(t as usize) {
                    *v = if *v > 0.0 {
                        *v / p.repeat_penalty
                    } else {
                        *v * p.repeat_penalty
                    };
                    *v -= n as f32 * p.frequency_penalty;
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(&l);
        }
        let mut cand: Vec<(u32, f32)> = l.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            let keep = probs
                .iter()
                .take(cand.len())
                .take_while(|&&q| q >= floor)
                .count()
                .max(1);
            cand.truncate(keep);
        }
        // Temperature on the surviving logits, then draw.
        let weights: Vec<f32> = cand
            .iter()
            .map(|c| ((c.1 - max) / p.temperature).exp())
            .collect();
        let total: f32 = weights.iter().sum();
        let mut r = self.rng.next_f32() * total;
        for (c, w) in cand.iter().zip(&weights) {
            if r < *w {
                return c.0;
            }
            r -= w;
        }
        cand[cand.len() - 1].0
    }
}

/// Index of the largest value (lowest index on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_maximum() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0, 3.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_draws_and_top_k_is_respected() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let params = SamplingParams {
            temperature: 0.9,
            top_k: 5,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::default()
        };
        let mut top5: Vec<u32> = (0..100).collect();
        top5.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        top5.truncate(5);
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params.clone()
            });
            (0..200).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        assert!(a.iter().all(|t| top5.contains(t)));
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 1, "temperature sampling should vary");
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..SamplingParams::default()
        });
        assert_eq!(s.sample(&[1.0, 1.5], &[1]), 0);
    }
}
