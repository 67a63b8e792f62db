//! Launchers for `kernels/rope.cu`: rotary position embedding applied in place to q and k in one
//! launch (forward), and its transpose applied in place to their gradients (backward).

use std::ffi::c_void;

use super::{all_aligned16, check_ptrs, elementwise_grid, DType};
use crate::cuda::{self, LaunchConfig, RawStream};
use crate::{Error, Result};

const THREADS: u32 = 256;
/// Heads each thread applies one cos/sin chunk to (`HP` in `kernels/rope.cu`).
const HEADS_PER_THREAD: usize = 2;

/// One rotary-embedding launch: q `[batch, q_heads, seq, head_dim]`, k `[batch, k_heads, seq,
/// head_dim]`, cos/sin `[batch, seq, head_dim]`. Pointers are device addresses; strides are in
/// elements (`[batch, head, seq]` for q/k, `[batch, seq]` for cos/sin; a batch stride of 0
/// broadcasts one table); the last dimension of every tensor is contiguous.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RopeArgs {
    pub dtype: DType,
    pub q: usize,
    pub k: usize,
    pub cos: usize,
    pub sin: usize,
    pub batch: usize,
    pub seq: usize,
    pub q_heads: usize,
    pub k_heads: usize,
    pub head_dim: usize,
    pub q_strides: [i64; 3],
    pub k_strides: [i64; 3],
    pub cos_strides: [i64; 2],
    pub sin_strides: [i64; 2],
}

/// Kernel parameter block; must match `RopeParams` in `kernels/rope.cu` field for field.
#[repr(C)]
struct RopeParams {
    q: usize,
    k: usize,
    cos: usize,
    sin: usize,
    batch: i64,
    seq: i64,
    q_heads: i64,
    k_heads: i64,
    half: i64,
    q_s: [i64; 3],
    k_s: [i64; 3],
    c_s: [i64; 2],
    s_s: [i64; 2],
    backward: i32,
    /// v2 kernels: 1 puts head groups on grid x (fastest); v1 ignores it.
    heads_fast: i32,
}

/// What a launch looks like once the arguments are checked.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// 16-byte vector access is legal (aligned pointers, half and strides multiples of it).
    vec: bool,
    /// Threads needed along x: `batch * seq * chunks` with `chunks` per half row.
    items: usize,
    /// Head groups along y.
    groups: u32,
}

impl RopeArgs {
    fn plan(&self) -> Result<Plan> {
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return Err(Error::invalid(format!(
                "rope: head_dim must be even and positive, got {}",
                self.head_dim
            )));
        }
        let strides = self
            .q_strides
            .iter()
            .chain(&self.k_strides)
            .chain(&self.cos_strides)
            .chain(&self.sin_strides);
        if strides.clone().any(|&s| s < 0) {
            return Err(Error::invalid("rope: negative strides are not supported"));
        }
        let half = self.head_dim / 2;
        let n = 16 / self.dtype.size();
        let vec = half % n == 0
            && all_aligned16(&[self.q, self.k, self.cos, self.sin])
            && strides.clone().all(|&s| s % n as i64 == 0);
        let chunks = if vec { half / n } else { half };
        let items = self
            .batch
            .checked_mul(self.seq)
            .and_then(|v| v.checked_mul(chunks))
            .ok_or_else(|| Error::invalid("rope: batch * seq * head_dim overflows"))?;
        let groups = (self.q_heads + self.k_heads).div_ceil(HEADS_PER_THREAD);
        if groups > 65_535 {
            return Err(Error::invalid(format!(
                "rope: {} heads exceed the launch limit of {}",
                self.q_heads + self.k_heads,
                65_535 * HEADS_PER_THREAD
            )));
        }
        Ok(Plan {
            vec,
            items,
            groups: groups as u32,
        })
    }
}

fn kernel_name(vec: bool, dtype: DType) -> &'static str {
    match (vec, dtype) {
        (true, DType::F32) => "rope_vec_f32",
        (true, DType::F16) => "rope_vec_f16",
        (true, DType::BF16) => "rope_vec_bf16",
        (false, DType::F32) => "rope_scalar_f32",
        (false, DType::F16) => "rope_scalar_f16",
        (false, DType::BF16) => "rope_scalar_bf16",
    }
}

