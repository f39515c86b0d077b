//! The measurements behind `vkv bench vmm`: what each backend call costs, what a [`KvSpace`]
//! operation costs in each layout and page size, and whether the [`Mapper`] keeps ahead of a
//! decode loop.
//!
//! Three parts, each on the backend given:
//! - **primitives**: `n` pages of one size — reserve, then per page create / map / set access /
//!   unmap / release, each call timed on its own (median and p99), and one set access over all
//!   `n` pages (a run mapped together);
//! - **space**: a model-shaped [`KvSpace`] with its pages created up front — `slots` requests
//!   grown one token at a time to `tokens` (decode), one request backed in one call (prefill), a
//!   released slot reused (deferred reclamation), a prefix shared, everything reclaimed;
//! - **mapper**: the decode loop again with a [`Mapper`]: each step asks it to map `lookahead`
//!   tokens ahead, "computes" for `step_us` (sleeps, as the host does while the GPU runs), then
//!   ensures the step's tokens; once with no look-ahead (every new page is a wait) and once a page
//!   ahead (waits should be 0).
//!
//! Timings are wall-clock around single calls (`Instant`), which is right for driver calls that
//! return when done; they include no device work.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use vkv_vmm::{
    KvLayout, KvSpace, KvSpaceConfig, Mapper, MapperOptions, PhysicalMemory, Result, SlotId,
};

/// What to measure.
#[derive(Debug, Clone)]
pub struct VmmBenchOptions {
    pub page_sizes: Vec<usize>,
    pub layouts: Vec<KvLayout>,
    /// Pages per primitive measurement.
    pub pages: usize,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub dtype_bytes: usize,
    pub slots: usize,
    pub tokens: usize,
    /// Decode steps in the mapper runs.
    pub steps: usize,
    /// Simulated compute per decode step in the mapper runs, in microseconds.
    pub step_us: u64,
}

/// Latency distribution of one call, in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub calls: usize,
    pub median_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
}

impl Latency {
    fn of(mut samples: Vec<f64>) -> Self {
        if samples.is_empty() {
            return Latency {
                calls: 0,
                median_us: 0.0,
                p99_us: 0.0,
                mean_us: 0.0,
            };
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Latency {
            calls: samples.len(),
            median_us: at(0.5),
            p99_us: at(0.99),
            mean_us: samples.iter().sum::<f64>() / samples.len() as f64,
        }
    }
}

/// Per-call costs of the backend for one page size.
#[derive(Debug, Clone, Serialize)]
pub struct PrimitiveReport {
    pub page_size: usize,
    pub reserve_us: f64,
    pub create: Latency,
    pub map: Latency,
    pub set_access: Latency,
    pub unmap: Latency,
    pub release: Latency,
    /// Pages per second through map + set access (medians).
    pub map_pages_per_s: f64,
    /// One set access over all the pages at once (what a run of pages mapped together costs,
    /// [`KvSpace`]'s batched mapping), in microseconds.
    pub set_access_run_us: f64,
    /// Pages per second through map (median) + a share of the set access over the run.
    pub map_run_pages_per_s: f64,
}

/// A timed operation over many pages.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Throughput {
    pub seconds: f64,
    pub pages: usize,
    pub us_per_page: f64,
}

impl Throughput {
    fn of(elapsed: Duration, pages: usize) -> Self {
        let seconds = elapsed.as_secs_f64();
        Throughput {
            seconds,
            pages,
            us_per_page: if pages > 0 {
                seconds * 1e6 / pages as f64
            } else {
                0.0
            },
        }
    }
}

