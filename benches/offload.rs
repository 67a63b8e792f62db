//! Offload scheduler benches.
//!
//! `offload/host/...` (any machine, host transport): the scheduler's own cost per operation
//! (offload, prefetch, wait, release of a small buffer, so bookkeeping dominates), the schedule's
//! decisions (the policy's plan per layer in forward and its prefetch plan in backward with a
//! 32-layer model's handles live, and one whole step of the layer schedule on small buffers), and
//! a step of pool reuse (32 layer inputs out and back).
//!
//! `offload/cuda/...` (a GPU at run time; otherwise one line says why they were skipped): the
//! scheduler's offload (device to host) and prefetch (host to device) against a plain pinned
//! `cuMemcpy*Async` of the same bytes on a stream of the same kind, at 16 MiB, 128 MiB and one
//! decoder layer's saved activation (see [`LAYER_BYTES`]), plus one training step of the real
//! schedule of a 32-layer model. Filter with `cargo bench --bench offload -- host` or `-- cuda`.

mod common;

use std::cell::{Cell, RefCell};
use std::hint::black_box;
use std::time::{Duration, Instant};

use common::{record, DevBuf, Gpu, Pair, Pinned, Stream};
use criterion::{criterion_group, BenchmarkId, Criterion, SamplingMode, Throughput};
use cudarc::driver::sys;
use rslora_fast::cuda::RawStream;
use rslora_fast::offload::{
    CudaTransport, HostTransport, LayerPlan, PolicyConfig, Scheduler, Transport,
};

/// The compute stream the scheduler orders its copies after (the legacy default stream, idle here).
const S: RawStream = RawStream(0);

/// What `"unsloth"` checkpointing saves per decoder layer of the Llama-3-8B shape at batch
/// 2 x 2048: the layer's input hidden states, `[2, 2048, 4096]` bf16 = 33,554,432 bytes (32 MiB).
/// Everything else the layer needs in backward is recomputed from it.
const LAYER_BYTES: usize = 2 * 2048 * 4096 * 2;
/// Decoder layers of the 8B shape. The last layer's input stays on the device (its copy could
/// not be hidden behind compute), so a step offloads and prefetches `LAYERS - 1` inputs.
const LAYERS: usize = 32;
/// Prefetch depth of the Python default (`install_offloaded_checkpointing(lookahead=1)`).
const LOOKAHEAD: usize = 1;
/// Copies per synchronized round in the single-size benches (both sides alike), so each round's
/// one host-device round trip costs well under 1% of its copy time.
const ROUND: usize = 8;

fn scheduler_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("offload/host/op");
    let src = vec![7u8; 256];
    let mut dst = vec![0u8; 256];
    let mut s = Scheduler::new(HostTransport::new(), 1, None);
    g.bench_function("offload+prefetch+wait+release (256 B)", |b| {
        b.iter(|| {
            // SAFETY: both buffers outlive the synchronous host copies.
            let h = unsafe { s.offload(src.as_ptr() as usize, src.len(), S).unwrap() };
            unsafe { s.prefetch(h, dst.as_mut_ptr() as usize, S).unwrap() };
            s.wait(h, S).unwrap();
            s.release(black_box(h)).unwrap();
        })
    });
    s.release_all().unwrap();
    g.finish();
}

/// The policy of a 32-layer model: last layer kept, lookahead as the Python default.
fn policy_32() -> PolicyConfig {
    PolicyConfig {
        lookahead: LOOKAHEAD,
        min_tokens: 512,
        last_layer: Some(LAYERS - 1),
        budget_bytes: None,
        ..PolicyConfig::default()
    }
}

/// A scheduler over the host transport whose leases are plain ids (no Python).
type HostSched = Scheduler<HostTransport, usize, usize>;

