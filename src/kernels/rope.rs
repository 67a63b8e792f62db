//! Launchers for `kernels/rope.cu`: rotary position embedding applied in place to q and k in one
//! launch (forward), and its transpose applied in place to their gradients (backward).

use super::{all_aligned16, by_dtype, check_ptrs, elementwise_grid, kernel_args, DType};
use crate::args::check_extent;
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
}

/// What a launch looks like once the arguments are checked.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// 16-byte vector access is legal (aligned pointers, half and strides multiples of it).
    vec: bool,
    /// `batch * seq * chunks` with `chunks` per half row (the fallback's threads along x).
    items: usize,
    /// Head groups along grid y (both kernels).
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
        self.check_extents()?;
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

impl RopeArgs {
    /// Every tensor's strided extent must be addressable: its last element's offset computed
    /// without overflow, and `[ptr, ptr + extent)` non-null, element-aligned and not wrapping.
    fn check_extents(&self) -> Result<()> {
        let elem = self.dtype.size();
        let (b, s) = (self.batch, self.seq);
        let [q0, q1, q2] = self.q_strides;
        let [k0, k1, k2] = self.k_strides;
        let [c0, c1] = self.cos_strides;
        let [s0, s1] = self.sin_strides;
        let tensors: [(&str, usize, &[Dim]); 4] = [
            ("rope q", self.q, &[(b, q0), (self.q_heads, q1), (s, q2)]),
            ("rope k", self.k, &[(b, k0), (self.k_heads, k1), (s, k2)]),
            ("rope cos", self.cos, &[(b, c0), (s, c1)]),
            ("rope sin", self.sin, &[(b, s0), (s, s1)]),
        ];
        for (name, ptr, dims) in tensors {
            check_extent(
                name,
                ptr,
                strided_span(name, dims, self.head_dim)?,
                elem,
                elem,
            )?;
        }
        Ok(())
    }
}

/// One dimension of a strided tensor: `(size, stride in elements)`.
type Dim = (usize, i64);

/// Elements from the first to one past the last element of a tensor with the given
/// `(size, stride)` dimensions and a contiguous last dimension of `inner` elements (0 when empty).
fn strided_span(what: &str, dims: &[Dim], inner: usize) -> Result<usize> {
    if inner == 0 || dims.iter().any(|&(n, _)| n == 0) {
        return Ok(0);
    }
    let overflow = || Error::invalid(format!("{what}: the strided extent overflows"));
    let mut last = 0usize;
    for &(n, stride) in dims {
        let stride = usize::try_from(stride).map_err(|_| overflow())?;
        let step = (n - 1).checked_mul(stride).ok_or_else(overflow)?;
        last = last.checked_add(step).ok_or_else(overflow)?;
    }
    last.checked_add(inner).ok_or_else(overflow)
}

/// The fast kernel (one pass of a 3-D grid, see `kernels/rope.cu`).
fn kernel_name(vec: bool, dtype: DType) -> &'static str {
    if vec {
        by_dtype!("rope_vec", dtype)
    } else {
        by_dtype!("rope_scalar", dtype)
    }
}

/// The grid-stride fallback for shapes the fast grid cannot cover.
fn loop_kernel_name(vec: bool, dtype: DType) -> &'static str {
    if vec {
        by_dtype!("rope_loop_vec", dtype)
    } else {
        by_dtype!("rope_loop_scalar", dtype)
    }
}

/// Launch shape of the fast kernel: block `(chunks, rows)`, grid `(seq tiles, head groups, batch)`.
#[derive(Debug, PartialEq, Eq)]
struct FastShape {
    block: (u32, u32),
    grid: (u32, u32, u32),
}

/// Grid-dimension limits of CUDA: x up to 2^31 - 1, y and z up to 65,535.
const MAX_GRID_X: usize = i32::MAX as usize;
const MAX_GRID_YZ: usize = 65_535;

