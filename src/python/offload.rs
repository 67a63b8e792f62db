//! Python bindings of `crate::offload`: one class, `OffloadScheduler`, over the host or the CUDA
//! transport. Pointers and streams arrive as plain integers (`Tensor.data_ptr()`,
//! `torch.cuda.current_stream().cuda_stream`) and are never owned.

use std::sync::{Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::guard;
use crate::cuda::RawStream;
use crate::offload::{CudaTransport, HandleState, HostTransport, Scheduler, SchedulerStats};
use crate::{Error, Result};

enum Inner {
    Host(Scheduler<HostTransport>),
    Cuda(Scheduler<CudaTransport>),
}

/// Run the same expression on whichever scheduler `inner` holds.
macro_rules! each {
    ($inner:expr, $s:ident => $body:expr) => {
        match $inner {
            Inner::Host($s) => $body,
            Inner::Cuda($s) => $body,
        }
    };
}

/// OffloadScheduler(device=None, lookahead=1, host_cap_bytes=None)
///
/// Moves activations between device memory and a reusable host-memory pool.
///
/// Args:
///     device: CUDA device index; copies run on a non-blocking stream of our own, ordered after
///         the caller's stream by events. ``None`` selects the host transport (plain ``memcpy``
///         between CPU addresses), used on machines without a GPU.
///     lookahead: how many earlier offloads :meth:`plan_prefetch` keeps in flight.
///     host_cap_bytes: upper bound on the host bytes the pool may reserve; reaching it raises
///         ``HostMemoryError``, a ``MemoryError`` (never blocks on something that cannot finish).
///
/// Life of a handle: :meth:`offload` -> :meth:`prefetch` -> :meth:`wait` -> :meth:`release`.
/// Methods may be called from any thread (autograd runs backward on its own thread).
#[pyclass(name = "OffloadScheduler", module = "rslora_fast._core")]
pub(crate) struct PyOffloadScheduler {
    inner: Mutex<Inner>,
    device: Option<i32>,
    copy_stream: usize,
    lookahead: usize,
}

impl PyOffloadScheduler {
    fn lock(&self) -> Result<MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| Error::Offload("scheduler lock poisoned by an earlier panic".into()))
    }
}

fn state_name(s: HandleState) -> &'static str {
    match s {
        HandleState::Offloaded => "offloaded",
        HandleState::Prefetched => "prefetched",
        HandleState::Ready => "ready",
    }
}

#[pymethods]
impl PyOffloadScheduler {
    #[new]
    #[pyo3(signature = (device=None, lookahead=1, host_cap_bytes=None))]
    fn new(device: Option<i32>, lookahead: usize, host_cap_bytes: Option<usize>) -> PyResult<Self> {
        guard(|| {
            let inner = match device {
                None => Inner::Host(Scheduler::new(
                    HostTransport::new(),
                    lookahead,
                    host_cap_bytes,
                )),
                Some(d) => Inner::Cuda(Scheduler::new(
                    CudaTransport::new(d)?,
                    lookahead,
                    host_cap_bytes,
                )),
            };
            let copy_stream = each!(&inner, s => s.copy_stream());
            Ok(PyOffloadScheduler {
                inner: Mutex::new(inner),
                device,
                copy_stream,
                lookahead,
            })
        })
    }

    /// The CUDA device index, or ``None`` for the host transport.
    #[getter]
    fn device(&self) -> Option<i32> {
        self.device
    }

    /// Our copy stream as an integer (``0`` for the host transport); wrap it in
    /// ``torch.cuda.ExternalStream`` to ``record_stream`` tensors a copy still touches.
    #[getter]
    fn copy_stream(&self) -> usize {
        self.copy_stream
    }

    /// The prefetch depth given at construction.
    #[getter]
    fn lookahead(&self) -> usize {
        self.lookahead
    }

    /// offload(src_ptr, nbytes, stream=0) -> int
    ///
    /// Copy ``nbytes`` at ``src_ptr`` to a host block after the work queued so far on
    /// ``stream``; returns the handle. The source must stay alive and unchanged until the copy
    /// finishes (``record_stream`` it on :attr:`copy_stream`).
    #[pyo3(signature = (src_ptr, nbytes, stream=0))]
    fn offload(
        &self,
        py: Python<'_>,
        src_ptr: usize,
        nbytes: usize,
        stream: usize,
    ) -> PyResult<u64> {
        py.detach(|| {
            guard(|| {
                let mut g = self.lock()?;
                // SAFETY: the Python caller passes the data_ptr of a live contiguous tensor of
                // `nbytes` bytes on our device, kept alive past the copy by record_stream.
                each!(&mut *g, s => unsafe { s.offload(src_ptr, nbytes, RawStream(stream)) })
            })
        })
    }

    /// prefetch(handle, dst_ptr, stream=0) -> None
    ///
    /// Start copying a handle's bytes back into ``dst_ptr`` (a buffer of at least
    /// ``nbytes(handle)`` bytes the caller allocated), after the work queued so far on ``stream``.
    #[pyo3(signature = (handle, dst_ptr, stream=0))]
    fn prefetch(&self, py: Python<'_>, handle: u64, dst_ptr: usize, stream: usize) -> PyResult<()> {
        py.detach(|| {
            guard(|| {
                let mut g = self.lock()?;
                // SAFETY: the Python caller passes the data_ptr of a fresh tensor of
                // nbytes(handle) bytes on our device, kept alive past the copy by record_stream.
                each!(&mut *g, s => unsafe { s.prefetch(handle, dst_ptr, RawStream(stream)) })
            })
        })
    }

