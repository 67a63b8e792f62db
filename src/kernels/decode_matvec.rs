//! Launcher for `kernels/decode_matvec.cu`: the projections of one decode step that share an
//! input (q/k/v, gate/up) from 4-bit weights, with bias and the LoRA up-projection fused, in one
//! launch per 8 batch rows. Every size and pointer is checked here before any pointer arithmetic.

use super::nf4::ScalesPtr;
use super::{all_aligned16, kernel_args, DType};
use crate::args::{byte_size, check_device};
use crate::cuda::{self, LaunchConfig, RawStream};
use crate::quant::{check_blocksize, num_blocks, packed_len, QuantType, NESTED_BLOCKSIZE};
use crate::{Error, Result};

/// Layers one launch serves (`kMaxMembers` in the kernel).
pub const MAX_MEMBERS: usize = 4;
/// Batch rows one launch serves (`kMaxBatch`: the mma's n); larger batches take several.
pub const MAX_BATCH: usize = 8;
const THREADS: u32 = 256;
/// Output rows of one tile of the fast kernel (`kTileRows`: the mma's m).
const TILE_ROWS: usize = 16;
const WARPS: usize = THREADS as usize / 32;
/// Warps per tile the fast kernel is built for (`dm_split<s>_*`), most first.
const SPLITS: [usize; 4] = [8, 4, 2, 1];

/// One layer of a group: its 4-bit weight `[n, k]`, optional bias `[n]` and optional LoRA
/// up-projection `lora_b` `[n, rank]` reading columns `xa_col..xa_col + rank` of `xa`.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    pub n: usize,
    pub packed: usize,
    pub scales: ScalesPtr,
    pub blocksize: usize,
    pub quant_type: QuantType,
    pub bias: usize,
    pub lora_b: usize,
    pub rank: usize,
    pub scaling: f32,
    pub xa_col: usize,
}

/// One call: `x` `[batch, k]`; the outputs are consecutive in `out`, member i's `[batch, n_i]`
/// starting after the previous members' `batch * n`; `xa` `[batch, xa_ld]` (0 when no member
/// has LoRA). Pointers are device addresses on one device.
#[derive(Clone, Debug)]
pub struct Args {
    pub dtype: DType,
    pub members: Vec<Member>,
    pub x: usize,
    pub out: usize,
    pub xa: usize,
    pub xa_ld: usize,
    pub batch: usize,
    pub k: usize,
}

/// Must match `Member` in `kernels/decode_matvec.cu` field for field.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MemberParams {
    packed: usize,
    absmax: usize,
    absmax_q: usize,
    nested: usize,
    ncode: usize,
    bias: usize,
    lora_b: usize,
    y: usize,
    n: i64,
    start: i64,
    offset: f32,
    scaling: f32,
    rank: i32,
    xa_col: i32,
    bs_log2: i32,
    quant_type: i32,
}

/// Must match `Params` in `kernels/decode_matvec.cu` field for field.
#[repr(C)]
struct Params {
    m: [MemberParams; MAX_MEMBERS],
    x: usize,
    xa: usize,
    k: i64,
    batch: i32,
    xa_ld: i32,
    members: i32,
    pad: i32,
}

/// Which kernel one launch runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// `dm_split<s>_*`: tensor cores, a 16-row tile per `s` warps that split its K.
    Split(usize),
    /// `dm_any_*`: a warp per row, any K and alignment, groups mixing NF4 and FP4.
    Any,
}

impl Path {
    /// Output rows per grid unit (the members' `start` counts these units).
    fn unit_rows(self) -> usize {
        match self {
            Path::Split(_) => TILE_ROWS,
            Path::Any => 1,
        }
    }
}

/// `bf16` or `f16` for `dtype`: the decode kernels are built for the 16-bit types only (`what`
/// names the call in the error for float32).
fn by_half<T>(what: &str, dtype: DType, bf16: T, f16: T) -> Result<T> {
    match dtype {
        DType::BF16 => Ok(bf16),
        DType::F16 => Ok(f16),
        DType::F32 => Err(Error::invalid(format!(
            "{what}: dtype float32 is not supported; expected float16 or bfloat16"
        ))),
    }
}

