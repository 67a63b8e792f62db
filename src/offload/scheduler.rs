//! The offload scheduler: handles for activations parked in the host pool.
//!
//! Life of a handle: [`Scheduler::offload`] (device to host, on the copy stream, after an event on
//! the compute stream) -> [`Scheduler::prefetch`] (host to device into a buffer the caller
//! allocated) -> [`Scheduler::wait`] (the compute stream waits for that copy; the host does not)
//! -> [`Scheduler::release`] (the block goes back to the pool, held back while its copy may still
//! be in flight). Handles are numbered in offload order, which is what the lookahead policy
//! ([`Scheduler::plan_prefetch`]) walks backwards: while layer i recomputes, the inputs of layers
//! i-1 .. i-depth are already on their way back.

use std::collections::BTreeMap;

use super::pool::{Block, HostPool, PoolStats};
use super::transport::Transport;
use crate::cuda::RawStream;
use crate::{Error, Result};

/// Where a handle's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandleState {
    /// On the host (or on its way there).
    Offloaded,
    /// On its way back into the caller's device buffer; not yet ordered before compute.
    Prefetched,
    /// The compute stream waits for the copy back; the device buffer may be used.
    Ready,
}

struct Entry<E> {
    block: Block,
    nbytes: usize,
    state: HandleState,
    /// Event of the last copy that touched the block.
    last_copy: E,
}

/// Scheduler counters: the pool's plus the handle traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// The host pool's counters.
    pub pool: PoolStats,
    /// Handles offloaded and not yet released.
    pub live_handles: usize,
    /// Offloads since creation.
    pub offloads: u64,
    /// Prefetches since creation.
    pub prefetches: u64,
    /// Bytes copied device to host since creation.
    pub bytes_to_host: u64,
    /// Bytes copied host to device since creation.
    pub bytes_to_device: u64,
}

/// Offload bookkeeping over a [`Transport`]. Not thread-safe by itself; wrap it in a mutex to
/// share it (the Python binding does, since autograd runs backward on its own thread).
pub struct Scheduler<T: Transport> {
    transport: T,
    pool: HostPool<T>,
    entries: BTreeMap<u64, Entry<T::Event>>,
    next_id: u64,
    lookahead: usize,
    stats: SchedulerStats,
}

impl<T: Transport> Scheduler<T> {
    /// A scheduler over `transport`; `lookahead` is the prefetch depth, `host_cap_bytes` bounds
    /// the host pool.
    pub fn new(transport: T, lookahead: usize, host_cap_bytes: Option<usize>) -> Self {
        Scheduler {
            transport,
            pool: HostPool::new(host_cap_bytes),
            entries: BTreeMap::new(),
            next_id: 1,
            lookahead,
            stats: SchedulerStats::default(),
        }
    }

    /// The transport (e.g. to inspect the host transport's queue in tests).
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// The transport's copy stream as an integer (0 for the host transport).
    pub fn copy_stream(&self) -> usize {
        self.transport.copy_stream()
    }

    /// The prefetch depth.
    pub fn lookahead(&self) -> usize {
        self.lookahead
    }

    /// The id the next offload will get. Ids only grow, so "handles offloaded before this point"
    /// is `id < next_handle()` taken now.
    pub fn next_handle(&self) -> u64 {
        self.next_id
    }