/// Which kernel family [`apply`] launches, from [`Variant::ENV`]. It is read at every launch (not
/// cached), so a benchmark or test can switch between calls in one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `v1` (the default): flat grid-stride index split by two 64-bit div/mods per thread, 2 heads
    /// per thread.
    V1,
    /// `v2`: the same work per thread (2 heads) on a 3-D grid with a 2-D block, straight-line
    /// code without division and a forward/backward template (about 400 instead of 660 SASS
    /// instructions per bf16 thread, 63 instead of 79 registers: 4 blocks of 256 per SM).
    V2,
    /// `h4`: `v2` with 4 heads per thread (128 bytes of q/k loads in flight per thread, cos/sin
    /// loaded and widened once per 4 heads; 104 registers, 2 blocks per SM).
    H4,
    /// `h4x`: `h4` with head groups on grid x, so the blocks resident at one time cover whole
    /// `[seq, heads, head_dim]` rows of the projection layout (contiguous DRAM spans) instead of
    /// one head group at every position.
    H4HeadsFast,
}

impl Variant {
    /// The environment variable that selects the variant.
    pub const ENV: &'static str = "RSLORA_FAST_ROPE";

    /// Parse a value of [`Variant::ENV`] (empty means the default).
    pub fn parse(value: &str) -> Result<Variant> {
        match value.trim() {
            "" | "v1" => Ok(Variant::V1),
            "v2" => Ok(Variant::V2),
            "h4" => Ok(Variant::H4),
            "h4x" => Ok(Variant::H4HeadsFast),
            other => Err(Error::invalid(format!(
                "{}={other:?}: expected v1, v2, h4 or h4x",
                Variant::ENV
            ))),
        }
    }

    /// The variant the environment asks for now ([`Variant::V1`] when unset).
    pub fn from_env() -> Result<Variant> {
        match std::env::var(Variant::ENV) {
            Ok(v) => Variant::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(Variant::V1),
            Err(std::env::VarError::NotUnicode(_)) => Err(Error::invalid(format!(
                "{} is not valid unicode",
                Variant::ENV
            ))),
        }
    }

    /// The name [`Variant::parse`] accepts for this variant.
    pub fn name(self) -> &'static str {
        match self {
            Variant::V1 => "v1",
            Variant::V2 => "v2",
            Variant::H4 => "h4",
            Variant::H4HeadsFast => "h4x",
        }
    }

    /// Heads per thread of the variant's vector entry (the scalar entry always takes 2).
    fn heads_per_thread(self, vec: bool) -> usize {
        match self {
            Variant::H4 | Variant::H4HeadsFast if vec => 4,
            _ => HEADS_PER_THREAD,
        }
    }
}

fn v2_kernel_name(variant: Variant, vec: bool, dtype: DType) -> &'static str {
    let h4 = variant.heads_per_thread(vec) == 4;
    match (vec, h4, dtype) {
        (true, true, DType::F32) => "rope_h4_vec_f32",
        (true, true, DType::F16) => "rope_h4_vec_f16",
        (true, true, DType::BF16) => "rope_h4_vec_bf16",
        (true, false, DType::F32) => "rope_v2_vec_f32",
        (true, false, DType::F16) => "rope_v2_vec_f16",
        (true, false, DType::BF16) => "rope_v2_vec_bf16",
        (false, _, DType::F32) => "rope_v2_scalar_f32",
        (false, _, DType::F16) => "rope_v2_scalar_f16",
        (false, _, DType::BF16) => "rope_v2_scalar_bf16",
    }
}

/// Launch shape of a v2-family kernel: block `(chunks, rows)`, grid `(x, y, batch)`.
#[derive(Debug, PartialEq, Eq)]
struct V2Shape {
    block: (u32, u32),
    grid: (u32, u32, u32),
}

/// Grid-dimension limits of CUDA: x up to 2^31 - 1, y and z up to 65,535.
const MAX_GRID_X: usize = i32::MAX as usize;
const MAX_GRID_YZ: usize = 65_535;