/// [`KvSpace`] operation costs for one layout and page size.
#[derive(Debug, Clone, Serialize)]
pub struct SpaceReport {
    pub layout: String,
    pub page_size: usize,
    pub tokens_per_page: f64,
    /// Creating every page the run needs into the pool, up front.
    pub create_ahead: Throughput,
    /// `ensure` called once per token per slot while `slots` requests grow to `tokens`.
    pub decode_ensure: Latency,
    pub decode: Throughput,
    /// One `ensure(tokens)` on an empty slot.
    pub prefill: Throughput,
    /// `ensure(tokens)` on a released-then-reacquired slot: pages mapped (should be 0) and time.
    pub reuse: Throughput,
    /// One `share_prefix` of `tokens - 1` tokens, in microseconds, and the pages it shared.
    pub share_us: f64,
    pub shared_pages: usize,
    pub reclaim: Throughput,
}

/// A decode loop driven through the [`Mapper`].
#[derive(Debug, Clone, Serialize)]
pub struct MapperReport {
    pub layout: String,
    pub page_size: usize,
    pub lookahead_tokens: usize,
    pub steps: usize,
    pub slots: usize,
    pub ensures: u64,
    pub waits: u64,
    pub wait_ms_total: f64,
    pub pages_mapped_ahead: u64,
    pub pages_mapped_on_wait: u64,
    pub mapper_pages_per_s: f64,
}

/// Everything `vkv bench vmm` measured.
#[derive(Debug, Clone, Serialize)]
pub struct VmmBenchReport {
    pub backend: String,
    pub granularity: usize,
    pub device: String,
    pub model: String,
    pub primitives: Vec<PrimitiveReport>,
    pub spaces: Vec<SpaceReport>,
    pub mappers: Vec<MapperReport>,
}

fn micros(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64() * 1e6)
}

/// Run every part for every page size (and layout); `progress` is told what runs next.
pub fn run(
    backend: Arc<dyn PhysicalMemory>,
    device: String,
    options: &VmmBenchOptions,
    mut progress: impl FnMut(&str),
) -> Result<VmmBenchReport> {
    let mut report = VmmBenchReport {
        backend: backend.name().into(),
        granularity: backend.granularity(),
        device,
        model: format!(
            "{} layers × {} kv heads × {} dim × {} B",
            options.num_layers, options.num_kv_heads, options.head_dim, options.dtype_bytes
        ),
        primitives: Vec::new(),
        spaces: Vec::new(),
        mappers: Vec::new(),
    };
    let granularity = backend.granularity();
    if let Some(&bad) = options
        .page_sizes
        .iter()
        .find(|&&p| p == 0 || p % granularity != 0)
    {
        return Err(vkv_vmm::VmmError::PageSizeNotAligned {
            backend: backend.name(),
            page_size: bad,
            granularity,
        });
    }
    for &page_size in &options.page_sizes {
        let size = if page_size % (1 << 20) == 0 {
            format!("{} MiB", page_size >> 20)
        } else {
            format!("{} KiB", page_size >> 10)
        };
        progress(&format!("primitives, {size} pages"));
        report
            .primitives
            .push(primitives(backend.as_ref(), page_size, options.pages)?);
        for &layout in &options.layouts {
            progress(&format!("space, {layout}, {size} pages"));
            report
                .spaces
                .push(space(backend.clone(), layout, page_size, options)?);
            for ahead_pages in [0, 1] {
                progress(&format!(
                    "mapper, {layout}, {size} pages, {ahead_pages} page(s) ahead"
                ));
                report.mappers.push(mapper(
                    backend.clone(),
                    layout,
                    page_size,
                    ahead_pages,
                    options,
                )?);
            }
        }
    }
    Ok(report)
}

