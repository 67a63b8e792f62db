//! NF4 benches, each against a plain copy measured beside it.
//!
//! `quant/host/...` (any machine): the CPU path (`rslora_fast::quant`, multi-threaded) on a
//! 4096 x 4096 float32 weight, blocksize 64: quantize, dequantize, a plain copy of the float32
//! weight on the same threads, and double quantization of the block scales.
//!
//! `quant/cuda/...` (a GPU at run time; otherwise one line says why they were skipped): the
//! kernels of `kernels/nf4.cu` on a 14336 x 4096 bf16 weight (the 8B shape's MLP projection):
//! quantize, dequantize with plain and with double-quantized scales, and `cuMemcpyDtoDAsync` of
//! the bf16 weight.
//!
//! Throughput counts bytes read plus bytes written (packed codes, scales, weight), the copy's
//! too, so GiB/s compare directly. Filter with `cargo bench --bench quant -- host` or `-- cuda`.

mod common;

use std::cell::RefCell;
use std::ffi::c_void;
use std::time::Instant;

use common::{record, DevBuf, Gpu, Pair, Stream};
use criterion::{criterion_group, BenchmarkGroup, Criterion, SamplingMode, Throughput};
use cudarc::driver::sys;
use rayon::prelude::*;
use rslora_fast::kernels::nf4::{self, ScalesPtr};
use rslora_fast::kernels::DType;
use rslora_fast::quant::{
    dequantize_4bit, double_quant, dynamic_map, num_blocks, packed_len, quantize_4bit, QuantType,
};

const BLOCKSIZE: usize = 64;

fn data(n: usize) -> Vec<f32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u32 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

/// Time `iters` calls of `f` on the CPU and record the rate under `id`.
fn cpu_timed(id: &str, bytes: u64, iters: u64, mut f: impl FnMut()) -> std::time::Duration {
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    record(id, bytes, iters, t.elapsed())
}

fn host(c: &mut Criterion) {
    let n = 4096 * 4096;
    let x = data(n);
    let nb = num_blocks(n, BLOCKSIZE);
    let mut packed = vec![0u8; packed_len(n)];
    let mut absmax = vec![0f32; nb];
    let mut out = vec![0f32; n];
    let (f32_bytes, q_bytes) = ((n * 4) as u64, (packed_len(n) + nb * 4) as u64);
    let name = "quant/host/nf4-4096x4096-f32";
    let mut g = c.benchmark_group(name);
    g.sample_size(10).sampling_mode(SamplingMode::Flat);

    g.throughput(Throughput::Bytes(2 * f32_bytes));
    let id = format!("{name}/copy");
    g.bench_function("copy", |b| {
        b.iter_custom(|iters| {
            cpu_timed(&id, 2 * f32_bytes, iters, || {
                out.par_chunks_mut(1 << 18)
                    .zip(x.par_chunks(1 << 18))
                    .for_each(|(o, i)| o.copy_from_slice(i))
            })
        })
    });
    g.throughput(Throughput::Bytes(f32_bytes + q_bytes));
    let id = format!("{name}/quantize");
    g.bench_function("quantize", |b| {
        b.iter_custom(|iters| {
            cpu_timed(&id, f32_bytes + q_bytes, iters, || {
                quantize_4bit(&x, BLOCKSIZE, QuantType::Nf4, &mut packed, &mut absmax).unwrap()
            })
        })
    });
    let id = format!("{name}/dequantize");
    g.bench_function("dequantize", |b| {
        b.iter_custom(|iters| {
            cpu_timed(&id, f32_bytes + q_bytes, iters, || {
                dequantize_4bit(&packed, &absmax, BLOCKSIZE, QuantType::Nf4, &mut out).unwrap()
            })
        })
    });
    g.throughput(Throughput::Elements(nb as u64));
    g.bench_function("double_quant (block scales)", |b| {
        b.iter(|| double_quant(&absmax))
    });
    g.finish();
}

/// Upload `bytes` of host data into a fresh device buffer.
fn upload<T>(src: &[T]) -> DevBuf {
    let bytes = std::mem::size_of_val(src);
    let d = DevBuf::new(bytes.next_multiple_of(4));
    // SAFETY: `d` holds at least `bytes`; the copy is synchronous.
    common::ok(
        unsafe { sys::cuMemcpyHtoD_v2(d.ptr, src.as_ptr() as *const c_void, bytes) },
        "cuMemcpyHtoD",
    );
    d
}

/// Device buffers of the GPU benches: a bf16 weight, its NF4 codes and both kinds of scales.
struct GpuBufs {
    stream: Stream,
    weight: DevBuf,
    out: DevBuf,
    packed: DevBuf,
    absmax: DevBuf,
    codes: DevBuf,
    nested_absmax: DevBuf,
    nested_map: DevBuf,
    offset: f32,
}

impl GpuBufs {
    fn new(n: usize) -> GpuBufs {
        let x = data(n);
        let bf16: Vec<u16> = x.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        let nb = num_blocks(n, BLOCKSIZE);
        let mut packed = vec![0u8; packed_len(n)];
        let mut absmax = vec![0f32; nb];
        let exact: Vec<f32> = bf16
            .iter()
            .map(|&h| f32::from_bits((h as u32) << 16))
            .collect();
        quantize_4bit(&exact, BLOCKSIZE, QuantType::Nf4, &mut packed, &mut absmax).unwrap();
        let nested = double_quant(&absmax);
        GpuBufs {
            stream: Stream::new(),
            weight: upload(&bf16),
            out: DevBuf::new(n * 2),
            packed: upload(&packed),
            absmax: upload(&absmax),
            codes: upload(&nested.codes),
            nested_absmax: upload(&nested.nested_absmax),
            nested_map: upload(dynamic_map()),
            offset: nested.offset,
        }
    }
}

