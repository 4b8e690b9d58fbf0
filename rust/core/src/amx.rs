//! Intel AMX tiles (AMX-TILE + AMX-BF16) for the prompt GEMMs of `gemm.rs`.
//!
//! Owns: detection (CPUID leaf 7, the kernel's per-process permission for tile data through
//! `arch_prctl(ARCH_REQ_XCOMP_PERM)`), the `SPARSELM_AMX=0` override, per-thread tile
//! configuration, and two tile kernels over bf16 pairs:
//! - [`nk_pair`]: 32 weight rows (bf16, row-major, as `matmul_nk`'s panel) × 32 tokens
//!   (bf16 pairs packed by [`pack_tokens`]) over all of K;
//! - [`kn_panel`]: 16 tokens (bf16 pairs, row-major) × the 64 columns of a `matmul_kn` panel
//!   (pair rows), over a list of 16-pair chunks;
//! - [`q16_tokens`] (AMX-INT8): 16 tokens quantized to Q8_0 × one 16-row group of the
//!   interleaved Q8_0/Q4_0 GEMV layout: per block one `tdpbsud` gives the exact integer sums
//!   of all 16 × 16 (token, row) pairs, then the same float operations as the 16-row GEMV
//!   kernel apply the scales, so every result equals that token's GEMV bit for bit.
//!
//! Numerics are those of the AVX-512 BF16 path: bf16 inputs, exact products, f32 sums
//! (`tdpbf16ps`, like `vdpbf16ps`, treats bf16 denormals as zero and rounds to nearest even);
//! only the order of the f32 additions differs.
//!
//! Tile registers are per thread: every parallel task that runs a kernel first holds a
//! [`Tiles`] guard (`ldtilecfg`), which releases them (`tilerelease`) when dropped, so no thread
//! keeps tile state (8 KiB of context) after a GEMM.
//!
//! Must not: be reached when [`available`] is false (the instructions fault without the
//! kernel's permission); know about layers or models.
#![cfg(target_arch = "x86_64")]

use std::arch::asm;
use std::sync::OnceLock;

/// Bytes in one tile row (and the widest tile).
pub const ROW_BYTES: usize = 64;
/// bf16 values of K per tile step (16 pairs).
pub const K_STEP: usize = 32;

/// AMX-BF16 tiles can run here: the CPU reports AMX-TILE and AMX-BF16, the kernel granted
/// this process tile data, and `SPARSELM_AMX` is not `0`. Decided once per process.
pub fn available() -> bool {
    static A: OnceLock<bool> = OnceLock::new();
    *A.get_or_init(|| {
        let off = std::env::var("SPARSELM_AMX").is_ok_and(|v| v.trim() == "0");
        !off && cpu_has_amx_bf16() && request_permission()
    })
}

/// AMX-INT8 tiles can run here too: [`available`] and the CPU reports AMX-INT8.
pub fn available_int8() -> bool {
    static A: OnceLock<bool> = OnceLock::new();
    *A.get_or_init(|| available() && leaf7_edx() & (1 << 25) != 0)
}

/// CPUID.(EAX=7, ECX=0):EDX, or 0 where leaf 7 does not exist.
fn leaf7_edx() -> u32 {
    // cpuid exists on every x86-64 CPU; leaf 7 is checked against the maximum leaf.
    if std::arch::x86_64::__cpuid(0).eax < 7 {
        return 0;
    }
    std::arch::x86_64::__cpuid_count(7, 0).edx
}

/// CPUID.(EAX=7, ECX=0):EDX bit 22 (AMX-BF16) and bit 24 (AMX-TILE): the CPU has the tiles,
/// whether or not the OS lets this process use them.
pub fn cpu_has_amx_bf16() -> bool {
    let edx = leaf7_edx();
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

/// Ask Linux for permission to use tile data (XFEATURE 18); it is granted to the whole
/// process. Elsewhere AMX is not used.
fn request_permission() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM takes two integers and touches no memory.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        rc == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// The 64-byte tile configuration of `ldtilecfg` (palette 1).
#[repr(C, align(64))]
struct TileCfg([u8; 64]);

impl TileCfg {
    /// Tiles of `(rows, bytes per row)`, from tmm0 on (palette 1).
    fn new(shapes: &[(u8, u16)]) -> TileCfg {
        let mut c = [0u8; 64];
        c[0] = 1; // palette
        for (t, &(rows, colsb)) in shapes.iter().enumerate() {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
            c[48 + t] = rows;
        }
        TileCfg(c)
    }
}

/// Tiles configured on this thread for the kernels below; released on drop. Not `Send` (tile
/// configuration is per thread) and not nestable on one thread (a second `ldtilecfg` would
/// reset the first one's tiles): both are checked.
pub struct Tiles(std::marker::PhantomData<*const ()>);

/// The configuration live on this thread: none, [`Tiles::configure`] or
/// [`Tiles::configure_int8`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Config {
    None,
    Bf16,
    Int8,
}

