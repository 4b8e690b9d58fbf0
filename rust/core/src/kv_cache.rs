//! The compressed MLA cache: per layer and position, the normalised latent `c` (kv_lora_rank)
//! followed by the rotated shared rope key (qk_rope_head_dim). Preallocated once per session;
//! dense (prefill) and absorbed (decode) attention both read and write this same layout.

/// Latent KV cache `[layers, max_seq, kv_lora_rank + qk_rope_head_dim]`, f32.
#[derive(Debug, Clone)]
pub struct LatentCache {
    pub layers: usize,
    pub max_seq: usize,
    pub rank: usize,    // kv_lora_rank
    pub rope: usize,    // qk_rope_head_dim
    pub data: Vec<f32>, // [layers, max_seq, rank + rope]
}

impl LatentCache {
    pub fn new(layers: usize, max_seq: usize, rank: usize, rope: usize) -> LatentCache {
        LatentCache {
            layers,
            max_seq,
            rank,
            rope,
            // Zeroed allocation: pages are only touched as positions are written.
            data: vec![0f32; layers * max_seq * (rank + rope)],
        }
    }

    pub fn row_dim(&self) -> usize {
        self.rank + self.rope
    }

    /// All `max_seq` rows of one layer: `[max_seq, rank + rope]`.
    pub fn layer(&self, l: usize) -> &[f32] {
        let n = self.max_seq * self.row_dim();
        &self.data[l * n..(l + 1) * n]
    }

    /// Row `pos` of layer `l`: `[rank + rope]`.
    pub fn row_mut(&mut self, l: usize, pos: usize) -> &mut [f32] {
        let d = self.row_dim();
        let s = (l * self.max_seq + pos) * d;
        &mut self.data[s..s + d]
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.data.len() * 4
    }
}
