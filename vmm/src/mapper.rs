//! `Mapper`: a background thread that maps KV pages ahead of need.
//!
//! vAttention hides the latency of the driver's mapping calls by mapping the pages a request will
//! need next while the GPU computes the current step (mapping calls neither wait for nor slow a
//! running kernel: on an H100, creating, mapping and enabling 512 pages beside a 200 ms kernel
//! returned after 18 ms and the kernel still took 200.1 ms — measured when the project began). Here the engine sends "slot S will hold T tokens" with
//! [`Mapper::map_ahead`] over a crossbeam channel; the thread maps the missing pages a few at a
//! time, taking the [`KvSpace`] lock only briefly so the engine is never stalled behind a long
//! batch, and tops the page pool up (creating pages is the slow call) whenever the queue is empty.
//! Before a step the engine calls [`Mapper::ensure`]: if the pages are already there it returns
//! at once; otherwise it maps them itself and the call counts as a **wait** — the number that
//! must stay at zero when prediction works.
//!
//! Ownership: the `KvSpace` sits behind a mutex shared by the engine thread and this thread; all
//! other state (counters) is atomics. Dropping the `Mapper` stops and joins the thread. A thread
//! that died (a panic in a driver call) is started again by [`Mapper::revive`]; meanwhile
//! `ensure` maps what the caller needs itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use crate::faults::{self, Fault};
use crate::{KvSpace, Result, SlotId, VmmError};

/// Tuning of the [`Mapper`] thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapperOptions {
    /// Keep at least this many pages created and free in the pool (0: never create ahead).
    pub pool_low_water: usize,
    /// Pages mapped per lock hold; smaller keeps the engine's lock waits short.
    pub pages_per_lock: usize,
}

impl Default for MapperOptions {
    fn default() -> Self {
        MapperOptions {
            pool_low_water: 64,
            pages_per_lock: 8,
        }
    }
}

/// Counters of a [`Mapper`] since it started.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MapperStats {
    /// Map-ahead requests handled by the thread.
    pub requests: u64,
    /// Pages the thread mapped ahead of need.
    pub pages_mapped_ahead: u64,
    /// Seconds the thread spent mapping (lock held).
    pub map_seconds: f64,
    /// Pages the thread created into the pool ahead of need.
    pub pages_created_ahead: u64,
    /// `ensure` calls that found pages missing and had to map them (should be 0).
    pub waits: u64,
    /// Pages mapped inside those waiting calls.
    pub pages_mapped_on_wait: u64,
    /// Seconds callers spent in waiting `ensure` calls.
    pub wait_seconds: f64,
    /// Map-ahead requests that failed (slot released meanwhile, pool exhausted).
    pub ahead_errors: u64,
    /// Times the thread was found dead (a panic in a driver call) and started again.
    pub restarts: u64,
    /// Surplus pages the thread unmapped from prepared slots where a prefix-cache hit is
    /// expected ([`Mapper::map_ahead_after_hit`]).
    pub pages_cleared_for_hits: u64,
}

impl MapperStats {
    /// Pages per second the thread maps while mapping (0 when it has mapped nothing).
    pub fn pages_per_second(&self) -> f64 {
        if self.map_seconds > 0.0 {
            self.pages_mapped_ahead as f64 / self.map_seconds
        } else {
            0.0
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    pages_mapped_ahead: AtomicU64,
    map_nanos: AtomicU64,
    pages_created_ahead: AtomicU64,
    waits: AtomicU64,
    pages_mapped_on_wait: AtomicU64,
    wait_nanos: AtomicU64,
    ahead_errors: AtomicU64,
    restarts: AtomicU64,
    pages_cleared_for_hits: AtomicU64,
}

enum Request {
    Ahead {
        slot: SlotId,
        hit: usize,
        tokens: usize,
    },
    Sync(Sender<()>),
    Stop,
}

/// The map-ahead thread and the shared [`KvSpace`] (see the module docs).
#[derive(Debug)]
pub struct Mapper {
    space: Arc<Mutex<KvSpace>>,
    tx: Sender<Request>,
    counters: Arc<Counters>,
    options: MapperOptions,
    thread: Option<JoinHandle<()>>,
}

fn lock(space: &Mutex<KvSpace>) -> MutexGuard<'_, KvSpace> {
    // Every KvSpace method leaves it consistent before returning an error, so a panic elsewhere
    // while the lock was held does not make it unusable.
    space.lock().unwrap_or_else(|e| e.into_inner())
}

fn nanos(since: Instant) -> u64 {
    since.elapsed().as_nanos() as u64
}

impl Mapper {
    /// Start the thread; it owns nothing but a handle to `space`.
    pub fn spawn(space: KvSpace, options: MapperOptions) -> Result<Self> {
        let space = Arc::new(Mutex::new(space));
        let counters = Arc::new(Counters::default());
        let (tx, thread) = start(&space, &counters, options)?;
        Ok(Mapper {
            space,
            tx,
            counters,
            options,
            thread: Some(thread),
        })
    }