/// The fast kernel's launch shape, or `None` when one pass of its grid cannot cover the tensor
/// (it does not loop; such shapes run the fallback): more than [`THREADS`] chunks per half row
/// (one thread each; the kernels are built for blocks of at most 256), or a grid dimension over
/// its limit.
fn fast_shape(chunks: usize, seq: usize, batch: usize, heads: usize) -> Option<FastShape> {
    if chunks == 0 || chunks > THREADS as usize {
        return None;
    }
    let rows = THREADS as usize / chunks;
    let tiles = seq.div_ceil(rows);
    let groups = heads.div_ceil(HEADS_PER_THREAD);
    if tiles > MAX_GRID_X || groups > MAX_GRID_YZ || batch > MAX_GRID_YZ {
        return None;
    }
    Some(FastShape {
        block: (chunks as u32, rows as u32),
        grid: (tiles as u32, groups as u32, batch as u32),
    })
}

/// Rotate q and k in place: `x * cos + rotate_half(x) * sin` (forward, `backward == false`), or
/// apply the transpose of that map in place to their gradients (`backward == true`). Shapes that
/// one pass of the fast kernel's grid cannot cover run the grid-stride fallback (same bits).
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
    let fast = fast_shape(
        plan.items / (args.batch * args.seq),
        args.seq,
        args.batch,
        args.q_heads + args.k_heads,
    );
    let (name, cfg) = match fast {
        Some(shape) => (
            kernel_name(plan.vec, args.dtype),
            LaunchConfig {
                grid: shape.grid,
                block: (shape.block.0, shape.block.1, 1),
                shared_mem_bytes: 0,
            },
        ),
        None => {
            let name = loop_kernel_name(plan.vec, args.dtype);
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
    };
    let mut kargs = kernel_args![params];
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
        // 4 pointers + 5 sizes + 10 strides = 19 * 8 bytes, one i32 and 4 bytes of tail padding
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
    fn rejects_strides_whose_extent_overflows_or_wraps_and_misaligned_pointers() {
        let mut a = args(DType::BF16, 64);
        a.q_strides[0] = i64::MAX / 2; // (batch - 1) * stride + ... fits usize, wraps the address space
        assert!(matches!(a.plan(), Err(Error::InvalidArgument(m)) if m.contains("rope q")));
        let mut a = args(DType::BF16, 64);
        a.cos_strides[1] = i64::MAX; // (seq - 1) * stride overflows
        assert!(matches!(a.plan(), Err(Error::InvalidArgument(m)) if m.contains("rope cos")));
        let mut a = args(DType::F32, 64);
        a.sin += 2; // not a whole f32
        assert!(matches!(a.plan(), Err(Error::InvalidArgument(m)) if m.contains("aligned")));
        let mut a = args(DType::F32, 64);
        a.k_heads = 0; // an empty k is never dereferenced
        a.k = 3;
        assert!(a.plan().is_ok());
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
    fn fast_shape_covers_every_position_head_and_batch() {
        // Llama-8B bf16: 8 chunks per half row -> 8 x 32 blocks; 4096 positions in 128 tiles
        let s = fast_shape(8, 4096, 2, 40).unwrap();
        assert_eq!(s.block, (8, 32));
        assert_eq!(s.grid, (128, 20, 2));
        let s = fast_shape(8, 4097, 2, 41).unwrap();
        assert_eq!(s.grid, (129, 21, 2)); // the partial tile and head group are included
        let s = fast_shape(3, 10, 1, 1).unwrap(); // 85 rows of 3 chunks
        assert_eq!((s.block, s.grid), ((3, 85), (1, 1, 1)));
        let s = fast_shape(256, 5, 1, 3).unwrap();
        assert_eq!((s.block, s.grid), ((256, 1), (5, 2, 1)));
    }

    #[test]
    fn fast_shape_falls_back_beyond_one_pass() {
        assert!(fast_shape(257, 5, 1, 3).is_none()); // block would exceed 256 threads
        assert!(fast_shape(8, 5, 65_536, 3).is_none()); // batch over grid z
        assert!(fast_shape(8, 5, 65_535, 3).is_some());
        assert!(fast_shape(8, 32 * 65_536, 1, 3).is_some()); // tiles on grid x: no y/z limit
    }

    #[test]
    fn empty_launch_is_a_no_op() {
        let mut a = args(DType::BF16, 64);
        a.seq = 0;
        // SAFETY: nothing is launched for an empty tensor (checked before any pointer use).
        unsafe { apply(&a, false, 0, RawStream(0)).unwrap() };
    }
}
