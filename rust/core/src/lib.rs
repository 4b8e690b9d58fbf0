//! sparselm-core: PLM (MLA + ReLU²) inference on CPUs. No Python in here.
//!
//! Layers call downward only: `session` → `model` → `tensor`/`ops` → `kernels`.

pub mod alloc;
#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod config;
pub mod control;
pub mod cpu;
pub mod error;
pub mod gemm;
pub mod kernels;
pub mod kv_cache;
pub mod loader;
pub mod membw;
pub mod model;
pub mod ops;
pub mod quant;
pub mod safetensors;
pub mod sampler;
pub mod session;
pub mod state;
pub mod team;
pub mod tensor;
pub mod weights;

pub use config::ModelConfig;
pub use control::Control;
pub use error::{Error, Result};
pub use model::{parse_dtype, AttnMode, Model};
pub use sampler::SamplingParams;
pub use session::{FinishReason, Session};
pub use tensor::DType;

/// The core's own tests run on the allocator the frontends install.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOC: alloc::HugePageAlloc = alloc::HugePageAlloc;