thread_local! {
    static LIVE: std::cell::Cell<Config> = const { std::cell::Cell::new(Config::None) };
}

impl Tiles {
    /// Configure this thread's tiles for [`nk_pair`] and [`kn_panel`]: all eight 16 rows × 64
    /// bytes. Panics if [`available`] is false or tiles are already configured here.
    pub fn configure() -> Tiles {
        Self::load(&TileCfg::new(&[(16, ROW_BYTES as u16); 8]), Config::Bf16)
    }

    /// Configure this thread's tiles for [`q16_tokens`]: tmm0 the 16 × 16 i32 sums, tmm1 16
    /// tokens × 32 code bytes, tmm2 8 rows of 4-byte groups × 16 weight rows. Panics if
    /// [`available_int8`] is false or tiles are already configured here.
    pub fn configure_int8() -> Tiles {
        assert!(available_int8(), "AMX-INT8 tiles unavailable");
        Self::load(&TileCfg::new(&[(16, 64), (16, 32), (8, 64)]), Config::Int8)
    }

    fn load(cfg: &TileCfg, which: Config) -> Tiles {
        assert!(available(), "AMX tiles unavailable");
        assert_eq!(
            live(),
            Config::None,
            "AMX tiles already configured on this thread"
        );
        // SAFETY: the kernel granted tile data (available()); cfg is a valid palette-1
        // configuration, 64 bytes, 64-aligned.
        unsafe { asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        LIVE.with(|l| l.set(which));
        Tiles(std::marker::PhantomData)
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured by Tiles::load on this thread (the guard is not Send).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
        LIVE.with(|l| l.set(Config::None));
    }
}

fn live() -> Config {
    LIVE.with(|l| l.get())
}

/// Tokens `x` (`t` rows of `k` bf16, row stride `ldx`) as the tile-B layout of [`nk_pair`]:
/// per 16-token tile `tt` and 32-wide K step `c`, 16 pair rows of 16 tokens,
/// `out[((tt·ks + c)·16 + p)·16 + j] = x[16tt + j][32c + 2p] | x[16tt + j][32c + 2p + 1] << 16`
/// (zero for tokens ≥ t). `k` is a multiple of 32; `out` holds `tiles · k/32 · 256` pairs.
pub fn pack_tokens(x: &[u16], ldx: usize, t: usize, k: usize, tiles: usize, out: &mut [u32]) {
    assert!(
        k.is_multiple_of(K_STEP) && tiles * 16 >= t,
        "pack_tokens shapes"
    );
    assert!(t == 0 || x.len() >= (t - 1) * ldx + k, "pack_tokens input");
    let ks = k / K_STEP;
    assert!(out.len() >= tiles * ks * 256, "pack_tokens output");
    out[..tiles * ks * 256].fill(0);
    for i in 0..t {
        let (tt, j) = (i / 16, i % 16);
        let row = &x[i * ldx..i * ldx + k];
        for (pp, pair) in row.chunks_exact(2).enumerate() {
            let (c, p) = (pp / 16, pp % 16);
            out[((tt * ks + c) * 16 + p) * 16 + j] = pair[0] as u32 | (pair[1] as u32) << 16;
        }
    }
}

/// `C[g][h][r][j] = Σ_k w[16g + r][k] · x[16h + j][k]` for 2 groups of 16 weight rows and 2
/// tiles of 16 tokens, k < 32·`ks`: `w` points at 32 bf16 rows `lda` bytes apart, `xt0`/`xt1`
/// at two token tiles of [`pack_tokens`] (`ks · 256` pairs each). `out[2g + h]` receives
/// `[r][j]` (weight row major). One `asm!` block holds the whole K loop, so the accumulator
/// tiles never live across compiler-visible code.
///
/// # Safety
/// A [`Tiles::configure`] guard lives on this thread; `ks >= 1`; `w` is readable for 32 rows of
/// `lda` bytes, each with 32·`ks` bf16; `xt0` and `xt1` for `ks · 256` u32 each.
pub unsafe fn nk_pair(
    w: *const u16,
    lda: usize,
    xt0: *const u32,
    xt1: *const u32,
    ks: usize,
    out: &mut [[f32; 256]; 4],
) {
    debug_assert!(ks >= 1 && live() == Config::Bf16, "nk_pair contract");
    let o = out.as_mut_ptr() as *mut f32;
    // SAFETY: the caller's contract (tiles configured for bf16; every tile load inside w, xt0,
    // xt1; ks >= 1 iterations); the stores write the 4 KiB of `out`.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {s64}*1]",
            "tileloadd tmm7, [{b1} + {s64}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {n}",
            "jnz 2b",
            "tilestored [{o} + {s64}*1], tmm0",
            "tilestored [{o} + {s64}*1 + 1024], tmm1",
            "tilestored [{o} + {s64}*1 + 2048], tmm2",
            "tilestored [{o} + {s64}*1 + 3072], tmm3",
            a0 = inout(reg) w => _,
            a1 = inout(reg) w.byte_add(16 * lda) => _,
            b0 = inout(reg) xt0 => _,
            b1 = inout(reg) xt1 => _,
            n = inout(reg) ks => _,
            lda = in(reg) lda,
            s64 = in(reg) ROW_BYTES,
            o = in(reg) o,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack)
        );
    }
}

