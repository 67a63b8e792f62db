//! How bytes move between the device and the host pool.
//!
//! [`Transport`] is the seam between the scheduler's bookkeeping and the machine: the CUDA
//! transport ([`super::CudaTransport`]) copies on its own non-blocking stream, ordered after the
//! caller's compute stream by events; [`HostTransport`] does the same with plain `memcpy` so that
//! `cargo test` and the benches exercise every scheduler path without a GPU.

use std::alloc::Layout;
use std::collections::VecDeque;
use std::ptr::NonNull;

use crate::cuda::RawStream;
use crate::{Error, Result};

/// Alignment of every host block (a page, so pinned and pageable blocks look alike).
pub const HOST_ALIGN: usize = 4096;

/// A device (or, for [`HostTransport`], host) address plus the copy that moves it.
///
/// Implementations own their copy stream and events, never the caller's stream or memory.
pub trait Transport {
    /// Completion marker of one queued copy (a CUDA event, or a ticket for the host transport).
    type Event: Copy;

    /// Short name for messages (`"cuda:0"`, `"host"`).
    fn name(&self) -> String;

    /// The stream our copies run on, as an integer (0 when there is none), so Python can make
    /// PyTorch's caching allocator wait for it (`Tensor.record_stream`).
    fn copy_stream(&self) -> usize;

    /// Allocate `bytes` of page-locked host memory, aligned to [`HOST_ALIGN`].
    fn alloc_pinned(&mut self, bytes: usize) -> Result<NonNull<u8>>;

    /// Free a block from [`Transport::alloc_pinned`].
    ///
    /// # Safety
    /// `ptr` came from `alloc_pinned(bytes)` on this transport, is freed once, and no copy that
    /// touches it is still in flight.
    unsafe fn free_pinned(&mut self, ptr: NonNull<u8>, bytes: usize);

    /// Queue a copy of `bytes` from device address `src` into host `dst`, ordered after all work
    /// queued so far on `compute`. Returns the event that completes with the copy.
    ///
    /// # Safety
    /// `src` must stay readable and `dst` writable for `bytes` until the returned event completes.
    unsafe fn copy_to_host(
        &mut self,
        dst: NonNull<u8>,
        src: usize,
        bytes: usize,
        compute: RawStream,
    ) -> Result<Self::Event>;

    /// Queue a copy of `bytes` from host `src` into device address `dst`, ordered after all work
    /// queued so far on `compute` (so `dst`, fresh from the caller's allocator, is free to write).
    ///
    /// # Safety
    /// `dst` must stay writable and `src` readable for `bytes` until the returned event completes.
    unsafe fn copy_to_device(
        &mut self,
        dst: usize,
        src: NonNull<u8>,
        bytes: usize,
        compute: RawStream,
    ) -> Result<Self::Event>;

    /// Make `compute` wait for `event` on the device; the host does not block.
    fn wait(&mut self, event: Self::Event, compute: RawStream) -> Result<()>;

    /// Whether the copy behind `event` has finished.
    fn is_complete(&mut self, event: Self::Event) -> Result<bool>;

    /// Block the host until the copy behind `event` has finished.
    fn synchronize(&mut self, event: Self::Event) -> Result<()>;

    /// Give an event back once nobody will query or wait on it again.
    fn recycle(&mut self, event: Self::Event);

    /// Block the host until every copy queued so far has finished.
    fn synchronize_all(&mut self) -> Result<()>;
}

/// Allocate a page-aligned pageable block (the fallback when pinning fails, and the
/// [`HostTransport`]'s "pinned" memory).
pub(crate) fn alloc_pageable(bytes: usize) -> Result<NonNull<u8>> {
    let layout = Layout::from_size_align(bytes.max(1), HOST_ALIGN)
        .map_err(|e| Error::HostMemory(format!("bad host block size {bytes}: {e}")))?;
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { std::alloc::alloc(layout) };
    NonNull::new(p).ok_or_else(|| {
        Error::HostMemory(format!("the system refused a {bytes}-byte host allocation"))
    })
}

/// Free a block from [`alloc_pageable`].
///
/// # Safety
/// `ptr` came from `alloc_pageable(bytes)` and is freed once.
pub(crate) unsafe fn free_pageable(ptr: NonNull<u8>, bytes: usize) {
    // The same layout was valid at allocation time.
    if let Ok(layout) = Layout::from_size_align(bytes.max(1), HOST_ALIGN) {
        // SAFETY: the caller guarantees `ptr` was allocated with this layout.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
    }
}

