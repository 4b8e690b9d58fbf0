//! The compressed MLA cache: per layer and position, the normalised latent `c` (kv_lora_rank)
//! followed by the rotated shared rope key (qk_rope_head_dim). Preallocated once per session;
//! dense (prefill) and absorbed (decode) attention both read and write this same layout.
//!
//! f32, not f16 (issue #3 asked the measurement to decide): PLM-1.8B q4_0, 2 threads, decode at
//! 2048 cached positions ran at ~12 tok/s against ~19-22 at 128, i.e. attention adds ~30 ms
//! per token there. The whole f32 cache of those 2048 positions is 151 MB per token (32 layers
//! × 2048 × 576 × 4 B), which DRAM delivers in ~5 ms; the rest is f32 arithmetic (2.3 GFLOP of
//! scores and context sums per token). Halving the bytes with f16 would save at most those ~2.5
//! ms while adding a widening per element, so the cache stays f32 (exact, simple, and the
//! parity tests keep comparing against f32 references). It costs 73.7 KB per position
//! (302 MB at the 4096-token context of PLM-1.8B); an f16 cache is the lever if memory, not
//! time, becomes the limit.

use crate::error::{Error, Result};

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
    /// A zeroed cache; [`Error::Memory`] (not an abort) when it cannot be allocated.
    pub fn new(layers: usize, max_seq: usize, rank: usize, rope: usize) -> Result<LatentCache> {
        let too_big = || {
            Error::Memory(format!(
                "cannot allocate the KV cache: {layers} layers x {max_seq} positions x {} \
                 values (f32); a smaller max_seq needs less",
                rank + rope
            ))
        };
        let n = layers
            .checked_mul(max_seq)
            .and_then(|x| x.checked_mul(rank + rope))
            .ok_or_else(too_big)?;
        // Zeroed allocation: pages are only touched as positions are written, and on base
        // pages, so a short context commits only what it writes.
        let data = crate::alloc::try_zeroed_f32(n).ok_or_else(too_big)?;
        crate::alloc::no_huge_pages(&data);
        Ok(LatentCache {
            layers,
            max_seq,
            rank,
            rope,
            data,
        })
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