fn kernel(dtype: DType, path: Path) -> Result<&'static str> {
    let names = by_half(
        "decode_matvec_4bit",
        dtype,
        [
            "dm_split8_bf16",
            "dm_split4_bf16",
            "dm_split2_bf16",
            "dm_split1_bf16",
            "dm_any_bf16",
        ],
        [
            "dm_split8_f16",
            "dm_split4_f16",
            "dm_split2_f16",
            "dm_split1_f16",
            "dm_any_f16",
        ],
    )?;
    Ok(match path {
        Path::Split(s) => match SPLITS.iter().position(|&v| v == s) {
            Some(i) => names[i],
            None => {
                return Err(Error::invalid(format!(
                    "decode_matvec_4bit: no kernel splits a tile over {s} warps"
                )))
            }
        },
        Path::Any => names[4],
    })
}

fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::invalid(format!("decode_matvec_4bit: {what} {v} too large")))
}

impl Member {
    /// The member's output width and LoRA term.
    fn lora(&self) -> LoraB {
        LoraB {
            n: self.n,
            lora_b: self.lora_b,
            rank: self.rank,
            scaling: self.scaling,
            xa_col: self.xa_col,
        }
    }
}

impl Args {
    /// Check counts, sizes and pointers; returns the total output elements per batch row.
    pub fn check(&self) -> Result<usize> {
        let what = "decode_matvec_4bit";
        kernel(self.dtype, Path::Any)?;
        check_count(what, self.members.len())?;
        if self.k == 0 || self.k > i32::MAX as usize {
            return Err(Error::invalid(format!(
                "{what}: k = {} out of range",
                self.k
            )));
        }
        let es = self.dtype.size();
        check_device(
            "decode_matvec_4bit x",
            &[self.x],
            mul(self.batch, self.k)?,
            es,
        )?;
        let mut width = 0usize;
        for (i, m) in self.members.iter().enumerate() {
            check_member(m, i, self.k, self.xa_ld, es)?;
            width = add_width(what, width, m.n)?;
        }
        to_i32("xa_ld", self.xa_ld)?;
        check_device(
            "decode_matvec_4bit out",
            &[self.out],
            mul(self.batch, width)?,
            es,
        )?;
        if self.members.iter().any(|m| m.rank > 0) {
            check_device(
                "decode_matvec_4bit xa",
                &[self.xa],
                mul(self.batch, self.xa_ld)?,
                es,
            )?;
        }
        Ok(width)
    }
}

/// Check that a group has 1 to [`MAX_MEMBERS`] members (`what` names the call in errors).
fn check_count(what: &str, members: usize) -> Result<()> {
    if members == 0 || members > MAX_MEMBERS {
        return Err(Error::invalid(format!(
            "{what}: {members} members; expected 1 to {MAX_MEMBERS}"
        )));
    }
    Ok(())
}

/// The output width so far plus a member's `n`, checked.
fn add_width(what: &str, width: usize, n: usize) -> Result<usize> {
    width
        .checked_add(n)
        .ok_or_else(|| Error::invalid(format!("{what}: output widths overflow")))
}

fn mul(a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::invalid(format!("decode_matvec_4bit: {a} x {b} overflows")))
}

fn check_member(m: &Member, i: usize, k: usize, xa_ld: usize, es: usize) -> Result<()> {
    let w = |s: &str| format!("decode_matvec_4bit member {i} {s}");
    check_blocksize(m.blocksize)?;
    if m.n == 0 {
        return Err(Error::invalid(w("has 0 output rows")));
    }
    let elems = mul(m.n, k)?;
    byte_size(&w("weight"), elems, 1)?;
    check_device(&w("packed"), &[m.packed], packed_len(elems), 1)?;
    let nb = num_blocks(elems, m.blocksize);
    match m.scales {
        ScalesPtr::Plain(a) => check_device(&w("absmax"), &[a], nb, 4)?,
        ScalesPtr::Nested {
            codes,
            nested_absmax,
            nested_code,
            ..
        } => {
            check_device(&w("absmax codes"), &[codes], nb, 1)?;
            let nn = nb.div_ceil(NESTED_BLOCKSIZE);
            check_device(&w("nested_absmax"), &[nested_absmax], nn, 4)?;
            check_device(&w("nested_code"), &[nested_code], 256, 4)?;
        }
    }
    if m.bias != 0 {
        check_device(&w("bias"), &[m.bias], m.n, es)?;
    }
    m.lora().check(w, xa_ld, es)?;
    if m.rank > 0 {
        to_i32("rank", m.rank)?;
    }
    Ok(())
}

