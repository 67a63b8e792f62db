//! The offload scheduler and host pool, driven through the host transport (no GPU needed).

use rslora_fast::cuda::RawStream;
use rslora_fast::offload::{size_class, HandleState, HostTransport, Scheduler, Transport};
use rslora_fast::Error;

const S: RawStream = RawStream(0);

/// Deterministic but varied bytes (a small LCG), so a mix-up between buffers shows.
fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

fn offload<T: Transport>(s: &mut Scheduler<T>, src: &[u8]) -> rslora_fast::Result<u64> {
    // SAFETY: `src` outlives the copy: every test runs the copies before dropping its buffers.
    unsafe { s.offload(src.as_ptr() as usize, src.len(), S) }
}

fn fetch<T: Transport>(s: &mut Scheduler<T>, h: u64) -> Vec<u8> {
    let mut out = vec![0u8; s.nbytes(h).unwrap()];
    // SAFETY: `out` holds nbytes(h) bytes and lives past `wait`, which completes the copy.
    unsafe { s.prefetch(h, out.as_mut_ptr() as usize, S).unwrap() };
    s.wait(h, S).unwrap();
    out
}

#[test]
fn size_classes_waste_at_most_a_sixteenth() {
    let mut prev = 0;
    for n in (1..300_000)
        .step_by(97)
        .chain([1 << 20, (1 << 20) + 1, 12_345_678, 1 << 33])
    {
        let c = size_class(n).unwrap();
        assert!(c >= n, "class {c} below request {n}");
        assert!(c >= prev || n < 300_000, "classes must not shrink");
        prev = c;
        if n > 65_536 {
            assert!(
                (c - n) as f64 <= n as f64 / 16.0,
                "{n} -> {c} wastes too much"
            );
        }
        assert_eq!(size_class(c).unwrap(), c, "a class is its own class");
    }
    // A decoder layer input at 8B shape: 1 x 16384 x 4096 bf16 = exactly 128 MiB.
    assert_eq!(size_class(128 << 20).unwrap(), 128 << 20);
}

#[test]
fn round_trip_returns_the_same_bytes() {
    let mut s = Scheduler::new(HostTransport::new(), 1, None);
    let sizes = [1usize, 7, 4096, 4097, 70_001, 1 << 20];
    let srcs: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(n, i as u32))
        .collect();
    let handles: Vec<u64> = srcs.iter().map(|b| offload(&mut s, b).unwrap()).collect();
    for (h, src) in handles.iter().zip(&srcs).rev() {
        assert_eq!(s.state(*h).unwrap(), HandleState::Offloaded);
        assert_eq!(&fetch(&mut s, *h), src);
        assert_eq!(s.state(*h).unwrap(), HandleState::Ready);
        s.release(*h).unwrap();
    }
    let st = s.stats();
    assert_eq!(st.live_handles, 0);
    assert_eq!(st.pool.in_use_bytes, 0);
    assert_eq!(st.offloads, sizes.len() as u64);
    assert_eq!(st.bytes_to_host, sizes.iter().sum::<usize>() as u64);
}

#[test]
fn pool_is_reused_across_steps_and_stays_near_the_offloaded_bytes() {
    let mut s = Scheduler::new(HostTransport::new(), 1, None);
    // Four "layers" of 1,000,003 bytes each (an odd size, so the class rounds up).
    let layer = 1_000_003;
    let srcs: Vec<Vec<u8>> = (0..4).map(|i| pattern(layer, i)).collect();
    let mut reserved_after_first = 0;
    for step in 0..50 {
        let hs: Vec<u64> = srcs.iter().map(|b| offload(&mut s, b).unwrap()).collect();
        for (h, src) in hs.iter().zip(&srcs).rev() {
            assert_eq!(&fetch(&mut s, *h), src);
            s.release(*h).unwrap();
        }
        let st = s.stats().pool;
        if step == 0 {
            reserved_after_first = st.pinned_bytes;
            assert_eq!(st.allocations, 4);
        }
        assert_eq!(
            st.pinned_bytes, reserved_after_first,
            "pool grew at step {step}"
        );
        assert_eq!(st.allocations, 4, "pool allocated again at step {step}");
    }
    let st = s.stats().pool;
    assert!(st.pinned_bytes as f64 <= 1.1 * (4 * layer) as f64);
    assert_eq!(st.peak_in_use_bytes, st.pinned_bytes);
    assert_eq!(st.pageable_bytes, 0);
}

