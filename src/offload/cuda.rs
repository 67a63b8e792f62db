//! The CUDA transport: pinned host blocks (`cuMemHostAlloc`) and async copies on a copy stream we
//! create and own (`CU_STREAM_NON_BLOCKING`, so it never serializes with PyTorch's streams),
//! ordered against the caller's compute stream by events (`CU_EVENT_DISABLE_TIMING`, the cheap
//! kind). The caller's stream and device memory are only borrowed, as plain integers.

use std::ffi::c_void;
use std::ptr::NonNull;

use cudarc::driver::sys;

use super::transport::Transport;
use crate::cuda::{bind_device, check, create_stream, RawStream};
use crate::{Error, Result};

/// A CUDA event created by a [`CudaTransport`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaEvent(usize);

impl CudaEvent {
    fn raw(self) -> sys::CUevent {
        self.0 as sys::CUevent
    }
}

/// Copies between device memory and pinned host blocks on our own stream of one device.
pub struct CudaTransport {
    device: i32,
    stream: usize,
    /// Idle events, reused so a step creates none.
    idle_events: Vec<CudaEvent>,
    /// Every event we created, destroyed on drop.
    all_events: Vec<CudaEvent>,
}

// SAFETY: the stream and events are driver handles usable from any thread once the device's
// primary context is current, which every method ensures with `bind_device`.
unsafe impl Send for CudaTransport {}

fn raw_stream(s: RawStream) -> sys::CUstream {
    s.0 as sys::CUstream
}

impl CudaTransport {
    /// A transport on device `device` (its primary context) with a fresh non-blocking stream.
    pub fn new(device: i32) -> Result<Self> {
        let _ctx = bind_device(device)?;
        let stream = create_stream("cuStreamCreate(offload copy stream)")?;
        Ok(CudaTransport {
            device,
            stream: stream as usize,
            idle_events: Vec::new(),
            all_events: Vec::new(),
        })
    }

    /// The device ordinal.
    pub fn device(&self) -> i32 {
        self.device
    }

    fn own_stream(&self) -> sys::CUstream {
        self.stream as sys::CUstream
    }

    fn event(&mut self) -> Result<CudaEvent> {
        if let Some(e) = self.idle_events.pop() {
            return Ok(e);
        }
        let mut ev: sys::CUevent = std::ptr::null_mut();
        // SAFETY: the primary context is current (callers bind first); writes one event handle.
        check(
            unsafe {
                sys::cuEventCreate(
                    &mut ev,
                    sys::CUevent_flags_enum::CU_EVENT_DISABLE_TIMING as u32,
                )
            },
            "cuEventCreate",
        )?;
        let e = CudaEvent(ev as usize);
        self.all_events.push(e);
        Ok(e)
    }

    /// Order our copy stream after everything queued so far on `compute`.
    fn follow(&mut self, compute: RawStream) -> Result<()> {
        let ev = self.event()?;
        // SAFETY: `ev` is our event; `compute` is a live stream of this device borrowed from the
        // caller. The wait captures the event's state now, so the event may be reused at once.
        let res = unsafe {
            check(
                sys::cuEventRecord(ev.raw(), raw_stream(compute)),
                "cuEventRecord(compute stream)",
            )
            .and_then(|_| {
                check(
                    sys::cuStreamWaitEvent(self.own_stream(), ev.raw(), 0),
                    "cuStreamWaitEvent(copy stream)",
                )
            })
        };
        self.idle_events.push(ev);
        res
    }

    /// Record an event on our copy stream after the copy just queued.
    fn mark(&mut self) -> Result<CudaEvent> {
        let ev = self.event()?;
        // SAFETY: our event on our stream.
        if let Err(e) = check(
            unsafe { sys::cuEventRecord(ev.raw(), self.own_stream()) },
            "cuEventRecord(copy stream)",
        ) {
            self.idle_events.push(ev);
            return Err(e);
        }
        Ok(ev)
    }

    /// Queue one copy on our stream after the work queued so far on `compute` and return the
    /// event that completes with it. `copy` makes the driver call (given our stream) that
    /// `context` names in the error.
    fn queue_copy(
        &mut self,
        compute: RawStream,
        context: &str,
        copy: impl FnOnce(sys::CUstream) -> sys::CUresult,
    ) -> Result<CudaEvent> {
        let _ctx = bind_device(self.device)?;
        self.follow(compute)?;
        check(copy(self.own_stream()), context)?;
        self.mark()
    }
}