/// The schedule's decisions alone, and one whole step of it on 256-byte inputs (copies cost
/// nothing, so this is the per-step bookkeeping the Python path pays through the binding).
fn schedule(c: &mut Criterion) {
    let mut g = c.benchmark_group("offload/host/schedule");
    let src = vec![7u8; 256];
    let mut s = HostSched::with_policy(HostTransport::new(), policy_32(), None);
    g.bench_function("begin_layer (32 layers, one pass)", |b| {
        b.iter(|| {
            for i in 0..LAYERS {
                black_box(s.begin_layer(black_box(i), 4096, true).unwrap());
            }
        })
    });
    // The backward plan with 31 live handles of one pass (a 32-layer model mid-backward).
    let (pass, _) = s.begin_layer(0, 4096, true).unwrap();
    let hs: Vec<u64> = (0..OFFLOADED)
        // SAFETY: `src` outlives the synchronous host copies.
        .map(|i| unsafe {
            s.offload_layer(i, src.as_ptr() as usize, src.len(), S, i, i)
                .unwrap()
        })
        .collect();
    g.bench_function("backward_plan (31 live)", |b| {
        b.iter(|| black_box(s.backward_plan(pass, black_box(20), Some(hs[20]))))
    });
    s.release_all().unwrap();
    drop(s.take_freed());
    let mut dst = vec![0u8; 256];
    g.bench_function("step: 32 layers through the layer schedule (256 B)", |b| {
        b.iter(|| {
            let mut handles = [None; LAYERS];
            let mut pass = 0;
            for (i, h) in handles.iter_mut().enumerate() {
                let (p, plan) = s.begin_layer(i, 4096, true).unwrap();
                pass = p;
                if plan == LayerPlan::Offload {
                    // SAFETY: as above.
                    *h = Some(unsafe {
                        s.offload_layer(i, src.as_ptr() as usize, src.len(), S, i, i)
                            .unwrap()
                    });
                }
            }
            for i in (0..LAYERS).rev() {
                for (id, _, layer) in s.backward_plan(pass, i, handles[i]) {
                    // SAFETY: `dst` holds 256 bytes; the host copies are synchronous.
                    unsafe {
                        s.prefetch_leased(id, dst.as_mut_ptr() as usize, S, layer)
                            .unwrap()
                    };
                }
                if let Some(h) = handles[i] {
                    black_box(s.take_ready(h, S).unwrap());
                    s.release(h).unwrap();
                }
            }
            black_box(s.take_freed());
        })
    });
    g.finish();
}

fn pool_reuse(c: &mut Criterion) {
    let mut g = c.benchmark_group("offload/host/step");
    let layer = 256 * 1024;
    let layers = 32;
    let srcs: Vec<Vec<u8>> = (0..layers).map(|i| vec![i as u8; layer]).collect();
    let mut back = vec![0u8; layer];
    g.throughput(Throughput::Bytes((2 * layer * layers) as u64));
    let mut s = Scheduler::new(HostTransport::new(), 1, None);
    let ran = Cell::new(false);
    g.bench_function("32 layers x 256 KiB out and back (pool reused)", |b| {
        ran.set(true);
        b.iter(|| {
            let hs: Vec<u64> = srcs
                .iter()
                // SAFETY: sources outlive the synchronous copies.
                .map(|x| unsafe { s.offload(x.as_ptr() as usize, x.len(), S).unwrap() })
                .collect();
            for h in hs.into_iter().rev() {
                // SAFETY: `back` holds `layer` bytes.
                unsafe { s.prefetch(h, back.as_mut_ptr() as usize, S).unwrap() };
                s.wait(h, S).unwrap();
                s.release(h).unwrap();
            }
        })
    });
    // Only a run that measured the step can say whether the pool was reused.
    if ran.get() {
        assert_eq!(
            s.stats().pool.allocations,
            layers,
            "the pool must be reused"
        );
    }
    g.finish();
}

/// Rounds of at most [`ROUND`] copies covering `iters`.
fn rounds(iters: u64) -> impl Iterator<Item = usize> {
    (0..iters)
        .step_by(ROUND)
        .map(move |i| (iters - i).min(ROUND as u64) as usize)
}

