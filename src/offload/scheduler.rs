//! The offload scheduler: handles for activations parked in the host pool.
//!
//! Life of a handle: [`Scheduler::offload`] (device to host, on the copy stream, after an event on
//! the compute stream) -> [`Scheduler::prefetch`] (host to device into a buffer the caller
//! allocated) -> [`Scheduler::wait`] (the compute stream waits for that copy; the host does not)
//! -> [`Scheduler::release`] (the block goes back to the pool, held back while its copy may still
//! be in flight). Handles are numbered in offload order.
//!
//! The training step drives it by layer boundaries ([`Scheduler::begin_layer`] in forward,
//! [`Scheduler::backward_plan`] in backward); the [`Policy`] decides, the scheduler carries out.
//! Device memory a copy reads or writes is held by a *lease* (`L`, opaque here: a tensor for the
//! Python binding) until the compute stream has waited for that copy; only then does the lease go
//! to [`Scheduler::take_freed`], so the caller's allocator reuses the memory in stream order
//! (no `record_stream`, whose host-side bookkeeping keeps blocks busy while the host runs ahead).
//! A source is waited for once the next layer's input is offloaded (one layer of overlap); a
//! prefetch buffer when its layer takes it ([`Scheduler::take_ready`]) or is released.

use std::collections::BTreeMap;

use super::policy::{BudgetStats, LayerPlan, Policy, PolicyConfig, Tag};
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

struct Entry<E, L, M> {
    block: Block,
    nbytes: usize,
    state: HandleState,
    /// Event of the last copy that touched the block.
    last_copy: E,
    /// The stream the copies were ordered after, waited on before a lease is let go.
    compute: RawStream,
    tag: Tag,
    /// The source a copy to host may still read (until settled).
    src: Option<L>,
    /// The destination a copy back may still write (until taken or released).
    dst: Option<L>,
    /// What the caller needs to allocate a destination (e.g. shape and dtype).
    meta: M,
}

/// One scheduler action, recorded when tracing is on (tests, and callers checking the order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// A tensor of this tag went to the host.
    Offload(Tag),
    /// Its copy back started.
    Prefetch(Tag),
    /// The compute stream waits for its copy back; the layer may read it.
    Ready(Tag),
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
/// `L` is a lease on device memory (dropped by the caller, from [`Scheduler::take_freed`]), `M`
/// the caller's description of an offloaded buffer.
pub struct Scheduler<T: Transport, L = (), M = ()> {
    transport: T,
    pool: HostPool<T>,
    entries: BTreeMap<u64, Entry<T::Event, L, M>>,
    next_id: u64,
    policy: Policy,
    freed: Vec<L>,
    trace: Option<Vec<Action>>,
    stats: SchedulerStats,
}

impl<T: Transport> Scheduler<T> {
    /// A scheduler over `transport` with only a lookahead policy (no budget, no last layer, no
    /// token minimum); `host_cap_bytes` bounds the host pool.
    pub fn new(transport: T, lookahead: usize, host_cap_bytes: Option<usize>) -> Self {
        let cfg = PolicyConfig {
            lookahead,
            ..PolicyConfig::default()
        };
        Scheduler::with_policy(transport, cfg, host_cap_bytes)
    }
}