/// Whether the fast kernel applies: whole 32-element chunks per row, 16-byte aligned rows of x
/// and of every packed weight, and one quantization type (its code table is built per block).
fn fast_path(a: &Args) -> bool {
    let mut ptrs = vec![a.x];
    ptrs.extend(a.members.iter().map(|m| m.packed));
    let one_type = a
        .members
        .iter()
        .all(|m| m.quant_type == a.members[0].quant_type);
    a.k % 32 == 0 && all_aligned16(&ptrs) && one_type
}

/// 16-row tiles of the group.
fn tiles(a: &Args) -> usize {
    a.members.iter().map(|m| m.n.div_ceil(TILE_ROWS)).sum()
}

/// Warps per tile: the most (of 8, 4, 2, 1) for which every tile's warps are resident at once,
/// so a small group (q/k/v: 384 tiles of an 8B model) still keeps every SM loading.
fn split_warps(tiles: usize, resident_warps: usize) -> usize {
    SPLITS
        .into_iter()
        .find(|&s| tiles.saturating_mul(s) <= resident_warps)
        .unwrap_or(1)
}

/// The kernel for a group; `resident_warps` gives the fast kernel's warps resident at once
/// (asked only when the fast kernel applies).
fn path_for(a: &Args, resident_warps: impl FnOnce() -> Result<usize>) -> Result<Path> {
    if !fast_path(a) {
        return Ok(Path::Any);
    }
    Ok(Path::Split(split_warps(tiles(a), resident_warps()?)))
}

fn member_params(m: &Member, start: usize, y: usize) -> Result<MemberParams> {
    let (absmax, absmax_q, nested, ncode, offset) = match m.scales {
        ScalesPtr::Plain(p) => (p, 0, 0, 0, 0.0),
        ScalesPtr::Nested {
            codes,
            nested_absmax,
            nested_code,
            offset,
        } => (0, codes, nested_absmax, nested_code, offset),
    };
    Ok(MemberParams {
        packed: m.packed,
        absmax,
        absmax_q,
        nested,
        ncode,
        bias: m.bias,
        offset,
        bs_log2: m.blocksize.trailing_zeros() as i32,
        quant_type: match m.quant_type {
            QuantType::Nf4 => 0,
            QuantType::Fp4 => 1,
        },
        ..m.lora().params(start, y)?
    })
}

/// The address of each member's first output row for batch row `b0` in `out`, where member i's
/// `[batch, n_i]` (`n_i` from `widths`, elements of `es` bytes) follows the previous members'.
fn output_rows(
    out: usize,
    widths: impl Iterator<Item = usize>,
    batch: usize,
    b0: usize,
    es: usize,
) -> Vec<usize> {
    let mut before = 0usize; // elements of the previous members' outputs
    widths
        .map(|n| {
            let y = out + (before + b0 * n) * es;
            before += batch * n;
            y
        })
        .collect()
}

/// Launch `name` of `decode_matvec.cu` on `blocks` blocks of `threads` with `params`, the one
/// by-value struct argument every decode kernel takes.
///
/// # Safety
/// `P` must be laid out (repr(C)) exactly as the kernel's parameter struct, and every pointer it
/// carries valid for the kernel's accesses on `device` until the launch has run on `stream`.
unsafe fn launch_params<P>(
    device: i32,
    stream: RawStream,
    name: &'static str,
    (blocks, threads): (u32, u32),
    params: &mut P,
) -> Result<()> {
    let mut kargs = kernel_args![*params];
    let cfg = LaunchConfig::linear(blocks, threads);
    // SAFETY: the caller guarantees the struct's layout and the pointers it carries.
    unsafe { cuda::launch(device, stream, "decode_matvec", name, cfg, &mut kargs) }
}