fn cuda_scheduler() -> Scheduler<CudaTransport> {
    let t = CudaTransport::new(0).unwrap_or_else(|e| panic!("CUDA transport: {e}"));
    Scheduler::new(t, LOOKAHEAD, None)
}

fn cuda_step_scheduler() -> Scheduler<CudaTransport, usize, usize> {
    let t = CudaTransport::new(0).unwrap_or_else(|e| panic!("CUDA transport: {e}"));
    Scheduler::with_policy(t, policy_32(), None)
}

/// Buffers of one single-size comparison, made on first use (a filtered run allocates nothing).
struct SizeBufs {
    sched: Scheduler<CudaTransport>,
    plain: Stream,
    host: Vec<Pinned>,
    dev: DevBuf,
}

impl SizeBufs {
    fn new(n: usize) -> SizeBufs {
        SizeBufs {
            sched: cuda_scheduler(),
            plain: Stream::new(),
            host: (0..ROUND).map(|_| Pinned::new(n)).collect(),
            dev: DevBuf::new(n),
        }
    }
}

/// `iters` plain copies of `n` bytes in rounds: `dtoh` device to host, else host to device.
fn plain_copies(b: &SizeBufs, n: usize, iters: u64, dtoh: bool) -> Duration {
    let mut el = Duration::ZERO;
    for r in rounds(iters) {
        let t = Instant::now();
        for h in &b.host[..r] {
            // SAFETY: `h` and `dev` hold n bytes until the synchronize below.
            let res = unsafe {
                if dtoh {
                    sys::cuMemcpyDtoHAsync_v2(h.ptr, b.dev.ptr, n, b.plain.0)
                } else {
                    sys::cuMemcpyHtoDAsync_v2(b.dev.ptr, h.ptr, n, b.plain.0)
                }
            };
            common::ok(res, "plain cuMemcpyAsync");
        }
        b.plain.sync();
        el += t.elapsed();
    }
    el
}

/// Offload `r` copies of the device buffer; the handles are live afterwards.
fn offload_round(b: &mut SizeBufs, n: usize, r: usize) -> Vec<u64> {
    (0..r)
        // SAFETY: `dev` holds n bytes and outlives every copy (synchronized before release).
        .map(|_| unsafe { b.sched.offload(b.dev.ptr as usize, n, S).unwrap() })
        .collect()
}

fn release(b: &mut SizeBufs, hs: Vec<u64>) {
    for h in hs {
        b.sched.release(h).unwrap();
    }
}

/// `iters` scheduler offloads of `n` bytes in rounds, each round ended by a synchronize.
fn sched_offloads(b: &mut SizeBufs, n: usize, iters: u64) -> Duration {
    let mut el = Duration::ZERO;
    for r in rounds(iters) {
        let t = Instant::now();
        let hs = offload_round(b, n, r);
        b.sched.transport_mut().synchronize_all().unwrap();
        el += t.elapsed();
        release(b, hs);
    }
    el
}

/// `iters` scheduler prefetches of `n` bytes in rounds, then the compute stream's wait for each
/// (queued after the prefetches, as the lookahead does: a wait queued between two prefetches
/// would make the second copy wait for the first one's event on the compute stream). The
/// offloads that fill each round run untimed before it.
fn sched_prefetches(b: &mut SizeBufs, n: usize, iters: u64) -> Duration {
    let mut el = Duration::ZERO;
    for r in rounds(iters) {
        let hs = offload_round(b, n, r);
        b.sched.transport_mut().synchronize_all().unwrap();
        let t = Instant::now();
        for &h in &hs {
            // SAFETY: `dev` holds n bytes; nothing reads it while the copies run.
            unsafe { b.sched.prefetch(h, b.dev.ptr as usize, S).unwrap() };
        }
        for &h in &hs {
            b.sched.wait(h, S).unwrap();
        }
        b.sched.transport_mut().synchronize_all().unwrap();
        el += t.elapsed();
        release(b, hs);
    }
    el
}