#[test]
fn pool_grows_on_demand() {
    let mut s = Scheduler::new(HostTransport::new(), 1, None);
    let a = pattern(10_000, 1);
    let b = pattern(200_000, 2);
    let h1 = offload(&mut s, &a).unwrap();
    assert_eq!(s.stats().pool.allocations, 1);
    let h2 = offload(&mut s, &a).unwrap();
    let h3 = offload(&mut s, &b).unwrap();
    let st = s.stats().pool;
    assert_eq!(st.allocations, 3);
    assert_eq!(
        st.pinned_bytes,
        2 * size_class(10_000).unwrap() + size_class(200_000).unwrap()
    );
    for h in [h1, h2, h3] {
        s.release(h).unwrap();
    }
    // All idle now: the same mix again allocates nothing.
    let hs = [
        offload(&mut s, &b).unwrap(),
        offload(&mut s, &a).unwrap(),
        offload(&mut s, &a).unwrap(),
    ];
    assert_eq!(s.stats().pool.allocations, 3);
    s.release_all().unwrap();
    assert!(hs.iter().all(|h| s.release(*h).is_err()));
    s.trim().unwrap();
    assert_eq!(s.stats().pool.pinned_bytes, 0);
}

#[test]
fn host_cap_gives_a_clear_error_and_the_scheduler_stays_usable() {
    let n = 300_000;
    let cap = size_class(n).unwrap() * 2;
    let mut s = Scheduler::new(HostTransport::new(), 1, Some(cap));
    let src = pattern(n, 3);
    let h1 = offload(&mut s, &src).unwrap();
    let h2 = offload(&mut s, &src).unwrap();
    match offload(&mut s, &src) {
        Err(Error::HostMemory(msg)) => {
            assert!(msg.contains("cap"), "{msg}");
            assert!(msg.contains(&cap.to_string()), "{msg}");
        }
        other => panic!("expected a HostMemory error, got {other:?}"),
    }
    // The failed call left nothing behind.
    let st = s.stats();
    assert_eq!(st.live_handles, 2);
    assert_eq!(st.pool.in_use_bytes, cap);
    s.release(h1).unwrap();
    let h3 = offload(&mut s, &src).unwrap();
    assert_eq!(fetch(&mut s, h3), src);
    assert_eq!(fetch(&mut s, h2), src);
    assert_eq!(s.stats().pool.allocations, 2);
}

#[test]
fn host_cap_frees_idle_blocks_of_other_sizes_first() {
    let big = 500_000;
    let mut s = Scheduler::new(HostTransport::new(), 1, Some(size_class(big).unwrap()));
    let small = pattern(100_000, 4);
    let h = offload(&mut s, &small).unwrap();
    s.release(h).unwrap();
    let large = pattern(big, 5);
    let h = offload(&mut s, &large).unwrap();
    assert_eq!(fetch(&mut s, h), large);
    assert_eq!(s.stats().pool.pinned_bytes, size_class(big).unwrap());
}

#[test]
fn pinning_failure_falls_back_to_pageable_memory_with_one_warning() {
    let mut s = Scheduler::new(HostTransport::new().refusing_pinning(), 1, None);
    let a = pattern(50_000, 6);
    let h1 = offload(&mut s, &a).unwrap();
    let h2 = offload(&mut s, &a).unwrap();
    let w = s.take_warning().expect("a warning after the first failure");
    assert!(w.contains("pageable"), "{w}");
    assert!(s.take_warning().is_none(), "the warning is given once");
    assert_eq!(fetch(&mut s, h1), a);
    assert_eq!(fetch(&mut s, h2), a);
    let st = s.stats().pool;
    assert_eq!(st.pinned_bytes, 0);
    assert_eq!(st.pageable_bytes, 2 * size_class(50_000).unwrap());
    assert_eq!(st.pageable_fallbacks, 2);
}