/// `C[j][n] (+)= Σ_p a[j][p] · panel[p][n]` over bf16 pairs, for 16 token rows `j` and the 64
/// columns `n` of a `matmul_kn` panel, p over the 16-pair chunks listed in `chunks`. `a`: 16
/// rows of pairs, `lda` bytes apart; `panel`: pair rows of 64 u32; `c`: 16 rows of 64 f32
/// (256 bytes apart), loaded first when `accumulate`, else zeroed, and stored back. Chunk
/// `ch` covers pairs `16·(ch − base)..` of `a`/`panel`. One `asm!` block holds the loop.
///
/// # Safety
/// A [`Tiles::configure`] guard lives on this thread; `a` is readable for 16 rows of `lda` bytes
/// covering every listed chunk's 16 pairs, `panel` for every listed chunk's 16 pair rows of 64
/// u32; every chunk is ≥ `base` and below `base + 2^20`.
pub unsafe fn kn_panel(
    a: *const u32,
    lda: usize,
    panel: *const u32,
    chunks: &[u32],
    base: u32,
    c: &mut [[f32; 64]; 16],
    accumulate: bool,
) {
    debug_assert!(live() == Config::Bf16, "kn_panel contract");
    debug_assert!(chunks.iter().all(|&ch| ch >= base && ch - base < 1 << 20));
    let cp = c.as_mut_ptr() as *mut f32;
    // SAFETY: the caller's contract (tiles configured for bf16; every chunk's loads inside a
    // and panel); C is loaded from and stored to the 4 KiB of `c`.
    unsafe {
        asm!(
            "test {acc}, {acc}",
            "jz 3f",
            "tileloadd tmm0, [{c} + {s}*1]",
            "tileloadd tmm1, [{c} + {s}*1 + 64]",
            "tileloadd tmm2, [{c} + {s}*1 + 128]",
            "tileloadd tmm3, [{c} + {s}*1 + 192]",
            "jmp 4f",
            "3:",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "4:",
            "test {n}, {n}",
            "jz 6f",
            "5:",
            // t = (chunk − base)·64: byte offset of the chunk's 16 pairs in a row of `a`
            "mov {t:e}, dword ptr [{ch}]",
            "sub {t:e}, {base:e}",
            "shl {t}, 6",
            "lea {p}, [{a} + {t}]",
            "tileloadd tmm4, [{p} + {lda}*1]",
            // t·64: byte offset of the chunk's 16 pair rows (256 bytes each) in the panel
            "shl {t}, 6",
            "lea {p}, [{w} + {t}]",
            "tileloadd tmm5, [{p} + {s}*1]",
            "tileloadd tmm6, [{p} + {s}*1 + 64]",
            "tileloadd tmm7, [{p} + {s}*1 + 128]",
            "tdpbf16ps tmm0, tmm4, tmm5",
            "tileloadd tmm5, [{p} + {s}*1 + 192]",
            "tdpbf16ps tmm1, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm4, tmm5",
            "add {ch}, 4",
            "dec {n}",
            "jnz 5b",
            "6:",
            "tilestored [{c} + {s}*1], tmm0",
            "tilestored [{c} + {s}*1 + 64], tmm1",
            "tilestored [{c} + {s}*1 + 128], tmm2",
            "tilestored [{c} + {s}*1 + 192], tmm3",
            acc = in(reg) accumulate as usize,
            n = inout(reg) chunks.len() => _,
            ch = inout(reg) chunks.as_ptr() => _,
            base = in(reg) base as usize,
            t = out(reg) _,
            p = out(reg) _,
            a = in(reg) a,
            w = in(reg) panel,
            lda = in(reg) lda,
            c = in(reg) cp,
            s = in(reg) 256usize,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack)
        );
    }
}