/// What one single-size bench times.
#[derive(Clone, Copy)]
enum Side {
    /// Plain `cuMemcpyDtoHAsync` into pinned memory.
    PlainOut,
    /// `Scheduler::offload`.
    Offload,
    /// Plain `cuMemcpyHtoDAsync` from pinned memory.
    PlainBack,
    /// `Scheduler::prefetch` + `Scheduler::wait`.
    Prefetch,
}

/// The four benches of one size: plain and scheduler, each direction.
fn cuda_size(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    label: &str,
    n: usize,
) {
    let bufs: RefCell<Option<SizeBufs>> = RefCell::new(None);
    let with = |f: &mut dyn FnMut(&mut SizeBufs) -> Duration| {
        let mut slot = bufs.borrow_mut();
        f(slot.get_or_insert_with(|| SizeBufs::new(n)))
    };
    g.throughput(Throughput::Bytes(n as u64));
    for (name, side) in [
        ("dtoh/plain", Side::PlainOut),
        ("dtoh/scheduler", Side::Offload),
        ("htod/plain", Side::PlainBack),
        ("htod/scheduler", Side::Prefetch),
    ] {
        let id = format!("offload/cuda/{name}/{label}");
        g.bench_function(BenchmarkId::new(name, label), |bch| {
            bch.iter_custom(|iters| {
                let el = with(&mut |b| match side {
                    Side::PlainOut => plain_copies(b, n, iters, true),
                    Side::Offload => sched_offloads(b, n, iters),
                    Side::PlainBack => plain_copies(b, n, iters, false),
                    Side::Prefetch => sched_prefetches(b, n, iters),
                });
                record(&id, n as u64, iters, el)
            })
        });
    }
    // Everything is synchronized; free this size's memory before the next size.
    drop(bufs);
}

/// Buffers of the step comparison: each layer's input has its own slot of `LAYER_BYTES` in
/// `dev`; the prefetch writes it back into the same slot (a fresh buffer in the real step).
struct StepBufs {
    sched: Scheduler<CudaTransport, usize, usize>,
    plain: Stream,
    host: Vec<Pinned>,
    dev: DevBuf,
}

const OFFLOADED: usize = LAYERS - 1;

impl StepBufs {
    fn new() -> StepBufs {
        StepBufs {
            sched: cuda_step_scheduler(),
            plain: Stream::new(),
            host: (0..OFFLOADED).map(|_| Pinned::new(LAYER_BYTES)).collect(),
            dev: DevBuf::new(OFFLOADED * LAYER_BYTES),
        }
    }

    fn slot(&self, layer: usize) -> usize {
        self.dev.at(layer * LAYER_BYTES, LAYER_BYTES)
    }
}

/// One step of the layer schedule as the Python path drives it (`rslora_fast.offload`): forward
/// marks each layer and offloads what the policy says (the previous layer's copy is then waited
/// for); backward, at each layer, prefetches what the policy's plan names into the slot of that
/// layer, then takes its own input and releases it.
fn real_step(b: &mut StepBufs) {
    let mut handles = [None; LAYERS];
    let mut pass = 0;
    for (i, h) in handles.iter_mut().enumerate() {
        let (p, plan) = b.sched.begin_layer(i, 4096, true).unwrap();
        pass = p;
        if plan == LayerPlan::Offload {
            let src = b.slot(i);
            // SAFETY: the slot holds LAYER_BYTES and outlives the step's copies.
            *h = Some(unsafe { b.sched.offload_layer(i, src, LAYER_BYTES, S, i, i).unwrap() });
        }
    }
    for i in (0..LAYERS).rev() {
        for (id, _, layer) in b.sched.backward_plan(pass, i, handles[i]) {
            let dst = b.slot(layer);
            // SAFETY: the slot holds LAYER_BYTES; nothing else touches it during the step.
            unsafe { b.sched.prefetch_leased(id, dst, S, layer).unwrap() };
        }
        if let Some(h) = handles[i] {
            b.sched.take_ready(h, S).unwrap();
            b.sched.release(h).unwrap();
        }
    }
    b.sched.take_freed();
    b.sched.transport_mut().synchronize_all().unwrap();
}