#[test]
fn misuse_is_reported_not_ignored() {
    let mut s = Scheduler::new(HostTransport::new(), 1, None);
    let a = pattern(1000, 7);
    let mut dst = vec![0u8; 1000];
    let d = dst.as_mut_ptr() as usize;
    let h = offload(&mut s, &a).unwrap();
    let is_offload_err = |r: rslora_fast::Result<()>| matches!(r, Err(Error::Offload(_)));
    // Waiting right after the offload orders the compute stream after the copy out (frees the source).
    s.wait(h, S).unwrap();
    assert!(is_offload_err(s.release(h + 100)), "unknown handle");
    // SAFETY: `dst` holds 1000 bytes and outlives the copies.
    assert!(is_offload_err(unsafe { s.prefetch(h, 0, S) }), "null dst");
    unsafe { s.prefetch(h, d, S).unwrap() };
    // SAFETY: as above.
    assert!(
        is_offload_err(unsafe { s.prefetch(h, d, S) }),
        "double prefetch"
    );
    s.wait(h, S).unwrap();
    s.wait(h, S).unwrap(); // waiting twice is harmless
    s.release(h).unwrap();
    assert!(is_offload_err(s.release(h)), "double release");
    assert!(is_offload_err(s.wait(h, S)), "wait after release");
    // SAFETY: the calls are rejected before any copy.
    assert!(matches!(
        unsafe { s.offload(0, 10, S) },
        Err(Error::Offload(_))
    ));
    assert!(matches!(
        unsafe { s.offload(a.as_ptr() as usize, 0, S) },
        Err(Error::Offload(_))
    ));
    assert_eq!(dst, a);
    assert_eq!(s.stats().pool.in_use_bytes, 0);
}

#[test]
fn a_block_released_while_its_copy_to_host_is_in_flight_is_not_reused_early() {
    let n = 64 * 1024 + 5;
    let mut s = Scheduler::new(HostTransport::deferred(), 1, None);
    let a = pattern(n, 8);
    let b = pattern(n, 9);
    let h1 = offload(&mut s, &a).unwrap();
    assert_eq!(s.transport_mut().in_flight(), 1);
    s.release(h1).unwrap();
    assert_eq!(s.stats().pool.pending_blocks, 1);
    // Same size class: had h1's block been handed out, h1's late copy would overwrite b's bytes.
    let h2 = offload(&mut s, &b).unwrap();
    assert_eq!(
        s.stats().pool.allocations,
        2,
        "a second block, not the busy one"
    );
    assert_eq!(fetch(&mut s, h2), b);
    s.release(h2).unwrap();
    // Both copies have run now: the next offload reuses a block.
    let h3 = offload(&mut s, &a).unwrap();
    assert_eq!(s.stats().pool.allocations, 2);
    assert_eq!(fetch(&mut s, h3), a);
}

#[test]
fn under_a_cap_a_busy_block_is_waited_for_instead_of_failing() {
    let n = 100_000;
    let mut s = Scheduler::new(HostTransport::deferred(), 1, Some(size_class(n).unwrap()));
    let a = pattern(n, 10);
    let b = pattern(n, 11);
    let h1 = offload(&mut s, &a).unwrap();
    s.release(h1).unwrap();
    let h2 = offload(&mut s, &b).unwrap();
    assert_eq!(
        s.stats().pool.allocations,
        1,
        "the one block, after its copy finished"
    );
    assert_eq!(fetch(&mut s, h2), b);
}