    /// If the thread has died (a panic in a driver call), log why and start a new one; returns
    /// whether it did. Until then nothing is mapped ahead, and `ensure` maps what a step needs
    /// itself (counted as waits): the space stays usable, its lock recovering from the panic.
    pub fn revive(&mut self) -> Result<bool> {
        if !self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
            return Ok(false);
        }
        let why = match self.thread.take().map(JoinHandle::join) {
            Some(Err(panic)) => crate::faults::panic_message(panic.as_ref()),
            _ => "it returned".into(),
        };
        tracing::error!(why = %why, "the vkv-mapper thread died: starting it again");
        let (tx, thread) = start(&self.space, &self.counters, self.options)?;
        self.tx = tx;
        self.thread = Some(thread);
        self.counters.restarts.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// The space, locked: acquire, release, share, views, statistics.
    pub fn space(&self) -> MutexGuard<'_, KvSpace> {
        lock(&self.space)
    }

    /// Ask the thread to back `slot` for `tokens` tokens soon; returns at once.
    pub fn map_ahead(&self, slot: SlotId, tokens: usize) -> Result<()> {
        self.map_ahead_after_hit(slot, 0, tokens)
    }

    /// Ask the thread to prepare `slot` for an admission of `tokens` tokens whose first `hit` a
    /// prefix-cache hit will likely cover: unmap the surplus pages the slot holds there
    /// ([`KvSpace::clear_for_hit`]), so that the hit maps its pages without unmapping anything
    /// on the critical path, and back the rest ([`KvSpace::prefetch`] from `hit`); returns at
    /// once.
    pub fn map_ahead_after_hit(&self, slot: SlotId, hit: usize, tokens: usize) -> Result<()> {
        self.tx
            .send(Request::Ahead { slot, hit, tokens })
            .map_err(|_| VmmError::MapperStopped)
    }

    /// Back `slot` for `tokens` tokens now and record its length (as [`KvSpace::ensure`]).
    /// Returns whether the caller had to wait for pages the thread had not mapped yet.
    pub fn ensure(&self, slot: SlotId, tokens: usize) -> Result<bool> {
        let start = Instant::now();
        let mut space = lock(&self.space);
        let ready = space.is_backed(slot, tokens);
        let mapped = space.ensure(slot, tokens)?;
        drop(space);
        if !ready {
            let c = &self.counters;
            c.waits.fetch_add(1, Ordering::Relaxed);
            c.pages_mapped_on_wait
                .fetch_add(mapped as u64, Ordering::Relaxed);
            c.wait_nanos.fetch_add(nanos(start), Ordering::Relaxed);
        }
        Ok(!ready)
    }

    /// Block until every request sent before this call has been handled.
    pub fn sync(&self) -> Result<()> {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        self.tx
            .send(Request::Sync(done_tx))
            .map_err(|_| VmmError::MapperStopped)?;
        done_rx.recv().map_err(|_| VmmError::MapperStopped)
    }

    pub fn stats(&self) -> MapperStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MapperStats {
            requests: get(&c.requests),
            pages_mapped_ahead: get(&c.pages_mapped_ahead),
            map_seconds: get(&c.map_nanos) as f64 * 1e-9,
            pages_created_ahead: get(&c.pages_created_ahead),
            waits: get(&c.waits),
            pages_mapped_on_wait: get(&c.pages_mapped_on_wait),
            wait_seconds: get(&c.wait_nanos) as f64 * 1e-9,
            ahead_errors: get(&c.ahead_errors),
            restarts: get(&c.restarts),
            pages_cleared_for_hits: get(&c.pages_cleared_for_hits),
        }
    }
}