/// Each member's first grid unit (tile or row), and the blocks: 8 / s tiles per block (fast
/// kernel), 8 rows per block (generic).
fn grid(a: &Args, path: Path) -> Result<(Vec<usize>, u32)> {
    let mut starts = Vec::with_capacity(a.members.len());
    let mut units = 0usize;
    for m in &a.members {
        starts.push(units);
        units += m.n.div_ceil(path.unit_rows());
    }
    let per_block = match path {
        Path::Split(s) => WARPS / s,
        Path::Any => WARPS,
    };
    let blocks = u32::try_from(units.div_ceil(per_block))
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| Error::invalid("decode_matvec_4bit: too many output rows"))?;
    Ok((starts, blocks))
}

/// The fast kernel's warps resident at once on `device` (the split variants share one shape).
fn resident_warps(dtype: DType, device: i32) -> Result<usize> {
    let name = kernel(dtype, Path::Split(1))?;
    Ok(cuda::resident_blocks(device, "decode_matvec", name, THREADS)? as usize * WARPS)
}

/// Run the group for every batch row: one launch per [`MAX_BATCH`] rows.
///
/// # Safety
/// Every pointer must be a live device allocation on `device` of the size [`Args::check`]
/// verifies from the counts given; the outputs must not overlap the inputs.
pub unsafe fn launch(a: &Args, device: i32, stream: RawStream) -> Result<()> {
    a.check()?;
    if a.batch == 0 {
        return Ok(());
    }
    let es = a.dtype.size();
    let path = path_for(a, || resident_warps(a.dtype, device))?;
    let name = kernel(a.dtype, path)?;
    let (starts, blocks) = grid(a, path)?;
    let g = Group {
        name,
        blocks,
        widths: a.members.iter().map(|m| m.n).collect(),
        out: a.out,
        x: a.x,
        k: a.k,
        xa: a.xa,
        xa_ld: a.xa_ld,
        batch: a.batch,
        es,
    };
    // SAFETY: the members' weights, scales, biases and LoRA terms are the ones `check` verified.
    unsafe {
        launch_group(&g, device, stream, |i, y| {
            member_params(&a.members[i], starts[i], y)
        })
    }
}

/// One launch of the group kernel `name` per [`MAX_BATCH`] batch rows: the members' outputs
/// (`widths` wide, elements of `es` bytes) are consecutive in `out` as in [`Args`]; `x`
/// `[batch, k]` and `xa` `[batch, xa_ld]` are the inputs (0 and `k` 0: not read).
struct Group {
    name: &'static str,
    blocks: u32,
    widths: Vec<usize>,
    out: usize,
    x: usize,
    k: usize,
    xa: usize,
    xa_ld: usize,
    batch: usize,
    es: usize,
}

/// Batch rows `b0` and their count: one launch's share of `batch`, [`MAX_BATCH`] at the most.
fn batch_chunks(batch: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..batch)
        .step_by(MAX_BATCH)
        .map(move |b0| (b0, (batch - b0).min(MAX_BATCH)))
}

/// Run `g`: `member(i, y)` is the kernel member of member `i` whose first output row is at `y`.
///
/// # Safety
/// `x`, `xa` and `out` must be live device allocations on `device` of the extents the caller's
/// `check` verified from the counts in `g`, and so must every pointer `member` returns.
unsafe fn launch_group(
    g: &Group,
    device: i32,
    stream: RawStream,
    member: impl Fn(usize, usize) -> Result<MemberParams>,
) -> Result<()> {
    for (b0, rows) in batch_chunks(g.batch) {
        let ys = output_rows(g.out, g.widths.iter().copied(), g.batch, b0, g.es);
        let mut m = [MemberParams::default(); MAX_MEMBERS];
        for (i, &y) in ys.iter().enumerate() {
            m[i] = member(i, y)?;
        }
        let mut params = Params {
            m,
            x: g.x + b0 * g.k * g.es,
            xa: if g.xa != 0 {
                g.xa + b0 * g.xa_ld * g.es
            } else {
                0
            },
            k: g.k as i64,
            batch: rows as i32,
            xa_ld: g.xa_ld as i32,
            members: ys.len() as i32,
            pad: 0,
        };
        // SAFETY: `Params` is laid out (repr(C)) exactly as the kernel's by-value struct; the
        // caller's `check` verified every extent the kernel reads or writes from the counts, and
        // the offsets above stay inside them (b0 < batch).
        unsafe { launch_params(device, stream, g.name, (g.blocks, THREADS), &mut params)? };
    }
    Ok(())
}

