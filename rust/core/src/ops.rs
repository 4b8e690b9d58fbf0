//! Small vector operations of the forward pass (RMSNorm, softmax, RoPE, ReLU²). Written once
//! here so the model files read like the math.

/// `out = g ⊙ x / sqrt(mean(x²) + eps)` (HF `DeepseekV2RMSNorm`, computed in f32).
pub fn rmsnorm(x: &[f32], g: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, xi), gi) in out.iter_mut().zip(x).zip(g) {
        *o = gi * (xi * inv);
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    let inv = 1.0 / s;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// RoPE tables for positions `0..max_pos`: `cos/sin[p, i] = cos/sin(p · theta^(-2i/dim))`,
/// `i < dim/2`, computed in f64.
pub fn rope_tables(max_pos: usize, dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| theta.powf(-(2.0 * i as f64) / dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for &inv_freq in &inv_freq {
            let a = p as f64 * inv_freq;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// Rotate ADJACENT pairs `(x[2i], x[2i+1])` by the angle of row `cos/sin` (PLM's convention,
/// plm-architecture.md §3; the checkpoint is not permuted).
pub fn rope_adjacent(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    for i in 0..x.len() / 2 {
        let (a, b) = (x[2 * i], x[2 * i + 1]);
        x[2 * i] = a * cos[i] - b * sin[i];
        x[2 * i + 1] = a * sin[i] + b * cos[i];
    }
}

/// `relu(x)²` in place; returns the number of non-zero results (the dense MLP's telemetry).
pub fn relu2_count(x: &mut [f32]) -> usize {
    let mut n = 0;
    for v in x.iter_mut() {
        let r = v.max(0.0); // NaN → 0 as well
        *v = r * r;
        n += (*v != 0.0) as usize;
    }
    n
}

/// `relu(x)²` in place; pushes `(index, value)` of every non-zero result to `active`.
/// Branch-free: every element is written to the next free slot and the slot is kept only if
/// the value is non-zero (at ~50 % zeros a branch per element mispredicts half the time).
pub fn relu2_collect(x: &mut [f32], active: &mut Vec<(u32, f32)>) {
    active.clear();
    active.reserve(x.len());
    let slots = &mut active.spare_capacity_mut()[..x.len()];
    let mut n = 0;
    for (j, v) in x.iter_mut().enumerate() {
        let r = v.max(0.0); // NaN → 0 as well
        let a = r * r;
        *v = a;
        slots[n].write((j as u32, a));
        n += (a != 0.0) as usize;
    }
    // SAFETY: every slot below n was written before n moved past it.
    unsafe { active.set_len(n) };
}

/// `h += x`, element by element (the common prefix of the two).
pub fn add(h: &mut [f32], x: &[f32]) {
    for (a, b) in h.iter_mut().zip(x) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relu2_count_agrees_with_collect() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919 % 201) as f32 - 100.0) * 0.37)
            .chain([f32::NAN, -0.0, 1e-30])
            .collect();
        let (mut a, mut b) = (x.clone(), x);
        let mut active = Vec::new();
        relu2_collect(&mut a, &mut active);
        let n = relu2_count(&mut b);
        assert_eq!(n, active.len());
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(n > 400 && n < 600, "{n}");
    }

    #[test]
    fn rope_is_a_rotation_of_pairs() {
        let (c, s) = rope_tables(8, 4, 10000.0);
        let mut x = [1.0f32, 0.0, 0.0, 2.0];
        rope_adjacent(&mut x, &c[3 * 2..4 * 2], &s[3 * 2..4 * 2]);
        assert!((x[0] - 3f32.cos()).abs() < 1e-6 && (x[1] - 3f32.sin()).abs() < 1e-6);
        let a = 3.0f64 * 10000f64.powf(-0.5);
        assert!(
            (x[2] as f64 + 2.0 * a.sin()).abs() < 1e-6
                && (x[3] as f64 - 2.0 * a.cos()).abs() < 1e-6
        );
    }

    #[test]
    fn relu2_counts_exact_zeros() {
        let mut x = [-1.0f32, 0.0, 2.0, 3.0];
        let mut act = Vec::new();
        relu2_collect(&mut x, &mut act);
        assert_eq!(x, [0.0, 0.0, 4.0, 9.0]);
        assert_eq!(act, vec![(2, 4.0), (3, 9.0)]);
        // a square that underflows is an exact zero; NaN counts as inactive
        let mut x = [1e-30f32, f32::NAN, -0.0, 1.0];
        relu2_collect(&mut x, &mut act);
        assert_eq!(act, vec![(3, 1.0)]);
        assert_eq!(x[..3], [0.0, 0.0, 0.0]);
        // against the plain definition on 5000 seeded values (about half negative)
        let mut s = 12345u32;
        let mut x: Vec<f32> = (0..5000)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        let want: Vec<(u32, f32)> = x
            .iter()
            .enumerate()
            .filter(|(_, &v)| v > 0.0 && v * v != 0.0)
            .map(|(j, &v)| (j as u32, v * v))
            .collect();
        relu2_collect(&mut x, &mut act);
        assert_eq!(act, want);
        assert!(act.len() > 2000 && act.len() < 3000);
    }
}
