//! Per-session scratch buffers. Sized for the largest batch seen so far and reused, so a decode
//! step (one token) allocates nothing once the session has warmed up.

use crate::config::ModelConfig;
use crate::error::{Error, Result};

#[derive(Debug, Default)]
pub struct State {
    pub t: usize,                      // rows the buffers below are sized for
    pub h: Vec<f32>,                   // [t, d]           residual stream
    pub a: Vec<f32>,                   // [t, d]           normalised input of a sub-layer
    pub q: Vec<f32>,                   // [t, H·(dn+dr)]   queries (rope part rotated in place)
    pub kva: Vec<f32>,                 // [t, r+dr]        kv_a_proj_with_mqa output
    pub o: Vec<f32>,                   // [t, H·dv]        attention output before o_proj
    pub proj: Vec<f32>,                // [t, d]           o_proj / down_proj output
    pub up: Vec<f32>,                  // [t, I]           up_proj, then relu² in place
    pub active: Vec<(u32, f32)>,       // [≤ I]            (neuron, activation) of non-zero neurons
    pub parts: Vec<f32>, // [threads, d]     per-thread partial sums of the down projection
    pub plan: crate::tensor::DownPlan, //            kernel calls of a planar down projection
    pub q_lat: Vec<f32>, // [H, r + dr]      absorbed query  [W_UKᵀ q_nope ; q_rope]
    pub ctx: Vec<f32>,   // [H, r]           Σ_u P(u) c(u)
    pub scores: Vec<f32>, // [H, max_seq]     attention weights
    pub positions: Vec<u32>, // [max_seq]        0, 1, …: the cached positions (key list)
    pub logits: Vec<f32>, // [t or 1, V]
    pub zeros: Vec<u64>, // [layers]         zero ReLU² neurons counted (telemetry)
    pub neurons: Vec<u64>, // [layers]         neurons evaluated (telemetry)
    pub down_rows: Vec<u64>, // [layers]         W_downᵀ rows a dense decode would read (telemetry)
    pub down_read: Vec<u64>, // [layers]         W_downᵀ rows decode read (telemetry)
}

impl State {
    /// The buffers of a session of `max_seq` positions; [`Error::Memory`] (not an abort) when
    /// the attention scores `[heads, max_seq]` cannot be allocated.
    pub fn new(c: &ModelConfig, max_seq: usize) -> Result<State> {
        let h = c.num_attention_heads;
        let too_big = || {
            Error::Memory(format!(
                "cannot allocate attention scores for {h} heads x {max_seq} positions; a \
                 smaller max_seq needs less"
            ))
        };
        let scores = h
            .checked_mul(max_seq)
            .and_then(crate::alloc::try_zeroed_f32)
            .ok_or_else(too_big)?;
        let mut positions = Vec::new();
        positions
            .try_reserve_exact(max_seq)
            .map_err(|_| too_big())?;
        positions.extend(0..max_seq as u32);
        let mut s = State {
            q_lat: vec![0.0; h * (c.kv_lora_rank + c.qk_rope_head_dim)],
            ctx: vec![0.0; h * c.kv_lora_rank],
            scores,
            positions,
            active: Vec::with_capacity(c.intermediate_size),
            parts: Vec::new(),
            zeros: vec![0; c.num_hidden_layers],
            neurons: vec![0; c.num_hidden_layers],
            down_rows: vec![0; c.num_hidden_layers],
            down_read: vec![0; c.num_hidden_layers],
            ..State::default()
        };
        s.ensure(c, 1, false);
        Ok(s)
    }

    /// Size the per-token buffers for `t` rows (grows only).
    pub fn ensure(&mut self, c: &ModelConfig, t: usize, all_logits: bool) {
        let h = c.num_attention_heads;
        let fit = |v: &mut Vec<f32>, n: usize| {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        };
        fit(&mut self.h, t * c.hidden_size);
        fit(&mut self.a, t * c.hidden_size);
        fit(&mut self.q, t * h * c.qk_head_dim());
        fit(&mut self.kva, t * c.latent_dim());
        fit(&mut self.o, t * h * c.v_head_dim);
        fit(&mut self.proj, t * c.hidden_size);
        fit(&mut self.up, t * c.intermediate_size);
        fit(
            &mut self.logits,
            if all_logits { t } else { 1 } * c.vocab_size,
        );
        self.t = self.t.max(t);
    }

    /// Mean fraction of zero ReLU² neurons since the last reset of the counters.
    pub fn sparsity(&self) -> Option<f64> {
        let n: u64 = self.neurons.iter().sum();
        (n > 0).then(|| self.zeros.iter().sum::<u64>() as f64 / n as f64)
    }

    /// Per-layer fraction of zero ReLU² neurons.
    pub fn layer_sparsity(&self) -> Vec<f64> {
        self.zeros
            .iter()
            .zip(&self.neurons)
            .map(|(&z, &n)| if n > 0 { z as f64 / n as f64 } else { 0.0 })
            .collect()
    }

    /// The telemetry counters (zeros, neurons, down rows, rows read), to put back with
    /// [`Self::set_counters`].
    pub fn counters(&self) -> [Vec<u64>; 4] {
        [
            self.zeros.clone(),
            self.neurons.clone(),
            self.down_rows.clone(),
            self.down_read.clone(),
        ]
    }

    pub fn set_counters(&mut self, [zeros, neurons, down_rows, down_read]: [Vec<u64>; 4]) {
        (self.zeros, self.neurons, self.down_rows, self.down_read) =
            (zeros, neurons, down_rows, down_read);
    }

    pub fn reset_counters(&mut self) {
        for v in [
            &mut self.zeros,
            &mut self.neurons,
            &mut self.down_rows,
            &mut self.down_read,
        ] {
            v.iter_mut().for_each(|z| *z = 0);
        }
    }
}