impl Drop for Mapper {
    fn drop(&mut self) {
        let _ = self.tx.send(Request::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Start the thread on `space`; returns its channel and handle.
fn start(
    space: &Arc<Mutex<KvSpace>>,
    counters: &Arc<Counters>,
    options: MapperOptions,
) -> Result<(Sender<Request>, JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let thread = std::thread::Builder::new()
        .name("vkv-mapper".into())
        .spawn({
            let space = space.clone();
            let counters = counters.clone();
            move || run(&space, &counters, &rx, options)
        })
        .map_err(|e| VmmError::Backend {
            backend: "mapper",
            call: "spawn",
            detail: e.to_string(),
        })?;
    Ok((tx, thread))
}

fn run(space: &Mutex<KvSpace>, c: &Counters, rx: &Receiver<Request>, options: MapperOptions) {
    let per_lock = options.pages_per_lock.max(1);
    loop {
        // With nothing queued, top the pool up one page at a time, checking for work in between.
        let request = match rx.try_recv() {
            Ok(r) => r,
            Err(crossbeam_channel::TryRecvError::Disconnected) => return,
            Err(crossbeam_channel::TryRecvError::Empty) => {
                let mut s = lock(space);
                let free = s.pool_free();
                let can_grow = s.pool_available() > free;
                if free < options.pool_low_water && can_grow {
                    if let Ok(n) = s.create_ahead(free + 1) {
                        c.pages_created_ahead.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    continue;
                }
                drop(s);
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => return,
                }
            }
        };
        match request {
            Request::Stop => return,
            Request::Sync(done) => {
                let _ = done.send(());
            }
            Request::Ahead { slot, hit, tokens } => {
                if faults::plan().take(Fault::MapperPanic) {
                    panic!("injected fault: the vkv-mapper thread dies");
                }
                c.requests.fetch_add(1, Ordering::Relaxed);
                // First the surplus where a likely hit goes (a few pages per lock hold).
                let mut clear = hit > 0;
                while clear {
                    let result = lock(space).clear_for_hit(slot, hit, per_lock);
                    clear = matches!(result, Ok(n) if n > 0);
                    match result {
                        Ok(n) => {
                            c.pages_cleared_for_hits
                                .fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(_) => {
                            c.ahead_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                loop {
                    let start = Instant::now();
                    let result = lock(space).prefetch(slot, hit, tokens, per_lock);
                    c.map_nanos.fetch_add(nanos(start), Ordering::Relaxed);
                    match result {
                        Ok(0) => break,
                        Ok(n) => {
                            c.pages_mapped_ahead.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(_) => {
                            c.ahead_errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{HostVmm, KvLayout, KvSpaceConfig};

    fn space(max_pages: usize) -> KvSpace {
        let config = KvSpaceConfig {
            layout: KvLayout::PerLayer,
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 16,
            dtype_bytes: 2,
            max_slots: 8,
            max_tokens: 512,
            page_size: 4096, // 64 tokens per page and region; 4 regions
            max_pages,
        };
        KvSpace::new(config, Arc::new(HostVmm::new().unwrap())).unwrap()
    }

    fn no_top_up() -> MapperOptions {
        MapperOptions {
            pool_low_water: 0,
            pages_per_lock: 3,
        }
    }

    #[test]
    fn mapping_ahead_means_no_wait() {
        let mapper = Mapper::spawn(space(64), no_top_up()).unwrap();
        let slot = mapper.space().acquire().unwrap();
        mapper.map_ahead(slot, 130).unwrap();
        mapper.sync().unwrap();
        assert!(!mapper.ensure(slot, 130).unwrap());
        let stats = mapper.stats();
        assert_eq!(
            (stats.requests, stats.pages_mapped_ahead, stats.waits),
            (1, 12, 0)
        );
        assert_eq!(mapper.space().len(slot), 130);
    }

    #[test]
    fn a_miss_is_counted_as_a_wait() {
        let mapper = Mapper::spawn(space(64), no_top_up()).unwrap();
        let slot = mapper.space().acquire().unwrap();
        assert!(mapper.ensure(slot, 65).unwrap());
        assert!(
            !mapper.ensure(slot, 100).unwrap(),
            "already backed up to 128 tokens"
        );
        let stats = mapper.stats();
        assert_eq!((stats.waits, stats.pages_mapped_on_wait), (1, 8));
        assert!(stats.wait_seconds > 0.0);
    }

    #[test]
    fn stale_or_impossible_requests_do_not_stop_the_thread() {
        let mapper = Mapper::spawn(space(4), no_top_up()).unwrap();
        let other = mapper.space().acquire().unwrap();
        let slot = mapper.space().acquire().unwrap();
        mapper.space().release(slot).unwrap();
        mapper.map_ahead(slot, 10).unwrap(); // released meanwhile
        mapper.map_ahead(other, 512).unwrap(); // needs 32 pages, budget 4
        mapper.sync().unwrap();
        assert_eq!(mapper.stats().ahead_errors, 2);
        mapper.map_ahead(other, 64).unwrap();
        mapper.sync().unwrap();
        assert!(!mapper.ensure(other, 64).unwrap());
        assert!(mapper.ensure(other, 512).is_err());
        mapper.space().audit().unwrap();
    }

    #[test]
    fn the_pool_is_topped_up_in_the_background() {
        let options = MapperOptions {
            pool_low_water: 10,
            pages_per_lock: 8,
        };
        let mapper = Mapper::spawn(space(64), options).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while mapper.space().pool_free() < 10 {
            assert!(
                Instant::now() < deadline,
                "pool never reached its low-water mark"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(mapper.stats().pages_created_ahead, 10);
    }

    #[test]
    fn decode_loop_with_the_engine_and_the_mapper_racing() {
        let mapper = Mapper::spawn(space(256), MapperOptions::default()).unwrap();
        let slots: Vec<SlotId> = (0..8).map(|_| mapper.space().acquire().unwrap()).collect();
        let mut ensures = 0;
        for step in 1..=300 {
            for &s in &slots {
                mapper.map_ahead(s, (step + 64).min(512)).unwrap();
            }
            for &s in &slots {
                mapper.ensure(s, step).unwrap();
                ensures += 1;
            }
            if step % 100 == 0 {
                mapper.space().release(slots[step / 100]).unwrap();
                let again = mapper.space().acquire().unwrap();
                assert_eq!(again, slots[step / 100], "deferred reuse of the same slot");
                mapper.ensure(again, step).unwrap();
            }
        }
        mapper.sync().unwrap();
        let stats = mapper.stats();
        assert!(stats.waits <= ensures);
        let space = mapper.space();
        space.audit().unwrap();
        assert!(slots
            .iter()
            .all(|&s| space.len(s) == 300 && space.is_backed(s, 300)));
    }
}
