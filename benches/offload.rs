//! Offload scheduler benches.
//!
//! On any machine (host transport): the scheduler's own cost per operation (offload, prefetch,
//! wait, release of a small buffer, so bookkeeping dominates) and a step of pool reuse (32 layer
//! inputs out and back). With a GPU at run time: achieved device-to-host and host-to-device
//! bandwidth of the scheduler against a plain pinned `cuMemcpy*Async` of the same bytes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cudarc::driver::sys;
use rslora_fast::cuda::RawStream;
use rslora_fast::offload::{CudaTransport, HostTransport, Scheduler, Transport};

const S: RawStream = RawStream(0);

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
    // The lookahead plan with 31 live handles (a 32-layer model mid-backward).
    let hs: Vec<u64> = (0..31)
        // SAFETY: as above.
        .map(|_| unsafe { s.offload(src.as_ptr() as usize, src.len(), S).unwrap() })
        .collect();
    g.bench_function("plan_prefetch (31 live)", |b| {
        b.iter(|| black_box(s.plan_prefetch(black_box(hs[20]))))
    });
    s.release_all().unwrap();
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
    g.bench_function("32 layers x 256 KiB out and back (pool reused)", |b| {
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
    assert_eq!(
        s.stats().pool.allocations,
        layers,
        "the pool must be reused"
    );
    g.finish();
}

/// Time `iters` rounds of `f` on the GPU, synchronizing `stream` at the end.
fn timed(iters: u64, stream: sys::CUstream, mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    // SAFETY: a live stream of the current context.
    unsafe { sys::cuStreamSynchronize(stream) };
    t.elapsed()
}

fn gpu_bandwidth(c: &mut Criterion) {
    if rslora_fast::cuda::device_count() == 0 {
        eprintln!("offload GPU benches skipped: no CUDA device");
        return;
    }
    let mut g = c.benchmark_group("offload/cuda");
    g.sample_size(10);
    for mib in [16usize, 128] {
        let n = mib << 20;
        g.throughput(Throughput::Bytes(n as u64));
        let mut s = Scheduler::new(CudaTransport::new(0).unwrap(), 1, None);
        let mut helper = CudaTransport::new(0).unwrap();
        let stream = helper.copy_stream() as sys::CUstream;
        let host = helper.alloc_pinned(n).unwrap();
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: the context is current (CudaTransport::new bound it); bench-only device buffer.
        unsafe { assert_eq!(sys::cuMemAlloc_v2(&mut dev, n), sys::CUresult::CUDA_SUCCESS) };
        g.bench_function(BenchmarkId::new("plain pinned DtoH async", mib), |b| {
            b.iter_custom(|iters| {
                timed(iters, stream, || {
                    // SAFETY: `host` and `dev` hold n bytes until the final synchronize.
                    unsafe {
                        sys::cuMemcpyDtoHAsync_v2(host.as_ptr() as *mut _, dev, n, stream);
                    }
                })
            })
        });
        g.bench_function(BenchmarkId::new("scheduler offload (DtoH)", mib), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                let hs: Vec<u64> = (0..iters)
                    // SAFETY: `dev` holds n bytes and lives to the end of the bench.
                    .map(|_| unsafe { s.offload(dev as usize, n, S).unwrap() })
                    .collect();
                s.transport_mut().synchronize_all().unwrap();
                let el = t.elapsed();
                for h in hs {
                    s.release(h).unwrap();
                }
                s.trim().unwrap(); // keep host memory bounded between samples
                el
            })
        });
        g.bench_function(BenchmarkId::new("plain pinned HtoD async", mib), |b| {
            b.iter_custom(|iters| {
                timed(iters, stream, || {
                    // SAFETY: as above.
                    unsafe {
                        sys::cuMemcpyHtoDAsync_v2(dev, host.as_ptr() as *const _, n, stream);
                    }
                })
            })
        });
        // SAFETY: `dev` holds n bytes.
        let h = unsafe { s.offload(dev as usize, n, S).unwrap() };
        s.release(h).unwrap();
        g.bench_function(
            BenchmarkId::new("scheduler prefetch+wait (HtoD)", mib),
            |b| {
                b.iter_custom(|iters| {
                    let mut el = Duration::ZERO;
                    for _ in 0..iters {
                        // SAFETY: as above.
                        let h = unsafe { s.offload(dev as usize, n, S).unwrap() };
                        s.transport_mut().synchronize_all().unwrap();
                        let t = Instant::now();
                        unsafe { s.prefetch(h, dev as usize, S).unwrap() };
                        s.wait(h, S).unwrap();
                        s.transport_mut().synchronize_all().unwrap();
                        el += t.elapsed();
                        s.release(h).unwrap();
                    }
                    el
                })
            },
        );
        drop(s);
        // SAFETY: every copy finished (synchronized above); buffers freed once.
        unsafe {
            sys::cuStreamSynchronize(stream);
            sys::cuMemFree_v2(dev);
            helper.free_pinned(host, n);
        }
    }
    g.finish();
}

criterion_group!(benches, scheduler_ops, pool_reuse, gpu_bandwidth);
criterion_main!(benches);