    /// wait(handle, stream=0) -> None
    ///
    /// Make ``stream`` wait for the handle's copy back (no host synchronization); afterwards the
    /// prefetch destination may be read on ``stream``.
    #[pyo3(signature = (handle, stream=0))]
    fn wait(&self, py: Python<'_>, handle: u64, stream: usize) -> PyResult<()> {
        py.detach(|| {
            guard(|| {
                let mut g = self.lock()?;
                each!(&mut *g, s => s.wait(handle, RawStream(stream)))
            })
        })
    }

    /// release(handle) -> None
    ///
    /// Return a handle's host block to the pool (reused only once its copies have finished).
    /// Raises ``OffloadError`` for an unknown or already released handle.
    fn release(&self, py: Python<'_>, handle: u64) -> PyResult<()> {
        py.detach(|| {
            guard(|| {
                let mut g = self.lock()?;
                each!(&mut *g, s => s.release(handle))
            })
        })
    }

    /// release_all() -> int
    ///
    /// Release every live handle (error recovery); returns how many there were.
    fn release_all(&self, py: Python<'_>) -> PyResult<usize> {
        py.detach(|| {
            guard(|| {
                let mut g = self.lock()?;
                each!(&mut *g, s => s.release_all())
            })
        })
    }

    /// plan_prefetch(before) -> list[int]
    ///
    /// The lookahead policy: of the live handles offloaded before ``before`` (a handle, or a
    /// value of :meth:`next_handle`), the ``lookahead`` most recent, newest first, that have not
    /// been prefetched yet.
    fn plan_prefetch(&self, before: u64) -> PyResult<Vec<u64>> {
        guard(|| Ok(each!(&*self.lock()?, s => s.plan_prefetch(before))))
    }

    /// next_handle() -> int
    ///
    /// The handle the next offload will get (handles only grow).
    fn next_handle(&self) -> PyResult<u64> {
        guard(|| Ok(each!(&*self.lock()?, s => s.next_handle())))
    }

    /// nbytes(handle) -> int
    ///
    /// Size of a live handle's data.
    fn nbytes(&self, handle: u64) -> PyResult<usize> {
        guard(|| each!(&*self.lock()?, s => s.nbytes(handle)))
    }

    /// state(handle) -> str
    ///
    /// ``"offloaded"``, ``"prefetched"`` or ``"ready"``.
    fn state(&self, handle: u64) -> PyResult<&'static str> {
        guard(|| each!(&*self.lock()?, s => s.state(handle)).map(state_name))
    }

    /// take_warning() -> str | None
    ///
    /// The pageable-memory fallback warning, returned once after pinning first failed.
    fn take_warning(&self) -> PyResult<Option<String>> {
        guard(|| Ok(each!(&mut *self.lock()?, s => s.take_warning())))
    }

    /// trim() -> None
    ///
    /// Wait for copies in flight and free every idle host block (live handles keep theirs).
    fn trim(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| guard(|| each!(&mut *self.lock()?, s => s.trim())))
    }

    /// stats() -> dict
    ///
    /// Counters: ``pinned_bytes``, ``pageable_bytes``, ``reserved_bytes``, ``in_use_bytes``,
    /// ``peak_in_use_bytes``, ``pending_blocks``, ``allocations``, ``pageable_fallbacks``,
    /// ``cap_bytes``, ``live_handles``, ``offloads``, ``prefetches``, ``bytes_to_host``,
    /// ``bytes_to_device``.
    fn stats(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let st: SchedulerStats = guard(|| Ok(each!(&*self.lock()?, s => s.stats())))?;
        let d = PyDict::new(py);
        let p = &st.pool;
        d.set_item("pinned_bytes", p.pinned_bytes)?;
        d.set_item("pageable_bytes", p.pageable_bytes)?;
        d.set_item("reserved_bytes", p.pinned_bytes + p.pageable_bytes)?;
        d.set_item("in_use_bytes", p.in_use_bytes)?;
        d.set_item("peak_in_use_bytes", p.peak_in_use_bytes)?;
        d.set_item("pending_blocks", p.pending_blocks)?;
        d.set_item("allocations", p.allocations)?;
        d.set_item("pageable_fallbacks", p.pageable_fallbacks)?;
        d.set_item("cap_bytes", p.cap_bytes)?;
        d.set_item("live_handles", st.live_handles)?;
        d.set_item("offloads", st.offloads)?;
        d.set_item("prefetches", st.prefetches)?;
        d.set_item("bytes_to_host", st.bytes_to_host)?;
        d.set_item("bytes_to_device", st.bytes_to_device)?;
        Ok(d.unbind())
    }

    fn __repr__(&self) -> String {
        let dev = match self.device {
            Some(d) => format!("cuda:{d}"),
            None => "host".into(),
        };
        format!(
            "OffloadScheduler(device={dev}, lookahead={})",
            self.lookahead
        )
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyOffloadScheduler>()?;
    Ok(())
}