    /// Current counters.
    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            pool: self.pool.stats(),
            live_handles: self.entries.len(),
            ..self.stats.clone()
        }
    }

    /// The pool's one pageable-fallback warning, handed out once.
    pub fn take_warning(&mut self) -> Option<String> {
        self.pool.take_warning()
    }

    /// State of a live handle.
    pub fn state(&self, handle: u64) -> Result<HandleState> {
        Ok(self.entry(handle)?.state)
    }

    /// Size in bytes of a live handle's data.
    pub fn nbytes(&self, handle: u64) -> Result<usize> {
        Ok(self.entry(handle)?.nbytes)
    }

    /// Copy `nbytes` at device address `src` to a host block, after the work queued so far on
    /// `compute`; returns the handle.
    ///
    /// # Safety
    /// `src` must be a device address (a host address for the host transport) readable for
    /// `nbytes` until the copy completes: keep the memory alive and unmodified past the copy
    /// stream's progress (from Python: `Tensor.record_stream` on the copy stream).
    pub unsafe fn offload(&mut self, src: usize, nbytes: usize, compute: RawStream) -> Result<u64> {
        if nbytes == 0 {
            return Err(Error::Offload("cannot offload an empty buffer".into()));
        }
        if src == 0 {
            return Err(Error::Offload("source address is null".into()));
        }
        if nbytes > super::pool::MAX_REQUEST || src.checked_add(nbytes).is_none() {
            return Err(Error::invalid(format!(
                "cannot offload {nbytes} bytes at {src:#x}: the size is out of range"
            )));
        }
        let block = self.pool.acquire(&mut self.transport, nbytes)?;
        // SAFETY: the block holds at least `nbytes` and is ours; the caller vouches for `src`.
        let copied = unsafe {
            self.transport
                .copy_to_host(block.ptr(), src, nbytes, compute)
        };
        let event = match copied {
            Ok(ev) => ev,
            Err(e) => {
                // Nothing was queued, so the block is idle again.
                self.pool.release(&mut self.transport, block, None)?;
                return Err(e);
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(
            id,
            Entry {
                block,
                nbytes,
                state: HandleState::Offloaded,
                last_copy: event,
            },
        );
        self.stats.offloads += 1;
        self.stats.bytes_to_host += nbytes as u64;
        Ok(id)
    }

    /// Start copying a handle's bytes back into device address `dst` (allocated by the caller
    /// for `nbytes(handle)` bytes), after the work queued so far on `compute`.
    ///
    /// # Safety
    /// `dst` must be writable for `nbytes(handle)` bytes until the copy completes (from Python:
    /// `Tensor.record_stream` on the copy stream, and [`Scheduler::wait`] before reading it).
    pub unsafe fn prefetch(&mut self, handle: u64, dst: usize, compute: RawStream) -> Result<()> {
        if dst == 0 {
            return Err(Error::Offload("destination address is null".into()));
        }
        let entry = self
            .entries
            .get_mut(&handle)
            .ok_or_else(|| unknown(handle))?;
        if dst.checked_add(entry.nbytes).is_none() {
            return Err(Error::invalid(format!(
                "destination {dst:#x} cannot hold {} bytes: the range wraps the address space",
                entry.nbytes
            )));
        }
        if entry.state != HandleState::Offloaded {
            return Err(Error::Offload(format!(
                "handle {handle} was already prefetched (state {:?})",
                entry.state
            )));
        }
        // SAFETY: the block holds `nbytes` bytes written by the earlier device-to-host copy, which
        // the copy stream orders before this one; the caller vouches for `dst`.
        let ev = unsafe {
            self.transport
                .copy_to_device(dst, entry.block.ptr(), entry.nbytes, compute)?
        };
        // Later copies on the one copy stream finish after earlier ones, so the new event covers
        // the old copy too.
        let old = std::mem::replace(&mut entry.last_copy, ev);
        self.transport.recycle(old);
        entry.state = HandleState::Prefetched;
        self.stats.prefetches += 1;
        self.stats.bytes_to_device += entry.nbytes as u64;
        Ok(())
    }

    /// Make `compute` wait for the handle's latest copy; the host does not block. After a
    /// prefetch, the device buffer given to [`Scheduler::prefetch`] may then be read on `compute`;
    /// right after an offload, the source may then be freed or overwritten in `compute`'s order
    /// (no `record_stream`, whose host-side bookkeeping keeps blocks busy while the host runs ahead).
    pub fn wait(&mut self, handle: u64, compute: RawStream) -> Result<()> {
        let entry = self
            .entries
            .get_mut(&handle)
            .ok_or_else(|| unknown(handle))?;
        match entry.state {
            HandleState::Offloaded => self.transport.wait(entry.last_copy, compute),
            HandleState::Prefetched | HandleState::Ready => {
                self.transport.wait(entry.last_copy, compute)?;
                entry.state = HandleState::Ready;
                Ok(())
            }
        }
    }

    /// Release a handle: its block returns to the pool (reused only once its last copy has
    /// finished). Releasing an unknown or already released handle is an error.
    pub fn release(&mut self, handle: u64) -> Result<()> {
        let entry = self
            .entries
            .remove(&handle)
            .ok_or_else(|| unknown(handle))?;
        self.pool
            .release(&mut self.transport, entry.block, Some(entry.last_copy))
    }

    /// Release every live handle (error recovery); returns how many there were.
    pub fn release_all(&mut self) -> Result<usize> {
        let ids: Vec<u64> = self.entries.keys().copied().collect();
        for id in &ids {
            self.release(*id)?;
        }
        Ok(ids.len())
    }

    /// The lookahead policy: among live handles offloaded before `before` (an id from
    /// [`Scheduler::next_handle`] or a handle), the `lookahead` most recent ones, newest first,
    /// that have not been prefetched yet. Handles already on their way count towards the depth,
    /// so calling this at the start of each layer's backward keeps `lookahead` copies ahead.
    pub fn plan_prefetch(&self, before: u64) -> Vec<u64> {
        self.entries
            .range(..before)
            .rev()
            .take(self.lookahead)
            .filter(|(_, e)| e.state == HandleState::Offloaded)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Wait for every copy in flight and free the idle host blocks (live handles keep theirs).
    pub fn trim(&mut self) -> Result<()> {
        self.transport.synchronize_all()?;
        self.pool.trim(&mut self.transport)
    }

    fn entry(&self, handle: u64) -> Result<&Entry<T::Event>> {
        self.entries.get(&handle).ok_or_else(|| unknown(handle))
    }
}

fn unknown(handle: u64) -> Error {
    Error::Offload(format!(
        "unknown handle {handle} (never offloaded, or already released)"
    ))
}

impl<T: Transport> Drop for Scheduler<T> {
    fn drop(&mut self) {
        // Copies may still read or write our blocks: let them finish before freeing anything.
        let _ = self.transport.synchronize_all();
        for (_, e) in std::mem::take(&mut self.entries) {
            let _ = self.pool.release(&mut self.transport, e.block, None);
        }
        self.pool.clear(&mut self.transport);
    }
}