fn primitives(backend: &dyn PhysicalMemory, page_size: usize, n: usize) -> Result<PrimitiveReport> {
    let bytes = page_size * n;
    let mut base = 0;
    let reserve_us = micros(|| {
        base = backend.reserve(bytes, page_size)?;
        Ok(())
    })?;
    let addr = |i: usize| base + (i * page_size) as u64;
    let mut pages = Vec::with_capacity(n);
    let (mut create, mut map, mut access, mut unmap, mut release) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        create.push(micros(|| {
            pages.push(backend.create_page(page_size)?);
            Ok(())
        })?);
    }
    for (i, &page) in pages.iter().enumerate() {
        map.push(micros(|| backend.map(page, addr(i)))?);
    }
    for i in 0..n {
        access.push(micros(|| backend.set_access(addr(i), page_size))?);
    }
    let set_access_run_us = micros(|| backend.set_access(base, bytes))?;
    for i in 0..n {
        unmap.push(micros(|| backend.unmap(addr(i), page_size))?);
    }
    for page in pages {
        release.push(micros(|| backend.release_page(page))?);
    }
    backend.free_reservation(base, bytes)?;
    let (map, set_access) = (Latency::of(map), Latency::of(access));
    Ok(PrimitiveReport {
        page_size,
        reserve_us,
        create: Latency::of(create),
        map_pages_per_s: 1e6 / (map.median_us + set_access.median_us).max(1e-9),
        set_access_run_us,
        map_run_pages_per_s: 1e6 / (map.median_us + set_access_run_us / n as f64).max(1e-9),
        map,
        set_access,
        unmap: Latency::of(unmap),
        release: Latency::of(release),
    })
}

fn space_config(
    layout: KvLayout,
    page_size: usize,
    o: &VmmBenchOptions,
    slots: usize,
) -> KvSpaceConfig {
    let mut config = KvSpaceConfig {
        layout,
        num_layers: o.num_layers,
        num_kv_heads: o.num_kv_heads,
        head_dim: o.head_dim,
        dtype_bytes: o.dtype_bytes,
        max_slots: slots,
        max_tokens: o.tokens,
        page_size,
        max_pages: 0,
    };
    config.max_pages = config.pages_for(o.tokens) * config.num_regions() * slots;
    config
}

fn space(
    backend: Arc<dyn PhysicalMemory>,
    layout: KvLayout,
    page_size: usize,
    o: &VmmBenchOptions,
) -> Result<SpaceReport> {
    // One slot more than the decode load, for the prefill and the share.
    let config = space_config(layout, page_size, o, o.slots + 1);
    let tokens_per_page = page_size as f64 / config.region_bytes_per_token() as f64;
    let mut space = KvSpace::new(config.clone(), backend)?;
    let start = Instant::now();
    let created = space.create_ahead(config.max_pages)?;
    let create_ahead = Throughput::of(start.elapsed(), created);

    let slots: Vec<SlotId> = (0..o.slots)
        .map(|_| space.acquire())
        .collect::<Result<_>>()?;
    let mut per_call = Vec::with_capacity(o.slots * o.tokens);
    let mut mapped = 0;
    let start = Instant::now();
    for t in 1..=o.tokens {
        for &s in &slots {
            let call = Instant::now();
            mapped += space.ensure(s, t)?;
            per_call.push(call.elapsed().as_secs_f64() * 1e6);
        }
    }
    let decode = Throughput::of(start.elapsed(), mapped);

    let fresh = space.acquire()?;
    let start = Instant::now();
    let mapped = space.ensure(fresh, o.tokens)?;
    let prefill = Throughput::of(start.elapsed(), mapped);

    space.release(slots[0])?;
    let again = space.acquire()?;
    let start = Instant::now();
    let mapped = space.ensure(again, o.tokens)?;
    let reuse = Throughput::of(start.elapsed(), mapped);

    space.release(slots[1])?;
    let dst = space.acquire()?;
    let start = Instant::now();
    space.share_prefix(fresh, dst, o.tokens - 1)?;
    let share_us = start.elapsed().as_secs_f64() * 1e6;
    let shared_pages = space.stats().pages_shared;

    for s in (0..config.max_slots).map(SlotId) {
        if space.is_active(s) {
            space.release(s)?;
        }
    }
    let start = Instant::now();
    let reclaimed = space.reclaim_all()?;
    let reclaim = Throughput::of(start.elapsed(), reclaimed);
    Ok(SpaceReport {
        layout: layout.to_string(),
        page_size,
        tokens_per_page,
        create_ahead,
        decode_ensure: Latency::of(per_call),
        decode,
        prefill,
        reuse,
        share_us,
        shared_pages,
        reclaim,
    })
}