/// The LoRA down-projection of a whole group: `xa[b, j] = sum_k x[b, k] a[j, k]` for `x`
/// `[batch, k]`, `a` `[rows, k]` (every member's A stacked) into `xa` `[batch, xa_ld]`,
/// `rows <= xa_ld`, in one launch per [`MAX_BATCH`] batch rows.
#[derive(Clone, Debug)]
pub struct XaArgs {
    pub dtype: DType,
    pub x: usize,
    pub a: usize,
    pub xa: usize,
    pub rows: usize,
    pub xa_ld: usize,
    pub batch: usize,
    pub k: usize,
}

/// Threads of a `dm_xa` block (`kXaThreads`): one block per LoRA row.
const XA_THREADS: u32 = 1024;

/// Must match `XaParams` in `kernels/decode_matvec.cu` field for field.
#[repr(C)]
struct XaParams {
    x: usize,
    a: usize,
    xa: usize,
    k: i64,
    batch: i32,
    xa_ld: i32,
    vec: i32,
    pad: i32,
}

impl XaArgs {
    /// Check counts, sizes and pointers.
    pub fn check(&self) -> Result<()> {
        let what = "decode_lora_a";
        xa_kernel(self.dtype)?;
        if self.k == 0 || self.k > i32::MAX as usize {
            return Err(Error::invalid(format!(
                "{what}: k = {} out of range",
                self.k
            )));
        }
        if self.rows == 0 || self.rows > self.xa_ld {
            return Err(Error::invalid(format!(
                "{what}: {} LoRA rows for xa's width {}; expected 1 to the width",
                self.rows, self.xa_ld
            )));
        }
        to_i32("xa_ld", self.xa_ld)?;
        let es = self.dtype.size();
        check_device("decode_lora_a x", &[self.x], mul(self.batch, self.k)?, es)?;
        check_device("decode_lora_a a", &[self.a], mul(self.rows, self.k)?, es)?;
        check_device(
            "decode_lora_a xa",
            &[self.xa],
            mul(self.batch, self.xa_ld)?,
            es,
        )?;
        Ok(())
    }
}

fn xa_kernel(dtype: DType) -> Result<&'static str> {
    by_half("decode_lora_a", dtype, "dm_xa_bf16", "dm_xa_f16")
}

/// Run [`XaArgs`]: a block per LoRA row.
///
/// # Safety
/// Every pointer must be a live device allocation on `device` of the size [`XaArgs::check`]
/// verifies from the counts given; `xa` must not overlap `x` or `a`.
pub unsafe fn launch_xa(a: &XaArgs, device: i32, stream: RawStream) -> Result<()> {
    a.check()?;
    let name = xa_kernel(a.dtype)?;
    let es = a.dtype.size();
    let vec = a.k % 8 == 0 && all_aligned16(&[a.x, a.a]);
    let blocks =
        u32::try_from(a.rows).map_err(|_| Error::invalid("decode_lora_a: too many LoRA rows"))?;
    for (b0, rows) in batch_chunks(a.batch) {
        let mut params = XaParams {
            x: a.x + b0 * a.k * es,
            a: a.a,
            xa: a.xa + b0 * a.xa_ld * es,
            k: a.k as i64,
            batch: rows as i32,
            xa_ld: a.xa_ld as i32,
            vec: vec as i32,
            pad: 0,
        };
        // SAFETY: `XaParams` is laid out as the kernel's by-value struct; `check` verified the
        // extents of x, a and xa, and b0 < batch keeps the offsets inside.
        unsafe { launch_params(device, stream, name, (blocks, XA_THREADS), &mut params)? };
    }
    Ok(())
}