/// One queued host copy (deferred mode).
struct HostCopy {
    ticket: u64,
    dst: usize,
    src: usize,
    bytes: usize,
}

/// The transport without a GPU: "device" addresses are host addresses and copies are `memcpy`.
///
/// By default copies run at once. In *deferred* mode they queue on a simulated copy stream and
/// run, in order, only when something waits for them ([`Transport::wait`],
/// [`Transport::synchronize`]) or [`HostTransport::run_one`] is called, so tests can observe the
/// scheduler's behaviour while copies are still in flight.
pub struct HostTransport {
    deferred: bool,
    refuse_pinning: bool,
    queue: VecDeque<HostCopy>,
    issued: u64,
    done: u64,
}

impl Default for HostTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl HostTransport {
    /// A transport whose copies complete immediately.
    pub fn new() -> Self {
        HostTransport {
            deferred: false,
            refuse_pinning: false,
            queue: VecDeque::new(),
            issued: 0,
            done: 0,
        }
    }

    /// A transport whose copies stay in flight until waited for (see the type docs).
    pub fn deferred() -> Self {
        HostTransport {
            deferred: true,
            ..Self::new()
        }
    }

    /// Make every pinned allocation fail, as on systems where page-locking is refused
    /// (RLIMIT_MEMLOCK, WSL2), to exercise the pageable fallback.
    pub fn refusing_pinning(mut self) -> Self {
        self.refuse_pinning = true;
        self
    }

    /// Number of copies queued but not yet run.
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }

    /// Run the oldest queued copy; false when none is queued.
    pub fn run_one(&mut self) -> bool {
        match self.queue.pop_front() {
            Some(c) => {
                // SAFETY: the scheduler's contract (see `copy_to_host` / `copy_to_device`) keeps
                // both ranges valid until the copy's ticket completes, which is now.
                unsafe {
                    std::ptr::copy_nonoverlapping(c.src as *const u8, c.dst as *mut u8, c.bytes)
                };
                self.done = c.ticket;
                true
            }
            None => false,
        }
    }

    fn run_until(&mut self, ticket: u64) {
        while self.done < ticket && self.run_one() {}
    }

    fn enqueue(&mut self, dst: usize, src: usize, bytes: usize) -> u64 {
        self.issued += 1;
        let ticket = self.issued;
        self.queue.push_back(HostCopy {
            ticket,
            dst,
            src,
            bytes,
        });
        if !self.deferred {
            self.run_until(ticket);
        }
        ticket
    }
}

impl Transport for HostTransport {
    type Event = u64;

    fn name(&self) -> String {
        "host".to_string()
    }

    fn copy_stream(&self) -> usize {
        0
    }

    fn alloc_pinned(&mut self, bytes: usize) -> Result<NonNull<u8>> {
        if self.refuse_pinning {
            return Err(Error::HostMemory(
                "page-locking refused (simulated by HostTransport::refusing_pinning)".into(),
            ));
        }
        alloc_pageable(bytes)
    }

    unsafe fn free_pinned(&mut self, ptr: NonNull<u8>, bytes: usize) {
        // SAFETY: forwarded caller contract; our pinned blocks are pageable blocks.
        unsafe { free_pageable(ptr, bytes) }
    }

    unsafe fn copy_to_host(
        &mut self,
        dst: NonNull<u8>,
        src: usize,
        bytes: usize,
        _compute: RawStream,
    ) -> Result<u64> {
        Ok(self.enqueue(dst.as_ptr() as usize, src, bytes))
    }

    unsafe fn copy_to_device(
        &mut self,
        dst: usize,
        src: NonNull<u8>,
        bytes: usize,
        _compute: RawStream,
    ) -> Result<u64> {
        Ok(self.enqueue(dst, src.as_ptr() as usize, bytes))
    }

    fn wait(&mut self, event: u64, _compute: RawStream) -> Result<()> {
        // The "compute stream" is the calling thread, so ordering after the copy means running it.
        self.run_until(event);
        Ok(())
    }

    fn is_complete(&mut self, event: u64) -> Result<bool> {
        Ok(self.done >= event)
    }

    fn synchronize(&mut self, event: u64) -> Result<()> {
        self.run_until(event);
        Ok(())
    }

    fn recycle(&mut self, _event: u64) {}

    fn synchronize_all(&mut self) -> Result<()> {
        while self.run_one() {}
        Ok(())
    }
}