/// The same bytes as [`real_step`] with plain copies: every input out, then back in reverse.
fn plain_step(b: &StepBufs) {
    for (i, h) in b.host.iter().enumerate() {
        // SAFETY: slot and host buffer hold LAYER_BYTES until the synchronize below.
        let res = unsafe {
            sys::cuMemcpyDtoHAsync_v2(h.ptr, b.slot(i) as sys::CUdeviceptr, LAYER_BYTES, b.plain.0)
        };
        common::ok(res, "plain cuMemcpyDtoHAsync");
    }
    for (i, h) in b.host.iter().enumerate().rev() {
        // SAFETY: as above.
        let res = unsafe {
            sys::cuMemcpyHtoDAsync_v2(b.slot(i) as sys::CUdeviceptr, h.ptr, LAYER_BYTES, b.plain.0)
        };
        common::ok(res, "plain cuMemcpyHtoDAsync");
    }
    b.plain.sync();
}

fn cuda_step(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    let bufs: RefCell<Option<StepBufs>> = RefCell::new(None);
    let bytes = (2 * OFFLOADED * LAYER_BYTES) as u64;
    g.throughput(Throughput::Bytes(bytes));
    for (name, real) in [("step/plain", false), ("step/scheduler", true)] {
        let id = format!("offload/cuda/{name}/8B-32-layers");
        g.bench_function(BenchmarkId::new(name, "8B-32-layers"), |bch| {
            bch.iter_custom(|iters| {
                let mut slot = bufs.borrow_mut();
                let b = slot.get_or_insert_with(StepBufs::new);
                let t = Instant::now();
                for _ in 0..iters {
                    if real {
                        real_step(b)
                    } else {
                        plain_step(b)
                    }
                }
                record(&id, bytes, iters, t.elapsed())
            })
        });
    }
    // Steps after the first reuse the pool: one block per offloaded input, all pinned. Only a
    // run that measured the scheduler's step can say so.
    let stats = bufs.borrow().as_ref().map(|b| b.sched.stats());
    if let Some(st) = stats.filter(|s| s.offloads > 0) {
        assert_eq!(
            st.pool.allocations, OFFLOADED,
            "the step must reuse the pool"
        );
        assert_eq!(
            st.pool.pageable_fallbacks, 0,
            "pinning failed: copies were pageable"
        );
    }
}

fn gpu_bandwidth(c: &mut Criterion) {
    if let Some(why) = common::gpu_unavailable() {
        common::skip("offload/cuda", &why);
        return;
    }
    let _gpu = Gpu::bind();
    let mut g = c.benchmark_group("offload/cuda");
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    cuda_size(&mut g, "16MiB", 16 << 20);
    cuda_size(&mut g, "128MiB", 128 << 20);
    cuda_size(&mut g, "8B-layer-input-32MiB", LAYER_BYTES);
    cuda_step(&mut g);
    g.finish();
}

fn summary() -> Vec<Pair> {
    let mut pairs = Vec::new();
    for label in ["16MiB", "128MiB", "8B-layer-input-32MiB"] {
        for (dir, what) in [("dtoh", "offload (DtoH)"), ("htod", "prefetch+wait (HtoD)")] {
            pairs.push(Pair {
                label: format!("{what} {label}"),
                subject: format!("offload/cuda/{dir}/scheduler/{label}"),
                baseline: format!("offload/cuda/{dir}/plain/{label}"),
            });
        }
    }
    pairs.push(Pair {
        label: "step: 31 x 32 MiB out and back".into(),
        subject: "offload/cuda/step/scheduler/8B-32-layers".into(),
        baseline: "offload/cuda/step/plain/8B-32-layers".into(),
    });
    pairs
}

criterion_group!(benches, scheduler_ops, schedule, pool_reuse, gpu_bandwidth);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    common::print_summary(
        "offload/cuda: scheduler against a plain pinned copy",
        &summary(),
    );
}