/// One GPU case: a kernel or the copy, enqueued once on the bench stream.
#[derive(Clone, Copy)]
enum Case {
    Copy,
    Quantize,
    Dequantize,
    DequantizeNested,
}

fn enqueue(b: &GpuBufs, n: usize, case: Case) {
    let params = nf4::Params {
        n,
        blocksize: BLOCKSIZE,
        qt: QuantType::Nf4,
        dtype: DType::BF16,
        device: 0,
        stream: b.stream.raw(),
    };
    let p = |d: &DevBuf| d.ptr as usize;
    // SAFETY: every buffer is a live device allocation of the size each call needs (made for
    // `n` elements in GpuBufs::new); all run on the one bench stream, synchronized after.
    let res = unsafe {
        match case {
            Case::Copy => {
                common::ok(
                    sys::cuMemcpyDtoDAsync_v2(b.out.ptr, b.weight.ptr, n * 2, b.stream.0),
                    "cuMemcpyDtoDAsync",
                );
                Ok(())
            }
            Case::Quantize => nf4::quantize(&params, p(&b.weight), p(&b.packed), p(&b.absmax)),
            Case::Dequantize => {
                let scales = ScalesPtr::Plain(p(&b.absmax));
                nf4::dequantize(&params, p(&b.packed), scales, p(&b.out))
            }
            Case::DequantizeNested => {
                let scales = ScalesPtr::Nested {
                    codes: p(&b.codes),
                    nested_absmax: p(&b.nested_absmax),
                    nested_code: p(&b.nested_map),
                    offset: b.offset,
                };
                nf4::dequantize(&params, p(&b.packed), scales, p(&b.out))
            }
        }
    };
    res.unwrap_or_else(|e| panic!("{e}"));
}

/// Bytes read plus written by one call of `case` on `n` elements.
fn moved(n: usize, case: Case) -> u64 {
    let (w, q) = (n * 2, packed_len(n));
    let nb = num_blocks(n, BLOCKSIZE);
    (match case {
        Case::Copy => 2 * w,
        Case::Quantize | Case::Dequantize => w + q + nb * 4,
        Case::DequantizeNested => w + q + nb + nb.div_ceil(256) * 4 + 256 * 4,
    }) as u64
}

fn gpu_case(
    g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    bufs: &RefCell<Option<GpuBufs>>,
    n: usize,
    name: &str,
    case: Case,
) {
    let id = format!("quant/cuda/nf4-14336x4096-bf16/{name}");
    let bytes = moved(n, case);
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function(name, |bch| {
        bch.iter_custom(|iters| {
            let mut slot = bufs.borrow_mut();
            let b = slot.get_or_insert_with(|| GpuBufs::new(n));
            b.stream.sync();
            let t = Instant::now();
            for _ in 0..iters {
                enqueue(b, n, case);
            }
            b.stream.sync();
            record(&id, bytes, iters, t.elapsed())
        })
    });
}

fn cuda(c: &mut Criterion) {
    let group = "quant/cuda";
    if let Some(why) = common::gpu_unavailable() {
        common::skip(group, &why);
        return;
    }
    if rslora_fast::cuda::kernel_modules().is_empty() {
        common::skip(
            group,
            "this build has no CUDA kernels (RSLORA_FAST_SKIP_KERNELS=1)",
        );
        return;
    }
    let _gpu = Gpu::bind();
    let n = 14336 * 4096;
    let bufs: RefCell<Option<GpuBufs>> = RefCell::new(None);
    let mut g = c.benchmark_group("quant/cuda/nf4-14336x4096-bf16");
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    gpu_case(&mut g, &bufs, n, "copy", Case::Copy);
    gpu_case(&mut g, &bufs, n, "quantize", Case::Quantize);
    gpu_case(&mut g, &bufs, n, "dequantize", Case::Dequantize);
    gpu_case(
        &mut g,
        &bufs,
        n,
        "dequantize (double-quant scales)",
        Case::DequantizeNested,
    );
    g.finish();
    // Buffers go before the context guard.
    drop(bufs);
}

fn summary() -> Vec<Pair> {
    let pair = |label: &str, group: &str, name: &str| Pair {
        label: label.to_string(),
        subject: format!("{group}/{name}"),
        baseline: format!("{group}/copy"),
    };
    let (h, d) = (
        "quant/host/nf4-4096x4096-f32",
        "quant/cuda/nf4-14336x4096-bf16",
    );
    vec![
        pair("CPU quantize f32 4096x4096", h, "quantize"),
        pair("CPU dequantize f32 4096x4096", h, "dequantize"),
        pair("GPU quantize bf16 14336x4096", d, "quantize"),
        pair("GPU dequantize bf16 14336x4096", d, "dequantize"),
        pair(
            "GPU dequantize bf16 (double quant)",
            d,
            "dequantize (double-quant scales)",
        ),
    ]
}

criterion_group!(benches, host, cuda);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    common::print_summary("NF4 against a plain copy", &summary());
}
