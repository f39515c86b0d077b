//! Fault injection: make the next page creations or maps fail as an exhausted or failing device
//! would, the [`crate::Mapper`] thread die, or a forward pass fail to launch — so that tests, on
//! the CPU and on the GPU, can check that each fault ends the affected requests with a clear error
//! (or preempts them), that the engine keeps serving, and that no KV page leaks.
//!
//! One plan per process ([`plan`]): the backends ([`crate::HostVmm`], [`crate::CudaVmm`]) consult
//! it before they create or map a page, the Mapper before it handles a request, and the engine
//! before it launches a step. Unarmed — always, outside tests that arm it — each check is one
//! relaxed atomic load. Because the plan is process-wide, tests that arm it must not run beside
//! other engine tests of the same binary (they live in test files of their own and take a lock).
//!
//! The faults are the ones a real device produces: `cuMemCreate` answering
//! `CUDA_ERROR_OUT_OF_MEMORY` ([`VmmError::DeviceOutOfMemory`], which the KV books treat as
//! memory pressure), `cuMemMap` failing ([`VmmError::Backend`]), a driver call panicking inside
//! the Mapper thread, a kernel launch refused; and a panic in an engine step (a bug).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::{Result, VmmError};

/// What can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Creating a physical page (`cuMemCreate`, the memfd's growth): out of device memory.
    CreatePage,
    /// Mapping a page at an address (`cuMemMap`, `mmap`): the driver call fails.
    Map,
    /// The Mapper thread panics when it next handles a map-ahead request.
    MapperPanic,
    /// The engine's next forward pass fails to launch.
    Launch,
    /// The engine's next step panics (a bug in the serving loop).
    StepPanic,
}

const FAULTS: usize = 5;

impl Fault {
    fn index(self) -> usize {
        self as usize
    }
}

/// How many of each fault are still to be injected, and how many were (see the module docs).
#[derive(Debug)]
pub struct FaultPlan {
    armed: [AtomicUsize; FAULTS],
    injected: [AtomicU64; FAULTS],
}

static PLAN: FaultPlan = FaultPlan {
    armed: [const { AtomicUsize::new(0) }; FAULTS],
    injected: [const { AtomicU64::new(0) }; FAULTS],
};

/// What a caught panic said (its `&str` or `String` payload), for the log line and the error
/// that a recovered thread or step reports.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The process's fault plan.
pub fn plan() -> &'static FaultPlan {
    &PLAN
}

impl FaultPlan {
    /// Make the next `times` occurrences of `fault` fail (`usize::MAX`: until disarmed).
    pub fn arm(&self, fault: Fault, times: usize) {
        self.armed[fault.index()].store(times, Ordering::SeqCst);
    }

    /// Inject nothing more.
    pub fn disarm(&self) {
        for a in &self.armed {
            a.store(0, Ordering::SeqCst);
        }
    }

    /// How many times `fault` has been injected since the process started.
    pub fn injected(&self, fault: Fault) -> u64 {
        self.injected[fault.index()].load(Ordering::SeqCst)
    }

    /// Whether this occurrence of `fault` is to fail (counting it down when it is).
    pub fn take(&self, fault: Fault) -> bool {
        let armed = &self.armed[fault.index()];
        if armed.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let taken = armed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                usize::MAX => Some(usize::MAX),
                n => Some(n - 1),
            })
            .is_ok();
        if taken {
            self.injected[fault.index()].fetch_add(1, Ordering::SeqCst);
        }
        taken
    }

    /// The error of `call` on `backend` when `fault` is to be injected now: out of device
    /// memory for [`Fault::CreatePage`], a failed driver call otherwise.
    pub(crate) fn check(
        &self,
        fault: Fault,
        backend: &'static str,
        call: &'static str,
    ) -> Result<()> {
        if !self.take(fault) {
            return Ok(());
        }
        let detail = "injected fault".to_string();
        Err(match fault {
            Fault::CreatePage => VmmError::DeviceOutOfMemory {
                backend,
                call,
                detail,
            },
            _ => VmmError::Backend {
                backend,
                call,
                detail,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_armed_fault_fires_as_many_times_as_asked() {
        // A private plan: the process's one is for the fault tests only.
        let plan = FaultPlan {
            armed: [const { AtomicUsize::new(0) }; FAULTS],
            injected: [const { AtomicU64::new(0) }; FAULTS],
        };
        assert!(plan.check(Fault::Map, "host", "mmap").is_ok());
        plan.arm(Fault::CreatePage, 2);
        assert!(!plan.take(Fault::Map));
        assert!(matches!(
            plan.check(Fault::CreatePage, "host", "ftruncate"),
            Err(VmmError::DeviceOutOfMemory { .. })
        ));
        assert!(plan.take(Fault::CreatePage));
        assert!(!plan.take(Fault::CreatePage));
        assert_eq!(plan.injected(Fault::CreatePage), 2);
        plan.arm(Fault::Launch, usize::MAX);
        assert!((0..100).all(|_| plan.take(Fault::Launch)));
        plan.disarm();
        assert!(!plan.take(Fault::Launch));
        assert_eq!(plan.injected(Fault::Launch), 100);
    }
}