/// 64-byte aligned scratch of one tile of i32 sums.
#[repr(C, align(64))]
struct SumTile([[i32; 16]; 16]);

/// `out[j][i] = Σ_b (float(S[b][j][i] − xs[j·nb + b]) · (dw_b[i] · dx[j·nb + b]))`, summed over
/// blocks b in order as one FMA chain per (j, i), for 16 tokens j and the 16 rows i of one
/// group of the interleaved Q8_0/Q4_0 layout, where `S[b][j][i] = Σ_k xi[j][32b + k] ·
/// code_b[i][k]` (exact i32 from `tdpbsud`: signed token bytes × unsigned codes). Block b's
/// codes are the tile at `codes + b·cstride` (8 rows of 64 bytes: bytes `4g..4g + 4` of row
/// i at `64g + 4i`, the layout of `BlockQ8_0x16::qs`), its 16 f16 row scales at
/// `d + b·dstride` bytes. `xi`: 16 rows of `ldx` token bytes (the Q8_0 codes of 16 tokens);
/// `dx`/`xs`: per (token, block) the Q8_0 scale as f32 and the code-offset correction
/// (`mult · Σ codes`), `nb` apart per token. These are the float operations of the 16-row
/// GEMV kernel in the same order, so each `out[j]` equals token j's GEMV bit for bit.
///
/// # Safety
/// A [`Tiles::configure_int8`] guard lives on this thread; every address above is readable
/// for `nb` blocks; the CPU has AVX-512 F/BW/VL and F16C. Each block's tile work is one
/// self-contained `asm!` block (sums stored before it ends).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn q16_tokens(
    codes: *const u8,
    cstride: usize,
    d: *const u8,
    dstride: usize,
    nb: usize,
    xi: *const i8,
    ldx: usize,
    dx: *const f32,
    xs: *const i32,
    out: &mut [[f32; 16]; 16],
) {
    use std::arch::x86_64::*;
    debug_assert!(live() == Config::Int8, "q16_tokens contract");
    let mut acc = [_mm512_setzero_ps(); 16];
    let mut sums = SumTile([[0; 16]; 16]);
    // SAFETY: the caller's contract (tiles configured; every load inside the named buffers).
    unsafe {
        for b in 0..nb {
            asm!(
                "tilezero tmm0",
                "tileloadd tmm1, [{a} + {lda}*1]",
                "tileloadd tmm2, [{w} + {s}*1]",
                "tdpbsud tmm0, tmm1, tmm2",
                "tilestored [{o} + {s}*1], tmm0",
                a = in(reg) xi.add(32 * b),
                lda = in(reg) ldx,
                w = in(reg) codes.add(b * cstride),
                o = in(reg) sums.0.as_mut_ptr(),
                s = in(reg) 64usize,
                out("tmm0") _, out("tmm1") _, out("tmm2") _,
                options(nostack)
            );
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(d.add(b * dstride) as *const __m256i));
            for (j, a) in acc.iter_mut().enumerate() {
                let si = _mm512_sub_epi32(
                    _mm512_load_si512(sums.0[j].as_ptr() as *const _),
                    _mm512_set1_epi32(*xs.add(j * nb + b)),
                );
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*dx.add(j * nb + b)));
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), dd, *a);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            _mm512_storeu_ps(o.as_mut_ptr(), a);
        }
    }
}