fn mapper(
    backend: Arc<dyn PhysicalMemory>,
    layout: KvLayout,
    page_size: usize,
    ahead_pages: usize,
    o: &VmmBenchOptions,
) -> Result<MapperReport> {
    let config = space_config(layout, page_size, o, o.slots);
    let lookahead = ahead_pages * (page_size / config.region_bytes_per_token()).max(1);
    let mut space = KvSpace::new(config.clone(), backend)?;
    space.create_ahead(config.max_pages)?;
    let mapper = Mapper::spawn(
        space,
        MapperOptions {
            pool_low_water: 0,
            pages_per_lock: 8,
        },
    )?;
    let slots: Vec<SlotId> = (0..o.slots)
        .map(|_| mapper.space().acquire())
        .collect::<Result<_>>()?;
    // Admission backs each prompt before decoding starts (not a prediction miss). Prompt lengths
    // are staggered so that every slot crosses a page boundary during the run, at its own step.
    let tpp = (page_size / config.region_bytes_per_token()).max(1);
    let steps = o.steps.min(o.tokens - 1);
    let span = steps.min(tpp);
    let mut lens: Vec<usize> = (0..o.slots)
        .map(|i| (tpp - 1 - (i * span) / o.slots).clamp(1, o.tokens - steps))
        .collect();
    for (&s, &len) in slots.iter().zip(&lens) {
        mapper.space().ensure(s, len)?;
    }
    for _ in 0..steps {
        if lookahead > 0 {
            for (&s, &len) in slots.iter().zip(&lens) {
                mapper.map_ahead(s, (len + 1 + lookahead).min(o.tokens))?;
            }
        }
        std::thread::sleep(Duration::from_micros(o.step_us));
        for (&s, len) in slots.iter().zip(lens.iter_mut()) {
            *len += 1;
            mapper.ensure(s, *len)?;
        }
    }
    mapper.sync()?;
    let stats = mapper.stats();
    Ok(MapperReport {
        layout: layout.to_string(),
        page_size,
        lookahead_tokens: lookahead,
        steps,
        slots: o.slots,
        ensures: (steps * o.slots) as u64,
        waits: stats.waits,
        wait_ms_total: stats.wait_seconds * 1e3,
        pages_mapped_ahead: stats.pages_mapped_ahead,
        pages_mapped_on_wait: stats.pages_mapped_on_wait,
        mapper_pages_per_s: stats.pages_per_second(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vkv_vmm::HostVmm;

    #[test]
    fn a_small_run_measures_every_part_on_the_host() {
        let options = VmmBenchOptions {
            page_sizes: vec![64 << 10],
            layouts: KvLayout::ALL.to_vec(),
            pages: 8,
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 64,
            dtype_bytes: 2,
            slots: 3,
            tokens: 300,
            steps: 300,
            step_us: 200,
        };
        let backend = Arc::new(HostVmm::new().unwrap());
        let report = run(backend, "cpu".into(), &options, |_| {}).unwrap();
        assert_eq!(report.primitives[0].create.calls, 8);
        assert_eq!(report.spaces.len(), 2);
        for s in &report.spaces {
            assert!(s.decode.pages > 0 && s.prefill.pages > 0);
            assert_eq!(s.reuse.pages, 0, "a reused slot keeps its pages");
            assert!(
                s.reclaim.pages > 0 && s.reclaim.pages <= s.create_ahead.pages,
                "{}",
                s.layout
            );
            assert!(s.shared_pages > 0, "{}", s.layout);
        }
        let [no_ahead, ahead] = &report.mappers[..2] else {
            panic!()
        };
        // Every slot crosses a page boundary: without look-ahead each crossing is a wait.
        assert!(no_ahead.waits >= options.slots as u64 && no_ahead.pages_mapped_ahead == 0);
        assert!(report.spaces.iter().all(|s| s.share_us > 0.0));
        assert!(ahead.pages_mapped_ahead > 0);
    }
}
