//! The host-memory pool: page-locked blocks allocated once and reused step after step.
//!
//! Blocks are grouped in size classes of 16 steps per power of two, so a request wastes at most
//! 1/16 (6.25%) of its size and the pool stays under 1.1x the bytes it holds (power-of-two
//! rounding would waste up to 2x). A block released while a copy may still read or write it
//! waits on a pending list, with the copy's event, until that copy has finished; only then can it
//! be handed out again. An optional cap bounds the bytes the pool may reserve: when a request
//! would cross it, idle blocks of other classes are freed and in-flight blocks are waited for
//! before a clear [`Error::HostMemory`] is returned; the pool never blocks on something that
//! cannot finish.

use std::collections::BTreeMap;
use std::ptr::NonNull;

use super::transport::{alloc_pageable, free_pageable, Transport};
use crate::{Error, Result};

/// Smallest block; requests below it share this class.
pub const MIN_BLOCK: usize = 4096;

/// Largest request the pool accepts: its class must fit in `isize` (Rust's object size limit).
pub const MAX_REQUEST: usize = (isize::MAX as usize) / 2;

/// The size class (bytes actually reserved) for a request of `bytes`.
///
/// Up to 64 KiB: multiples of 4 KiB. Above: 16 steps per power of two, i.e. rounded up to a
/// multiple of `2^(floor(log2 bytes) - 4)`, which wastes at most 1/16 of the request. A request
/// above [`MAX_REQUEST`] is an [`Error::InvalidArgument`] (its class would not fit).
pub fn size_class(bytes: usize) -> Result<usize> {
    if bytes > MAX_REQUEST {
        return Err(Error::invalid(format!(
            "cannot reserve a host block of {bytes} bytes (at most {MAX_REQUEST})"
        )));
    }
    let b = bytes.max(1);
    if b <= 16 * MIN_BLOCK {
        return Ok(b.div_ceil(MIN_BLOCK) * MIN_BLOCK);
    }
    let step = 1usize << (usize::BITS - 1 - b.leading_zeros() - 4);
    b.div_ceil(step)
        .checked_mul(step)
        .ok_or_else(|| Error::invalid(format!("size class of {bytes} bytes overflows")))
}

/// One host block owned by the pool.
#[derive(Debug)]
pub struct Block {
    ptr: NonNull<u8>,
    bytes: usize,
    pinned: bool,
}

// SAFETY: a block is plain host memory owned by exactly one pool or handle at a time.
unsafe impl Send for Block {}

impl Block {
    /// Start of the block.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Bytes reserved (the size class).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the block is page-locked (false after the pageable fallback).
    pub fn pinned(&self) -> bool {
        self.pinned
    }
}

/// Counters of a pool (see [`HostPool::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes of page-locked blocks reserved.
    pub pinned_bytes: usize,
    /// Bytes of pageable blocks reserved (after a pinning failure).
    pub pageable_bytes: usize,
    /// Bytes of blocks handed out and not yet released.
    pub in_use_bytes: usize,
    /// Highest `in_use_bytes` seen.
    pub peak_in_use_bytes: usize,
    /// Blocks released whose copy may still be in flight.
    pub pending_blocks: usize,
    /// Number of block allocations made (reuse does not count).
    pub allocations: usize,
    /// Number of blocks that had to be pageable because pinning failed.
    pub pageable_fallbacks: usize,
    /// The configured cap on reserved bytes, if any.
    pub cap_bytes: Option<usize>,
}

/// Reusable host blocks for one transport. See the module docs.
pub struct HostPool<T: Transport> {
    free: BTreeMap<usize, Vec<Block>>,
    pending: Vec<(Block, T::Event)>,
    cap: Option<usize>,
    pin_failed: bool,
    warning: Option<String>,
    stats: PoolStats,
}

impl<T: Transport> HostPool<T> {
    /// An empty pool; `cap` bounds the bytes it may reserve.
    pub fn new(cap: Option<usize>) -> Self {
        HostPool {
            free: BTreeMap::new(),
            pending: Vec::new(),
            cap,
            pin_failed: false,
            warning: None,
            stats: PoolStats {
                cap_bytes: cap,
                ..PoolStats::default()
            },
        }
    }