#[test]
fn a_block_released_while_its_copy_to_device_is_in_flight_is_not_reused_early() {
    let n = 70_000;
    let mut s = Scheduler::new(HostTransport::deferred(), 1, None);
    let a = pattern(n, 12);
    let b = pattern(n, 13);
    let mut dst = vec![0u8; n];
    let h1 = offload(&mut s, &a).unwrap();
    // SAFETY: `dst` holds n bytes and outlives the copies (run below).
    unsafe { s.prefetch(h1, dst.as_mut_ptr() as usize, S).unwrap() };
    s.release(h1).unwrap(); // released with both copies still queued
    let h2 = offload(&mut s, &b).unwrap();
    assert_eq!(
        s.stats().pool.allocations,
        2,
        "a second block, not the busy one"
    );
    s.transport_mut().synchronize_all().unwrap();
    assert_eq!(dst, a, "the late copy back read h1's bytes, not h2's");
    assert_eq!(fetch(&mut s, h2), b);
}

#[test]
fn lookahead_prefetches_the_previous_layers_in_backward_order() {
    for depth in [0usize, 1, 2, 3] {
        let mut s = Scheduler::new(HostTransport::deferred(), depth, None);
        let layers = 6;
        let srcs: Vec<Vec<u8>> = (0..layers).map(|i| pattern(5000 + i, i as u32)).collect();
        // Forward: every layer but the last is offloaded.
        let hs: Vec<u64> = srcs[..layers - 1]
            .iter()
            .map(|b| offload(&mut s, b).unwrap())
            .collect();
        let last_marker = s.next_handle();
        let mut order = Vec::new();
        let mut bufs: Vec<Vec<u8>> = srcs.iter().map(|b| vec![0u8; b.len()]).collect();
        // Backward: layer i first plans ahead, then (if offloaded) makes sure its own input comes.
        for i in (0..layers).rev() {
            let before = if i == layers - 1 { last_marker } else { hs[i] };
            for h in s.plan_prefetch(before) {
                let j = hs.iter().position(|&x| x == h).unwrap();
                // SAFETY: bufs[j] is sized for layer j and outlives the copies.
                unsafe { s.prefetch(h, bufs[j].as_mut_ptr() as usize, S).unwrap() };
                order.push(j);
            }
            // Never more than `depth` handles ahead of the current layer are in flight.
            let ahead = hs[..i.min(layers - 1)]
                .iter()
                .filter(|&&h| s.state(h).unwrap() != HandleState::Offloaded)
                .count();
            assert!(ahead <= depth, "depth {depth}: {ahead} ahead at layer {i}");
            if i < layers - 1 {
                if s.state(hs[i]).unwrap() == HandleState::Offloaded {
                    assert_eq!(depth, 0, "with lookahead the input was prefetched earlier");
                    // SAFETY: as above.
                    unsafe { s.prefetch(hs[i], bufs[i].as_mut_ptr() as usize, S).unwrap() };
                    order.push(i);
                }
                s.wait(hs[i], S).unwrap();
                assert_eq!(bufs[i], srcs[i]);
                s.release(hs[i]).unwrap();
            }
        }
        let expected: Vec<usize> = (0..layers - 1).rev().collect();
        assert_eq!(order, expected, "depth {depth}");
        assert_eq!(s.stats().pool.in_use_bytes, 0);
    }
}

#[test]
fn lookahead_plan_skips_released_and_prefetched_handles() {
    let mut s = Scheduler::new(HostTransport::new(), 2, None);
    let a = pattern(100, 1);
    let hs: Vec<u64> = (0..4).map(|_| offload(&mut s, &a).unwrap()).collect();
    assert_eq!(s.plan_prefetch(s.next_handle()), vec![hs[3], hs[2]]);
    let mut d = vec![0u8; 100];
    // SAFETY: `d` holds 100 bytes; the host transport copies at once.
    unsafe { s.prefetch(hs[3], d.as_mut_ptr() as usize, S).unwrap() };
    assert_eq!(s.plan_prefetch(s.next_handle()), vec![hs[2]]);
    s.release(hs[3]).unwrap();
    assert_eq!(s.plan_prefetch(s.next_handle()), vec![hs[2], hs[1]]);
    assert_eq!(s.plan_prefetch(hs[1]), vec![hs[0]]);
    assert!(s.plan_prefetch(hs[0]).is_empty());
}

