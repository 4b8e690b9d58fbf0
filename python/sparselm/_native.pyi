"""Type stubs of the native extension (rust/py). Private: use the public API in sparselm."""

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

def kernel_tier() -> str:
    """The SIMD tier chosen at start-up: 'scalar', 'avx2', 'avx512', 'neon', 'neon-dotprod'."""

def prompt_engine() -> str:
    """What runs the bf16 prompt GEMMs: 'amx-bf16', 'avx512-bf16' or 'none'."""

def down_layout() -> str:
    """How quantized decode down projections read W_down: 'rows', 'groups' or 'none'."""

def default_threads() -> int:
    """The thread count of threads=0: one per physical core this process may run on."""

def read_bandwidth(threads: int, mib: int = 512, passes: int = 3) -> list[float]:
    """GB/s of `passes` plain reads of a `mib`-MiB buffer on `threads` threads."""

class Engine:
    """Immutable model weights plus a thread pool. Shared by any number of sessions."""

    def __init__(
        self,
        model_dir: str,
        dtype: str = "auto",
        threads: int = 0,
        progress: Callable[[int, int], object] | None = None,
    ) -> None:
        """Read model_dir/config.json and the safetensors weights (single or sharded).

        dtype: 'auto' (keep the file's dtype), 'f32', 'f16', 'bf16', 'q8_0', 'q4_0'.
        threads: 0 means the number of cores.
        progress: called on this thread as progress(tensors done, tensors in all) while the
        load runs; an exception it raises stops the load and is raised here. Ctrl-C
        (KeyboardInterrupt) stops the load between tensors too.
        """
    @property
    def config_json(self) -> str:
        """The validated config as a JSON object string (HF field names)."""
    @property
    def dtype(self) -> str: ...
    @property
    def threads(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def max_position_embeddings(self) -> int: ...
    @property
    def prompt_gemm(self) -> str:
        """Arithmetic of multi-token (prompt) products: "bf16", "int8" or "f32"."""
    @property
    def weight_bytes(self) -> int:
        """Bytes of weight matrices held in memory (norms excluded)."""
    def logits(self, ids: Sequence[int]) -> npt.NDArray[np.float32]:
        """Full-prompt forward on a fresh cache: float32 array [len(ids), vocab_size].

        Ctrl-C stops it between layers (KeyboardInterrupt)."""
    def new_session(self, max_seq: int = 0) -> Session:
        """A session with its own latent KV cache of max_seq positions (0: the model's context)."""

class Session:
    """One conversation: a latent KV cache plus the token ids it holds. One call at a time: a
    call while another runs (another thread, a signal handler) raises SessionBusyError."""

    @property
    def n_past(self) -> int: ...
    @property
    def max_seq(self) -> int: ...
    @property
    def tokens(self) -> list[int]: ...
    @property
    def pending(self) -> int | None:
        """The last generated id when it is not in the cache yet (fed by the next run)."""
    @property
    def finish_reason(self) -> str | None:
        """After generation ends: 'stop' (a stop id was sampled), 'length' (max_new_tokens),
        'context' (the cache is full). None while running or before any generation."""
    def reset(self) -> None: ...
    def truncate(self, n: int) -> None:
        """Forget every cached position >= n."""
    def copy(self) -> Session:
        """An independent session with the same cached ids (latents copied), max_seq, stats and
        finish reason; a generation in progress continues as after a closed one (pending)."""
    def feed(
        self, ids: Sequence[int], attention: str = "auto", all_logits: bool = False
    ) -> npt.NDArray[np.float32]:
        """Append ids to the cache. Returns logits of the last id [vocab] or all ids [n, vocab].

        attention: 'auto' (dense for n > 1, absorbed for n == 1), 'dense' or 'absorbed'.
        Ctrl-C stops it between layers (KeyboardInterrupt) with none of ids cached.
        """
    def start(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_ids: Sequence[int] = (),
    ) -> None:
        """Begin generating after prompt_ids. The longest common prefix of prompt_ids and the
        cached tokens is reused; the rest of the prompt is fed (dense attention).
        Raises ContextLengthError if the prompt does not fit in max_seq. Ctrl-C stops the
        prompt between layers (KeyboardInterrupt): the common prefix stays cached, no
        generation is started."""
    def next_token(self) -> int | None:
        """Sample and return the next token id, or None when generation has finished
        (see finish_reason). A sampled stop id ends generation and is not returned."""
    def stats(self) -> dict[str, float]:
        """Timing and sparsity counters of the last generation: prompt_tokens, prompt_seconds,
        decode_tokens, decode_seconds, and once a token was processed: mlp_sparsity (mean
        fraction of zero ReLU² neurons), layer_sparsity (list), down_bytes_skipped_per_token,
        weight_bytes_per_token_dense."""