impl<T: Transport, L, M: Clone + Default> Scheduler<T, L, M> {
    /// A scheduler over `transport` following `policy`; `host_cap_bytes` bounds the host pool.
    pub fn with_policy(transport: T, policy: PolicyConfig, host_cap_bytes: Option<usize>) -> Self {
        Scheduler {
            transport,
            pool: HostPool::new(host_cap_bytes),
            entries: BTreeMap::new(),
            next_id: 1,
            policy: Policy::new(policy),
            freed: Vec::new(),
            trace: None,
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
        self.policy.config().lookahead
    }

    /// The policy (its configuration and the pass in progress).
    pub fn policy(&self) -> &Policy {
        &self.policy
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
    /// `compute`; returns the handle. Outside any pass: the schedule never prefetches it.
    ///
    /// # Safety
    /// `src` must be a device address (a host address for the host transport) readable for
    /// `nbytes` until the copy completes: keep the memory alive and unmodified until `compute`
    /// has waited for it ([`Scheduler::wait`]).
    pub unsafe fn offload(&mut self, src: usize, nbytes: usize, compute: RawStream) -> Result<u64> {
        let tag = Tag {
            pass: 0,
            layer: usize::MAX,
        };
        // SAFETY: forwarded from the caller.
        unsafe { self.offload_tagged(src, nbytes, compute, tag, None, M::default()) }
    }

    /// Forward reaches `layer` with `tokens` tokens: the policy's plan for it, and the pass it
    /// belongs to. A layer that keeps its input on the device lets every earlier copy out finish
    /// first (nothing later would overlap them).
    pub fn begin_layer(
        &mut self,
        layer: usize,
        tokens: usize,
        offloadable: bool,
    ) -> Result<(u64, LayerPlan)> {
        let pool = self.pool.stats();
        let room = pool
            .cap_bytes
            .map(|cap| cap.saturating_sub(pool.in_use_bytes) as u64);
        self.policy.set_host_room(room);
        let (pass, plan) = self.policy.begin_layer(layer, tokens, offloadable);
        if !matches!(plan, LayerPlan::Offload | LayerPlan::Save) {
            self.settle_all()?;
        }
        Ok((pass, plan))
    }

    /// Offload the input of `layer` in the pass in progress, holding `lease` (the source) until
    /// the compute stream has waited for the copy: that happens when the next layer's input is
    /// offloaded (or a layer keeps its input), so each copy overlaps one layer of compute.
    ///
    /// # Safety
    /// As [`Scheduler::offload`]; `lease` must keep `src` alive and unmodified.
    pub unsafe fn offload_layer(
        &mut self,
        layer: usize,
        src: usize,
        nbytes: usize,
        compute: RawStream,
        lease: L,
        meta: M,
    ) -> Result<u64> {
        let tag = Tag {
            pass: self.policy.pass(),
            layer,
        };
        // SAFETY: forwarded from the caller.
        let id = unsafe { self.offload_tagged(src, nbytes, compute, tag, Some(lease), meta)? };
        self.policy.count_parked(nbytes);
        self.settle_older_than(tag)?;
        Ok(id)
    }

    /// A tensor saved for backward by `layer`, a [`LayerPlan::Save`] layer: the policy keeps it
    /// on the device (`Ok(None)`: the lease is given back at once) or parks it on the host like
    /// [`Scheduler::offload_layer`] (`Ok(Some(handle))`).
    ///
    /// # Safety
    /// As [`Scheduler::offload_layer`].
    pub unsafe fn pack_layer(
        &mut self,
        layer: usize,
        src: usize,
        nbytes: usize,
        compute: RawStream,
        lease: L,
        meta: M,
    ) -> Result<Option<u64>> {
        if self.policy.pack(nbytes) {
            self.freed.push(lease);
            return Ok(None);
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.offload_layer(layer, src, nbytes, compute, lease, meta) }.map(Some)
    }

    /// Backward reaches `layer` of `pass`: the handles to copy back now, in order, with their
    /// size and description (the caller allocates each destination and calls
    /// [`Scheduler::prefetch_leased`]). When `own` (this layer's input) was not among the earlier
    /// prefetches it comes last.
    pub fn backward_plan(&self, pass: u64, layer: usize, own: Option<u64>) -> Vec<(u64, usize, M)> {
        let offloaded = self
            .entries
            .iter()
            .map(|(&id, e)| (id, e.tag, e.state != HandleState::Offloaded));
        let mut ids = self.policy.prefetch_order(pass, layer, offloaded);
        if let Some(h) = own {
            if self
                .entries
                .get(&h)
                .is_some_and(|e| e.state == HandleState::Offloaded)
            {
                ids.push(h);
            }
        }
        ids.into_iter()
            .map(|id| {
                let e = &self.entries[&id];
                (id, e.nbytes, e.meta.clone())
            })
            .collect()
    }

    /// Start copying `handle` back into `dst`, holding `lease` (the destination) until the compute
    /// stream waits for it; a handle already on its way back is left alone (its lease is freed).
    ///
    /// # Safety
    /// As [`Scheduler::prefetch`]; `lease` must keep `dst` alive.
    pub unsafe fn prefetch_leased(
        &mut self,
        handle: u64,
        dst: usize,
        compute: RawStream,
        lease: L,
    ) -> Result<()> {
        if self.state(handle)? != HandleState::Offloaded {
            self.freed.push(lease);
            return Ok(());
        }
        self.settle(handle)?;
        // SAFETY: forwarded from the caller.
        unsafe { self.prefetch(handle, dst, compute)? };
        let e = self
            .entries
            .get_mut(&handle)
            .ok_or_else(|| unknown(handle))?;
        e.dst = Some(lease);
        Ok(())
    }

    /// Order `compute` after `handle`'s copy back and hand its destination lease to the caller:
    /// the buffer may now be read on `compute`.
    pub fn take_ready(&mut self, handle: u64, compute: RawStream) -> Result<Option<L>> {
        self.wait(handle, compute)?;
        let e = self
            .entries
            .get_mut(&handle)
            .ok_or_else(|| unknown(handle))?;
        Ok(e.dst.take())
    }

    /// Leases the scheduler no longer needs (the compute stream has waited for their copies);
    /// the caller drops them, outside any lock the scheduler sits behind.
    pub fn take_freed(&mut self) -> Vec<L> {
        std::mem::take(&mut self.freed)
    }

    /// Whether `layer`'s saved bytes should be measured on its next recompute (budget mode).
    pub fn wants_measure(&self, layer: usize) -> bool {
        self.policy.wants_measure(layer)
    }

    /// Record `layer`'s measured saved bytes and forward seconds at `tokens` tokens.
    pub fn record_layer_cost(&mut self, layer: usize, bytes: u64, seconds: f64, tokens: usize) {
        self.policy.record_layer_cost(layer, bytes, seconds, tokens)
    }

    /// Change the device budget (from the next pass on).
    pub fn set_budget(&mut self, budget_bytes: Option<u64>) {
        self.policy.set_budget(budget_bytes)
    }

    /// What the memory budget kept in the latest pass.
    pub fn budget_stats(&self) -> BudgetStats {
        self.policy.budget_stats()
    }

    /// Start (or stop) recording actions; starting clears the record.
    pub fn set_trace(&mut self, on: bool) {
        self.trace = on.then(Vec::new);
    }

    /// The actions recorded since tracing started.
    pub fn trace(&self) -> &[Action] {
        self.trace.as_deref().unwrap_or(&[])
    }

    fn record(&mut self, handle: u64, action: fn(Tag) -> Action) {
        if let (Some(t), Some(e)) = (self.trace.as_mut(), self.entries.get(&handle)) {
            if e.tag.pass > 0 {
                t.push(action(e.tag));
            }
        }
    }

    /// Order `compute` after `handle`'s copy out and let its source go.
    fn settle(&mut self, handle: u64) -> Result<()> {
        let e = self
            .entries
            .get_mut(&handle)
            .ok_or_else(|| unknown(handle))?;
        if let Some(src) = e.src.take() {
            self.transport.wait(e.last_copy, e.compute)?;
            self.freed.push(src);
        }
        Ok(())
    }

    /// Settle the copies out of earlier layers (and other passes): each layer's copies overlap
    /// the compute up to the next layer's first copy.
    fn settle_older_than(&mut self, tag: Tag) -> Result<()> {
        self.settle_where(|t| t.pass != tag.pass || t.layer < tag.layer)
    }

    fn settle_all(&mut self) -> Result<()> {
        self.settle_where(|_| true)
    }

    /// Settle every handle whose source a copy out may still read and whose tag `pick` accepts.
    fn settle_where(&mut self, pick: impl Fn(Tag) -> bool) -> Result<()> {
        let busy: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.src.is_some() && pick(e.tag))
            .map(|(&id, _)| id)
            .collect();
        busy.into_iter().try_for_each(|id| self.settle(id))
    }

    /// # Safety
    /// As [`Scheduler::offload`].
    unsafe fn offload_tagged(
        &mut self,
        src: usize,
        nbytes: usize,
        compute: RawStream,
        tag: Tag,
        lease: Option<L>,
        meta: M,
    ) -> Result<u64> {
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
                compute,
                tag,
                src: lease,
                dst: None,
                meta,
            },
        );
        self.stats.offloads += 1;
        self.stats.bytes_to_host += nbytes as u64;
        self.record(id, Action::Offload);
        Ok(id)
    }

    /// Start copying a handle's bytes back into device address `dst` (allocated by the caller
    /// for `nbytes(handle)` bytes), after the work queued so far on `compute`.
    ///
    /// # Safety
    /// `dst` must be writable for `nbytes(handle)` bytes until the copy completes (keep it alive
    /// until `compute` has waited for the copy, [`Scheduler::wait`], before reading it).
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
        entry.compute = compute;
        self.stats.prefetches += 1;
        self.stats.bytes_to_device += entry.nbytes as u64;
        self.record(handle, Action::Prefetch);
        Ok(())
    }

    /// Make `compute` wait for the handle's latest copy; the host does not block. After a
    /// prefetch, the device buffer given to [`Scheduler::prefetch`] may then be read on `compute`;
    /// right after an offload, the source may then be freed or overwritten in `compute`'s order.
    pub fn wait(&mut self, handle: u64, compute: RawStream) -> Result<()> {
        let entry = self
            .entries
            .get_mut(&handle)
            .ok_or_else(|| unknown(handle))?;
        match entry.state {
            HandleState::Offloaded => self.transport.wait(entry.last_copy, compute),
            HandleState::Prefetched | HandleState::Ready => {
                self.transport.wait(entry.last_copy, compute)?;
                let first = entry.state == HandleState::Prefetched;
                entry.state = HandleState::Ready;
                if first {
                    self.record(handle, Action::Ready);
                }
                Ok(())
            }
        }
    }

    /// Release a handle: its block returns to the pool (reused only once its last copy has
    /// finished) and its leases, once the compute stream has waited for that copy, to
    /// [`Scheduler::take_freed`]. Releasing an unknown or already released handle is an error.
    pub fn release(&mut self, handle: u64) -> Result<()> {
        let mut entry = self
            .entries
            .remove(&handle)
            .ok_or_else(|| unknown(handle))?;
        let leases: Vec<L> = entry
            .src
            .take()
            .into_iter()
            .chain(entry.dst.take())
            .collect();
        if !leases.is_empty() {
            // A copy nobody waited for (an abandoned graph, an error): order the compute stream
            // after it before its memory goes back to the caller's allocator.
            let waited = self.transport.wait(entry.last_copy, entry.compute);
            self.freed.extend(leases);
            if let Err(e) = waited {
                self.pool
                    .release(&mut self.transport, entry.block, Some(entry.last_copy))?;
                return Err(e);
            }
        }
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

    /// The lookahead policy by handle order alone: among live handles offloaded before `before`
    /// (an id from [`Scheduler::next_handle`] or a handle), the `lookahead` most recent ones,
    /// newest first, that have not been prefetched yet (for callers outside the layer schedule).
    pub fn plan_prefetch(&self, before: u64) -> Vec<u64> {
        self.entries
            .range(..before)
            .rev()
            .take(self.lookahead())
            .filter(|(_, e)| e.state == HandleState::Offloaded)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Wait for every copy in flight and free the idle host blocks (live handles keep theirs).
    pub fn trim(&mut self) -> Result<()> {
        self.transport.synchronize_all()?;
        self.pool.trim(&mut self.transport)
    }

    fn entry(&self, handle: u64) -> Result<&Entry<T::Event, L, M>> {
        self.entries.get(&handle).ok_or_else(|| unknown(handle))
    }
}

fn unknown(handle: u64) -> Error {
    Error::Offload(format!(
        "unknown handle {handle} (never offloaded, or already released)"
    ))
}

impl<T: Transport, L, M> Drop for Scheduler<T, L, M> {
    fn drop(&mut self) {
        // Copies may still read or write our blocks (and the leased device memory): let them
        // finish before freeing anything.
        let _ = self.transport.synchronize_all();
        for (_, e) in std::mem::take(&mut self.entries) {
            let _ = self.pool.release(&mut self.transport, e.block, None);
        }
        self.pool.clear(&mut self.transport);
    }
}