#[test]
fn cuda_transport_round_trips_through_device_memory_when_a_gpu_exists() {
    use cudarc::driver::sys;
    if rslora_fast::cuda::device_count() == 0 {
        eprintln!("no CUDA device: skipped");
        return;
    }
    let t = rslora_fast::offload::CudaTransport::new(0).unwrap();
    assert_ne!(t.copy_stream(), 0);
    let mut s = Scheduler::new(t, 1, None);
    let a = pattern((1 << 20) + 3, 2);
    let n = a.len();
    // Test-only device buffers (the library itself never allocates device memory).
    let mut d1: sys::CUdeviceptr = 0;
    let mut d2: sys::CUdeviceptr = 0;
    // SAFETY: the primary context is current (CudaTransport::new bound it on this thread); the
    // copies below stay within the n bytes allocated, and everything is synchronized before free.
    unsafe {
        assert_eq!(sys::cuMemAlloc_v2(&mut d1, n), sys::CUresult::CUDA_SUCCESS);
        assert_eq!(sys::cuMemAlloc_v2(&mut d2, n), sys::CUresult::CUDA_SUCCESS);
        assert_eq!(
            sys::cuMemcpyHtoD_v2(d1, a.as_ptr() as *const std::ffi::c_void, n),
            sys::CUresult::CUDA_SUCCESS
        );
        let h = s.offload(d1 as usize, n, S).unwrap();
        s.prefetch(h, d2 as usize, S).unwrap();
        s.wait(h, S).unwrap();
        let mut back = vec![0u8; n];
        // The legacy default stream (S) waits for the copy back, and this copy runs on it.
        assert_eq!(
            sys::cuMemcpyDtoH_v2(back.as_mut_ptr() as *mut std::ffi::c_void, d2, n),
            sys::CUresult::CUDA_SUCCESS
        );
        assert_eq!(back, a);
        s.release(h).unwrap();
        s.trim().unwrap();
        sys::cuMemFree_v2(d1);
        sys::cuMemFree_v2(d2);
    }
    assert_eq!(s.stats().pool.pinned_bytes, 0);
    assert_eq!(s.stats().pool.allocations, 1);
}

#[test]
fn huge_requests_are_errors_not_a_wrapped_size_class() {
    // size_class(usize::MAX) used to wrap to 0 and hand out a 0-byte block.
    assert!(matches!(
        size_class(usize::MAX),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        size_class(rslora_fast::offload::MAX_REQUEST + 1),
        Err(Error::InvalidArgument(_))
    ));
    let mut s = Scheduler::new(HostTransport::new(), 1, None);
    let src = [1u8; 16];
    for n in [usize::MAX, isize::MAX as usize, usize::MAX - 4096] {
        // SAFETY: the call is rejected before any byte at `src` is read.
        let r = unsafe { s.offload(src.as_ptr() as usize, n, S) };
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{n}: {r:?}");
    }
    // SAFETY: as above: the address range wraps, so nothing is read.
    let r = unsafe { s.offload(usize::MAX - 8, 16, S) };
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    assert_eq!(s.stats().pool.in_use_bytes, 0);
    let h = offload(&mut s, &src).unwrap();
    // SAFETY: rejected before the copy: the destination range wraps.
    let r = unsafe { s.prefetch(h, usize::MAX - 8, S) };
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    assert_eq!(fetch(&mut s, h), src.to_vec());
}

#[test]
fn releasing_more_than_in_use_is_an_error_not_a_wrapped_counter() {
    use rslora_fast::offload::HostPool;
    let mut t = HostTransport::new();
    let mut a: HostPool<HostTransport> = HostPool::new(None);
    let mut b: HostPool<HostTransport> = HostPool::new(None);
    let block = a.acquire(&mut t, 100).unwrap();
    // `b` never handed this block out: its in-use counter must not wrap below zero.
    let r = b.release(&mut t, block, None);
    assert!(matches!(r, Err(Error::Offload(_))), "{r:?}");
    assert_eq!(b.stats().in_use_bytes, 0);
}