/// One 16-bit layer of a group whose LoRA term [`launch_lora_b`] adds: its width and its
/// up-projection `lora_b` `[n, rank]` (0 and rank 0: no LoRA) reading columns `xa_col..` of xa.
#[derive(Clone, Copy, Debug)]
pub struct LoraB {
    pub n: usize,
    pub lora_b: usize,
    pub rank: usize,
    pub scaling: f32,
    pub xa_col: usize,
}

/// `out` holds the members' outputs one after the other, member i's `[batch, n_i]` (as in
/// [`Args`]); each gets `+= scaling * xa[:, xa_col..xa_col + rank] lora_b^T` in place.
#[derive(Clone, Debug)]
pub struct LoraBArgs {
    pub dtype: DType,
    pub members: Vec<LoraB>,
    pub out: usize,
    pub xa: usize,
    pub xa_ld: usize,
    pub batch: usize,
}

impl LoraB {
    /// Check the LoRA term: `lora_b` `[n, rank]` (none with rank 0) reading columns
    /// `xa_col..xa_col + rank` of an `xa_ld`-wide xa; `w` names the member in errors.
    fn check(&self, w: impl Fn(&str) -> String, xa_ld: usize, es: usize) -> Result<()> {
        if self.rank > 0 {
            check_device(&w("lora_b"), &[self.lora_b], mul(self.n, self.rank)?, es)?;
            if self.xa_col.checked_add(self.rank).is_none_or(|e| e > xa_ld) {
                return Err(Error::invalid(w(&format!(
                    "LoRA columns {}..{}+{} exceed xa's width {xa_ld}",
                    self.xa_col, self.xa_col, self.rank
                ))));
            }
        } else if self.lora_b != 0 {
            return Err(Error::invalid(w("has lora_b but rank 0")));
        }
        Ok(())
    }

    /// The kernel member of this output: its rows, first grid unit `start`, output address `y`
    /// and LoRA term; the weight fields are left zero.
    fn params(&self, start: usize, y: usize) -> Result<MemberParams> {
        Ok(MemberParams {
            lora_b: if self.rank > 0 { self.lora_b } else { 0 },
            y,
            n: self.n as i64,
            start: start as i64,
            scaling: self.scaling,
            rank: to_i32("rank", self.rank)?,
            xa_col: to_i32("xa_col", self.xa_col)?,
            ..MemberParams::default()
        })
    }
}

impl LoraBArgs {
    /// Check counts, sizes and pointers; returns the total output elements per batch row.
    pub fn check(&self) -> Result<usize> {
        let what = "decode_lora_b";
        kernel(self.dtype, Path::Any)?;
        check_count(what, self.members.len())?;
        let es = self.dtype.size();
        let mut width = 0usize;
        for (i, m) in self.members.iter().enumerate() {
            let w = |s: &str| format!("{what} member {i} {s}");
            if m.n == 0 {
                return Err(Error::invalid(w("has 0 output rows")));
            }
            m.check(w, self.xa_ld, es)?;
            width = add_width(what, width, m.n)?;
        }
        if self.members.iter().all(|m| m.rank == 0) {
            return Err(Error::invalid(format!("{what}: no member has LoRA")));
        }
        to_i32("xa_ld", self.xa_ld)?;
        check_device(
            "decode_lora_b out",
            &[self.out],
            mul(self.batch, width)?,
            es,
        )?;
        check_device(
            "decode_lora_b xa",
            &[self.xa],
            mul(self.batch, self.xa_ld)?,
            es,
        )?;
        Ok(width)
    }
}

fn lora_b_kernel(dtype: DType) -> Result<&'static str> {
    by_half("decode_lora_b", dtype, "dm_lorab_bf16", "dm_lorab_f16")
}

