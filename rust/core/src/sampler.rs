//! Seeded sampling from logits: repetition penalty → temperature → top-k → top-p → min-p,
//! the order of Hugging Face's logits processors. Temperature 0 (or top_k 1) is greedy.

use crate::error::{Error, Result};

/// Sampling parameters (validated by `validate`).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Argument(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, reproducible across platforms.
#[derive(Debug, Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    /// A seed from the clock and the address space, for unseeded sampling.
    pub fn entropy_seed() -> u64 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let local = 0u8;
        t ^ ((&local as *const u8 as u64).rotate_left(32))
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A sampler with its RNG and scratch space.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
    cand: Vec<(f32, u32)>,
    seen: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(Rng::entropy_seed);
        Ok(Sampler {
            params,
            rng: Rng::new(seed),
            cand: Vec::new(),
            seen: Vec::new(),
        })
    }

    /// Pick the next token from `logits` (modified in place by the penalty), given the ids
    /// already in the context (`history`, for the repetition penalty).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            // Each distinct id once (HF: gather → penalise → scatter).
            self.seen.clear();
            self.seen.extend(
                history
                    .iter()
                    .copied()
                    .filter(|&t| (t as usize) < logits.len()),
            );
            self.seen.sort_unstable();
            self.seen.dedup();
            for &t in &self.seen {
                let l = &mut logits[t as usize];
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
        if p.is_greedy() {
            return argmax(logits);
        }
        // Candidates keep the raw logits (dividing by T > 0 keeps their order); T is applied
        // in f64 to the differences from the maximum, so a tiny T (1/T or l/T past f32's
        // range, 1e-40 say) gives 0 for the best token and -inf for the rest instead of
        // inf - inf = NaN: the limit, greedy.
        let inv_t = 1.0 / p.temperature as f64;
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        let desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.top_k > 0 && p.top_k < self.cand.len() {
            self.cand.select_nth_unstable_by(p.top_k - 1, desc);
            self.cand.truncate(p.top_k);
        }
        self.cand.sort_unstable_by(desc);
        // softmax over the candidates (f64), in place of the logits
        let m = self.cand[0].0 as f64;
        let mut probs: Vec<f64> = self
            .cand
            .iter()
            .map(|c| ((c.0 as f64 - m) * inv_t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = p.min_p as f64 * probs[0];
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        let mass: f64 = probs[..keep].iter().sum();
        let mut u = self.rng.next_f64() * mass;
        for i in 0..keep {
            u -= probs[i];
            if u < 0.0 {
                return self.cand[i].1;
            }
        }
        self.cand[keep - 1].1
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, k: usize, p: f32, m: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            min_p: m,
            repetition_penalty: 1.0,
            seed: Some(seed),
        }
    }

    #[test]
    fn greedy_forms_agree() {
        let logits = vec![0.1, 2.0, 1.9, -1.0];
        for pr in [
            params(0.0, 0, 1.0, 0.0, 1),
            params(1.0, 1, 1.0, 0.0, 1),
            params(1.0, 0, 1e-6, 0.0, 1),
            params(1.0, 0, 1.0, 1.0, 1),
        ] {
            let mut s = Sampler::new(pr).unwrap();
            for _ in 0..20 {
                assert_eq!(s.sample(&mut logits.clone(), &[]), 1);
            }
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_probabilities() {
        let logits = vec![0.0f32, (3f32).ln(), -100.0];
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0, seed)).unwrap();
            (0..4000)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let ones = draw(7).iter().filter(|&&t| t == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
    }

    /// Temperatures so small that 1/T or logit/T leave f32's range sample the best token
    /// (the limit), with any filters, instead of NaN probabilities.
    #[test]
    fn tiny_temperatures_sample_the_best_token() {
        let logits: Vec<f32> = vec![0.5, 3.0, -2.0, 2.9, 1.0];
        for t in [1e-45f32, 1e-40, 1e-38, 1e-30] {
            for (top_k, top_p, min_p) in
                [(0, 1.0, 0.0), (3, 1.0, 0.0), (0, 0.5, 0.0), (0, 1.0, 0.5)]
            {
                let mut s = Sampler::new(params(t, top_k, top_p, min_p, 7)).unwrap();
                for _ in 0..20 {
                    let got = s.sample(&mut logits.clone(), &[]);
                    assert_eq!(got, 1, "T={t} top_k={top_k} top_p={top_p} min_p={min_p}");
                }
            }
        }
    }

    #[test]
    fn repetition_penalty_applies_once_per_id() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        })
        .unwrap();
        let mut l = vec![4.0f32, 3.0, -1.0];
        assert_eq!(s.sample(&mut l, &[0, 0, 2]), 1);
        assert_eq!(l, vec![2.0, 3.0, -2.0]);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                min_p: -0.1,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
        ] {
            assert_eq!(Sampler::new(p).unwrap_err().kind(), "argument");
        }
    }
}