impl Transport for CudaTransport {
    type Event = CudaEvent;

    fn name(&self) -> String {
        format!("cuda:{}", self.device)
    }

    fn copy_stream(&self) -> usize {
        self.stream
    }

    fn alloc_pinned(&mut self, bytes: usize) -> Result<NonNull<u8>> {
        let _ctx = bind_device(self.device)?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: writes one host pointer; PORTABLE makes the block pinned for every context.
        let res =
            unsafe { sys::cuMemHostAlloc(&mut p, bytes.max(1), sys::CU_MEMHOSTALLOC_PORTABLE) };
        check(res, "cuMemHostAlloc").map_err(|e| Error::HostMemory(e.to_string()))?;
        NonNull::new(p as *mut u8)
            .ok_or_else(|| Error::HostMemory("cuMemHostAlloc returned null".into()))
    }

    unsafe fn free_pinned(&mut self, ptr: NonNull<u8>, _bytes: usize) {
        let _ctx = bind_device(self.device).ok();
        // SAFETY: the caller guarantees `ptr` came from cuMemHostAlloc, once, with no copy in
        // flight. A failure here can only mean a dead context; nothing is left to do.
        let _ = unsafe { sys::cuMemFreeHost(ptr.as_ptr() as *mut c_void) };
    }

    unsafe fn copy_to_host(
        &mut self,
        dst: NonNull<u8>,
        src: usize,
        bytes: usize,
        compute: RawStream,
    ) -> Result<CudaEvent> {
        // SAFETY: the caller keeps `src` (device) and `dst` (host) valid for `bytes` until the
        // returned event completes; the copy runs on our stream after `compute`'s queued work.
        self.queue_copy(compute, "cuMemcpyDtoHAsync (offload)", |stream| unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                dst.as_ptr() as *mut c_void,
                src as sys::CUdeviceptr,
                bytes,
                stream,
            )
        })
    }

    unsafe fn copy_to_device(
        &mut self,
        dst: usize,
        src: NonNull<u8>,
        bytes: usize,
        compute: RawStream,
    ) -> Result<CudaEvent> {
        // SAFETY: as in copy_to_host, with the directions swapped.
        self.queue_copy(compute, "cuMemcpyHtoDAsync (prefetch)", |stream| unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                dst as sys::CUdeviceptr,
                src.as_ptr() as *const c_void,
                bytes,
                stream,
            )
        })
    }

    fn wait(&mut self, event: CudaEvent, compute: RawStream) -> Result<()> {
        let _ctx = bind_device(self.device)?;
        // SAFETY: our event; `compute` is the caller's live stream of this device.
        check(
            unsafe { sys::cuStreamWaitEvent(raw_stream(compute), event.raw(), 0) },
            "cuStreamWaitEvent(compute stream)",
        )
    }

    fn is_complete(&mut self, event: CudaEvent) -> Result<bool> {
        let _ctx = bind_device(self.device)?;
        // SAFETY: our event.
        let res = unsafe { sys::cuEventQuery(event.raw()) };
        if res == sys::CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check(res, "cuEventQuery")?;
        Ok(true)
    }

    fn synchronize(&mut self, event: CudaEvent) -> Result<()> {
        let _ctx = bind_device(self.device)?;
        // SAFETY: our event; blocks until the copy behind it has finished.
        check(
            unsafe { sys::cuEventSynchronize(event.raw()) },
            "cuEventSynchronize",
        )
    }

    fn recycle(&mut self, event: CudaEvent) {
        self.idle_events.push(event);
    }

    fn synchronize_all(&mut self) -> Result<()> {
        let _ctx = bind_device(self.device)?;
        // SAFETY: our stream.
        check(
            unsafe { sys::cuStreamSynchronize(self.own_stream()) },
            "cuStreamSynchronize(copy stream)",
        )
    }
}

impl Drop for CudaTransport {
    fn drop(&mut self) {
        // Errors here mean the context is already gone (interpreter shutdown); ignore them.
        let Ok(_ctx) = bind_device(self.device) else {
            return;
        };
        // SAFETY: our stream and events; the stream is drained before anything is destroyed.
        unsafe {
            let _ = sys::cuStreamSynchronize(self.own_stream());
            for e in self.all_events.drain(..) {
                let _ = sys::cuEventDestroy_v2(e.raw());
            }
            let _ = sys::cuStreamDestroy_v2(self.own_stream());
        }
    }
}