/// The v2 launch shape, or `None` when one pass of the grid cannot cover the tensor (v2 kernels
/// do not loop; such shapes run the v1 kernel): more than [`THREADS`] chunks per half row (one
/// thread each; the kernels are built for blocks of at most 256), or a grid dimension over its
/// limit.
fn v2_shape(
    chunks: usize,
    seq: usize,
    batch: usize,
    heads: usize,
    per_thread: usize,
    heads_fast: bool,
) -> Option<V2Shape> {
    if chunks == 0 || chunks > THREADS as usize {
        return None;
    }
    let rows = THREADS as usize / chunks;
    let tiles = seq.div_ceil(rows);
    let groups = heads.div_ceil(per_thread);
    let (x, y) = if heads_fast {
        (groups, tiles)
    } else {
        (tiles, groups)
    };
    if x > MAX_GRID_X || y > MAX_GRID_YZ || batch > MAX_GRID_YZ {
        return None;
    }
    Some(V2Shape {
        block: (chunks as u32, rows as u32),
        grid: (x as u32, y as u32, batch as u32),
    })
}

/// Rotate q and k in place: `x * cos + rotate_half(x) * sin` (forward, `backward == false`), or
/// apply the transpose of that map in place to their gradients (`backward == true`). The kernel
/// family is [`Variant::from_env`]'s (read now; a bad value is an `InvalidArgument` error); shapes
/// that one pass of a v2 grid cannot cover run the v1 kernel.
///
/// # Safety
/// Every pointer in `args` must be a device address on `device` of a tensor with the shape and
/// strides `args` describes, live until the launch has run on `stream`; q and k must not
/// overlap each other, cos or sin, and no two (batch, head, seq) rows of q (or of k) may overlap.
pub unsafe fn apply(args: &RopeArgs, backward: bool, device: i32, stream: RawStream) -> Result<()> {
    let plan = args.plan()?;
    if plan.items == 0 || plan.groups == 0 {
        return Ok(());
    }
    check_ptrs("rope", &[args.q, args.k, args.cos, args.sin])?;
    let variant = Variant::from_env()?;
    let heads_fast = variant == Variant::H4HeadsFast;
    let v2 = match variant {
        Variant::V1 => None,
        _ => v2_shape(
            plan.items / (args.batch * args.seq),
            args.seq,
            args.batch,
            args.q_heads + args.k_heads,
            variant.heads_per_thread(plan.vec),
            heads_fast,
        ),
    };
    let (name, cfg) = match &v2 {
        Some(shape) => (
            v2_kernel_name(variant, plan.vec, args.dtype),
            LaunchConfig {
                grid: shape.grid,
                block: (shape.block.0, shape.block.1, 1),
                shared_mem_bytes: 0,
            },
        ),
        None => {
            let name = kernel_name(plan.vec, args.dtype);
            let blocks = elementwise_grid(plan.items, 1, THREADS, || {
                cuda::resident_blocks(device, "rope", name, THREADS)
            })?;
            let cfg = LaunchConfig {
                grid: (blocks, plan.groups, 1),
                block: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            (name, cfg)
        }
    };
    let mut params = RopeParams {
        q: args.q,
        k: args.k,
        cos: args.cos,
        sin: args.sin,
        batch: args.batch as i64,
        seq: args.seq as i64,
        q_heads: args.q_heads as i64,
        k_heads: args.k_heads as i64,
        half: (args.head_dim / 2) as i64,
        q_s: args.q_strides,
        k_s: args.k_strides,
        c_s: args.cos_strides,
        s_s: args.sin_strides,
        backward: backward as i32,
        heads_fast: (v2.is_some() && heads_fast) as i32,
    };
    let mut kargs = [&mut params as *mut RopeParams as *mut c_void];
    // SAFETY: the one argument is a `RopeParams`, laid out (repr(C)) exactly as the kernel's
    // by-value struct parameter; the caller guarantees the pointers and strides it carries.
    unsafe { cuda::launch(device, stream, "rope", name, cfg, &mut kargs) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dtype: DType, head_dim: usize) -> RopeArgs {
        let d = head_dim as i64;
        RopeArgs {
            dtype,
            q: 4096,
            k: 8192,
            cos: 16384,
            sin: 32768,
            batch: 2,
            seq: 5,
            q_heads: 3,
            k_heads: 2,
            head_dim,
            q_strides: [3 * 5 * d, 5 * d, d],
            k_strides: [2 * 5 * d, 5 * d, d],
            cos_strides: [5 * d, d],
            sin_strides: [0, d],
        }
    }

    #[test]
    fn params_match_the_kernel_struct_size() {
        // 4 pointers + 5 sizes + 10 strides + 2 ints = 19 * 8 + 8 bytes (no padding added)
        assert_eq!(std::mem::size_of::<RopeParams>(), 160);
    }

    #[test]
    fn vector_path_when_aligned() {
        let p = args(DType::BF16, 128).plan().unwrap();
        assert_eq!(
            p,
            Plan {
                vec: true,
                items: 2 * 5 * 8,
                groups: 3
            }
        );
    }

    #[test]
    fn scalar_path_for_odd_half_unaligned_pointer_or_stride() {
        let p = args(DType::F16, 12).plan().unwrap(); // half 6 is not a multiple of 8
        assert_eq!((p.vec, p.items), (false, 2 * 5 * 6));
        let mut a = args(DType::F32, 64);
        a.q += 4;
        assert!(!a.plan().unwrap().vec);
        let mut a = args(DType::F32, 64);
        a.k_strides[2] = 66;
        assert!(!a.plan().unwrap().vec);
        assert!(args(DType::F32, 64).plan().unwrap().vec);
    }

    #[test]
    fn rejects_odd_head_dim_and_negative_strides() {
        assert!(matches!(
            args(DType::F32, 7).plan(),
            Err(Error::InvalidArgument(_))
        ));
        let mut a = args(DType::F32, 8);
        a.q_strides[1] = -8;
        assert!(matches!(a.plan(), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn variant_names_round_trip_and_bad_values_name_the_accepted_ones() {
        for v in [Variant::V1, Variant::V2, Variant::H4, Variant::H4HeadsFast] {
            assert_eq!(Variant::parse(v.name()).unwrap(), v);
        }
        assert_eq!(Variant::parse("").unwrap(), Variant::V1);
        match Variant::parse("v3") {
            Err(Error::InvalidArgument(m)) => {
                assert!(
                    m.contains("RSLORA_FAST_ROPE") && m.contains("v1, v2, h4 or h4x"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v2_shape_covers_every_position_head_and_batch() {
        // Llama-8B bf16: 8 chunks per half row -> 8 x 32 blocks; 4096 positions in 128 tiles
        let s = v2_shape(8, 4096, 2, 40, 2, false).unwrap();
        assert_eq!(s.block, (8, 32));
        assert_eq!(s.grid, (128, 20, 2));
        let s = v2_shape(8, 4097, 2, 41, 4, true).unwrap();
        assert_eq!(s.grid, (11, 129, 2)); // heads on x; the partial tile and group are included
        let s = v2_shape(3, 10, 1, 1, 2, false).unwrap(); // 85 rows of 3 chunks
        assert_eq!((s.block, s.grid), ((3, 85), (1, 1, 1)));
        let s = v2_shape(256, 5, 1, 3, 2, false).unwrap();
        assert_eq!((s.block, s.grid), ((256, 1), (5, 2, 1)));
    }

    #[test]
    fn v2_shape_falls_back_beyond_one_pass() {
        assert!(v2_shape(257, 5, 1, 3, 2, false).is_none()); // block would exceed 256 threads
        assert!(v2_shape(8, 5, 65_536, 3, 2, false).is_none()); // batch over grid z
        assert!(v2_shape(8, 32 * 65_536, 1, 3, 2, true).is_none()); // tiles over grid y
        assert!(v2_shape(8, 32 * 65_536, 1, 3, 2, false).is_some()); // fine on grid x
    }

    #[test]
    fn empty_launch_is_a_no_op() {
        let mut a = args(DType::BF16, 64);
        a.seq = 0;
        // SAFETY: nothing is launched for an empty tensor (checked before any pointer use).
        unsafe { apply(&a, false, 0, RawStream(0)).unwrap() };
    }
}