    /// Current counters.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            pending_blocks: self.pending.len(),
            ..self.stats.clone()
        }
    }

    /// Bytes reserved, pinned or not.
    pub fn reserved_bytes(&self) -> usize {
        self.stats.pinned_bytes + self.stats.pageable_bytes
    }

    /// The one warning of the pageable fallback, handed out once (the caller logs it).
    pub fn take_warning(&mut self) -> Option<String> {
        self.warning.take()
    }

    /// A block of at least `bytes`: reused when one is idle, else allocated.
    pub fn acquire(&mut self, t: &mut T, bytes: usize) -> Result<Block> {
        let class = size_class(bytes)?;
        self.reap(t)?;
        let block = match self.pop_free(class) {
            Some(b) => b,
            None => self.make_room_and_alloc(t, class, bytes)?,
        };
        self.stats.in_use_bytes += block.bytes;
        self.stats.peak_in_use_bytes = self.stats.peak_in_use_bytes.max(self.stats.in_use_bytes);
        Ok(block)
    }

    /// Give a block back. `in_flight` is the event of the last copy that touched it, if that copy
    /// may not have finished; the block is reused only after it has.
    pub fn release(&mut self, t: &mut T, block: Block, in_flight: Option<T::Event>) -> Result<()> {
        // A block the pool did not hand out (or one released twice) would wrap the counter.
        self.stats.in_use_bytes = self
            .stats
            .in_use_bytes
            .checked_sub(block.bytes)
            .ok_or_else(|| {
                Error::Offload(format!(
                    "released a {}-byte block while only {} bytes are in use (double release?)",
                    block.bytes, self.stats.in_use_bytes
                ))
            })?;
        match in_flight {
            Some(ev) if !t.is_complete(ev)? => self.pending.push((block, ev)),
            Some(ev) => {
                t.recycle(ev);
                self.push_free(block);
            }
            None => self.push_free(block),
        }
        Ok(())
    }

    /// Free every idle block (after waiting for in-flight copies); blocks in use stay.
    pub fn trim(&mut self, t: &mut T) -> Result<()> {
        for (block, ev) in std::mem::take(&mut self.pending) {
            t.synchronize(ev)?;
            t.recycle(ev);
            self.push_free(block);
        }
        let classes: Vec<usize> = self.free.keys().copied().collect();
        for c in classes {
            for b in self.free.remove(&c).unwrap_or_default() {
                self.dealloc(t, b);
            }
        }
        Ok(())
    }

    fn push_free(&mut self, block: Block) {
        self.free.entry(block.bytes).or_default().push(block);
    }

    fn pop_free(&mut self, class: usize) -> Option<Block> {
        let list = self.free.get_mut(&class)?;
        let b = list.pop();
        if list.is_empty() {
            self.free.remove(&class);
        }
        b
    }

    /// Move blocks whose copies have finished from the pending list to the free lists.
    fn reap(&mut self, t: &mut T) -> Result<()> {
        let mut i = 0;
        while i < self.pending.len() {
            if t.is_complete(self.pending[i].1)? {
                let (block, ev) = self.pending.swap_remove(i);
                t.recycle(ev);
                self.push_free(block);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    fn make_room_and_alloc(&mut self, t: &mut T, class: usize, asked: usize) -> Result<Block> {
        if let Some(cap) = self.cap {
            while self.reserved_bytes().saturating_add(class) > cap {
                // Cheapest first: idle blocks of other classes are simply freed.
                if let Some((&c, _)) = self.free.iter().next_back() {
                    let b = self.pop_free(c).expect("class listed as non-empty");
                    self.dealloc(t, b);
                    continue;
                }
                // Then blocks whose last copy is still in flight: wait for the oldest one. A block
                // of the requested class is reused directly; any other is freed to make room.
                if self.pending.is_empty() {
                    return Err(self.cap_error(class, asked, cap));
                }
                let idx = self
                    .pending
                    .iter()
                    .position(|(b, _)| b.bytes == class)
                    .unwrap_or(0);
                let (block, ev) = self.pending.remove(idx);
                t.synchronize(ev)?;
                t.recycle(ev);
                if block.bytes == class {
                    return Ok(block);
                }
                self.dealloc(t, block);
            }
        }
        self.alloc(t, class)
    }

    fn cap_error(&self, class: usize, asked: usize, cap: usize) -> Error {
        Error::HostMemory(format!(
            "host-memory cap of {cap} bytes reached: offloading {asked} more bytes (a {class}-byte \
             block) would exceed it while {} bytes are held by live offloads; raise \
             host_cap_bytes, shorten the sequence, or use plain checkpointing",
            self.stats.in_use_bytes
        ))
    }

    fn alloc(&mut self, t: &mut T, class: usize) -> Result<Block> {
        if !self.pin_failed {
            match t.alloc_pinned(class) {
                Ok(ptr) => {
                    self.stats.pinned_bytes += class;
                    self.stats.allocations += 1;
                    return Ok(Block {
                        ptr,
                        bytes: class,
                        pinned: true,
                    });
                }
                Err(e) => {
                    // Sticky: once the system refuses page-locking, asking again each time only
                    // costs time. Copies from pageable memory are slower but still correct.
                    self.pin_failed = true;
                    self.warning = Some(format!(
                        "could not page-lock host memory on {} ({e}); offloaded activations use \
                         pageable memory from now on (slower copies, same results)",
                        t.name()
                    ));
                }
            }
        }
        let ptr = alloc_pageable(class)?;
        self.stats.pageable_bytes += class;
        self.stats.allocations += 1;
        self.stats.pageable_fallbacks += 1;
        Ok(Block {
            ptr,
            bytes: class,
            pinned: false,
        })
    }

    fn dealloc(&mut self, t: &mut T, b: Block) {
        if b.pinned {
            self.stats.pinned_bytes = self.stats.pinned_bytes.saturating_sub(b.bytes);
            // SAFETY: the block came from `alloc_pinned(b.bytes)`, is owned by the pool (so freed
            // once) and is idle: no copy touches it (pending blocks are synchronized first).
            unsafe { t.free_pinned(b.ptr, b.bytes) };
        } else {
            self.stats.pageable_bytes = self.stats.pageable_bytes.saturating_sub(b.bytes);
            // SAFETY: as above, for a block from `alloc_pageable(b.bytes)`.
            unsafe { free_pageable(b.ptr, b.bytes) };
        }
    }

    /// Free everything the pool still holds; called by the owner before the transport goes away.
    /// Blocks still in use are the owner's to release first.
    pub fn clear(&mut self, t: &mut T) {
        // Errors here can only come from a dead context at shutdown; the memory goes with it.
        let _ = self.trim(t);
    }
}