/// Run [`LoraBArgs`]: a thread per output row, one launch per [`MAX_BATCH`] batch rows.
///
/// # Safety
/// Every pointer must be a live device allocation on `device` of the size [`LoraBArgs::check`]
/// verifies from the counts given; `out` must not overlap `xa` or the `lora_b`s.
pub unsafe fn launch_lora_b(a: &LoraBArgs, device: i32, stream: RawStream) -> Result<()> {
    let width = a.check()?;
    if a.batch == 0 {
        return Ok(());
    }
    let name = lora_b_kernel(a.dtype)?;
    let es = a.dtype.size();
    let blocks = u32::try_from(width.div_ceil(THREADS as usize))
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| Error::invalid("decode_lora_b: too many output rows"))?;
    let starts: Vec<usize> = (a.members.iter())
        .scan(0usize, |start, m| {
            let first = *start;
            *start += m.n;
            Some(first)
        })
        .collect();
    let g = Group {
        name,
        blocks,
        widths: a.members.iter().map(|m| m.n).collect(),
        out: a.out,
        x: 0,
        k: 0,
        xa: a.xa,
        xa_ld: a.xa_ld,
        batch: a.batch,
        es,
    };
    // SAFETY: the kernel reads only the members' n, start, y and LoRA fields, whose extents
    // `check` verified.
    unsafe { launch_group(&g, device, stream, |i, y| a.members[i].params(starts[i], y)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(n: usize) -> Member {
        Member {
            n,
            packed: 1 << 20,
            scales: ScalesPtr::Plain(2 << 20),
            blocksize: 64,
            quant_type: QuantType::Nf4,
            bias: 0,
            lora_b: 0,
            rank: 0,
            scaling: 0.0,
            xa_col: 0,
        }
    }

    fn args(members: Vec<Member>) -> Args {
        Args {
            dtype: DType::BF16,
            members,
            x: 3 << 20,
            out: 4 << 20,
            xa: 0,
            xa_ld: 0,
            batch: 1,
            k: 4096,
        }
    }

    #[test]
    fn params_match_the_kernel_struct_size() {
        // Member: 8 pointers + 2 i64 = 80 bytes, 2 f32 + 4 i32 = 24: 104; Params: 4 members,
        // 2 pointers + i64 = 24, 4 i32 = 16.
        assert_eq!(std::mem::size_of::<MemberParams>(), 104);
        assert_eq!(std::mem::size_of::<Params>(), 4 * 104 + 24 + 16);
    }

    #[test]
    fn checks_name_the_bad_value() {
        let err = |a: Args| a.check().unwrap_err().to_string();
        assert!(err(args(vec![])).contains("0 members"));
        assert!(err(args(vec![member(8); 5])).contains("5 members"));
        assert!(err(args(vec![member(0)])).contains("0 output rows"));
        let mut a = args(vec![member(8)]);
        a.dtype = DType::F32;
        assert!(err(a).contains("float32"));
        let mut m = member(8);
        m.rank = 16;
        m.lora_b = 5 << 20;
        let mut a = args(vec![m]);
        a.xa = 6 << 20;
        a.xa_ld = 8;
        assert!(err(a).contains("exceed xa's width 8"));
        let mut a = args(vec![member(usize::MAX / 2)]);
        a.k = 4;
        assert!(err(a).contains("overflow"));
        let mut a = args(vec![member(8)]);
        a.x = 0;
        assert!(err(a).contains("null"));
        assert_eq!(args(vec![member(8), member(3)]).check().unwrap(), 11);
    }

    #[test]
    fn batch_chunks_cover_the_batch_eight_rows_at_a_time() {
        let chunks: Vec<_> = batch_chunks(17).collect();
        assert_eq!(chunks, [(0, 8), (8, 8), (16, 1)]);
        assert_eq!(batch_chunks(8).collect::<Vec<_>>(), [(0, 8)]);
        assert_eq!(batch_chunks(0).count(), 0);
    }

    #[test]
    fn fast_path_needs_whole_chunks_and_aligned_rows() {
        assert!(fast_path(&args(vec![member(8)])));
        let mut a = args(vec![member(8)]);
        a.k = 4096 + 16;
        assert!(!fast_path(&a));
        let mut m = member(8);
        m.packed += 8;
        assert!(!fast_path(&args(vec![m])));
    }

    #[test]
    fn tiles_split_to_fill_the_resident_warps_once() {
        // An H200: 132 SMs x 2 blocks x 8 warps.
        let resident = 2112;
        assert_eq!(split_warps(1792, resident), 1); // gate/up of an 8B model
        assert_eq!(split_warps(384, resident), 4); // q/k/v
        assert_eq!(split_warps(256, resident), 8); // o, down
        assert_eq!(split_warps(1, resident), 8);
        assert_eq!(split_warps(usize::MAX, resident), 1);
        let a = args(vec![member(4096), member(1024), member(1024)]);
        assert_eq!(tiles(&a), 384);
        assert_eq!(path_for(&a, || Ok(resident)).unwrap(), Path::Split(4));
        assert_eq!(grid(&a, Path::Split(4)).unwrap(), (vec![0, 256, 320], 192));
        assert_eq!(grid(&a, Path::Split(1)).unwrap().1, 48);
    }

    #[test]
    fn mixed_types_and_odd_k_take_the_generic_kernel() {
        let mut fp4 = member(8);
        fp4.quant_type = QuantType::Fp4;
        let never = || -> Result<usize> { panic!("the generic path asks no occupancy") };
        assert_eq!(
            path_for(&args(vec![member(8), fp4]), never).unwrap(),
            Path::Any
        );
        let mut odd = args(vec![member(8)]);
        odd.k = 100;
        assert_eq!(path_for(&odd, never).unwrap(), Path::Any);
        assert_eq!(grid(&odd, Path::Any).unwrap(), (vec![0], 1));
        assert_eq!(kernel(DType::F16, Path::Split(2)).unwrap(), "dm_split2_f16");
        assert_eq!(kernel(DType::BF16, Path::Any).unwrap(), "dm_any_bf16");
        assert!(kernel(DType::BF16, Path::Split(3)).is_err());
    }

    #[test]
    fn lora_a_checks_name_the_bad_value() {
        let a = XaArgs {
            dtype: DType::BF16,
            x: 1 << 20,
            a: 2 << 20,
            xa: 3 << 20,
            rows: 48,
            xa_ld: 48,
            batch: 2,
            k: 4096,
        };
        assert!(a.check().is_ok());
        let err = |a: XaArgs| a.check().unwrap_err().to_string();
        assert!(err(XaArgs {
            rows: 49,
            ..a.clone()
        })
        .contains("49 LoRA rows"));
        assert!(err(XaArgs {
            rows: 0,
            ..a.clone()
        })
        .contains("0 LoRA rows"));
        assert!(err(XaArgs { k: 0, ..a.clone() }).contains("k = 0"));
        assert!(err(XaArgs { a: 0, ..a.clone() }).contains("null"));
        assert!(err(XaArgs {
            dtype: DType::F32,
            ..a
        })
        .contains("float32"));
        assert_eq!(std::mem::size_of::<XaParams>(), 3 * 8 + 8 + 16);
    }

    #[test]
    fn lora_b_checks_name_the_bad_value() {
        let m = LoraB {
            n: 64,
            lora_b: 5 << 20,
            rank: 16,
            scaling: 2.0,
            xa_col: 0,
        };
        let a = LoraBArgs {
            dtype: DType::F16,
            members: vec![m, LoraB { xa_col: 16, ..m }],
            out: 1 << 20,
            xa: 2 << 20,
            xa_ld: 32,
            batch: 3,
        };
        assert_eq!(a.check().unwrap(), 128);
        let err = |a: LoraBArgs| a.check().unwrap_err().to_string();
        let wide = LoraB { xa_col: 20, ..m };
        assert!(err(LoraBArgs {
            members: vec![wide],
            ..a.clone()
        })
        .contains("exceed xa's width 32"));
        assert!(err(LoraBArgs {
            members: vec![m; 5],
            ..a.clone()
        })
        .contains("5 members"));
        let stray = LoraB { rank: 0, ..m };
        assert!(err(LoraBArgs {
            members: vec![stray],
            ..a.clone()
        })
        .contains("rank 0"));
        assert!(err(LoraBArgs {
            out: 0,
            ..a.clone()
        })
        .contains("null"));
        let plain = LoraB {
            rank: 0,
            lora_b: 0,
            ..m
        };
        assert!(err(LoraBArgs {
            members: vec![plain],
            ..a
        })
        .contains("no member has LoRA"));
    }
}
