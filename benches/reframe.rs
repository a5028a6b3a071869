//! Decode + encode throughput per format, and heap allocations per event.
//!
//! Run: `cargo bench --bench reframe`
//!
//! Each iteration feeds a whole upstream body, cut into 16 KiB reads as a
//! socket would deliver it, through a `Reframer` and encodes every event;
//! the written bytes are dropped after each read, as hyper does once they
//! are on the wire.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use ssegate::reframe::{Reframer, Wire};

/// Counts heap allocations so that the bench can report them per event.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const READ: usize = 16 * 1024;

/// An upstream body of `n` events of `size` payload bytes in `wire` format.
fn body(wire: Wire, size: usize, n: usize) -> Bytes {
    let payload: String = "abcdefghijklmnopqrstuvwxyz0123456789".chars().cycle().take(size).collect();
    let mut out = Vec::with_capacity(n * (size + 10));
    for _ in 0..n {
        match wire {
            Wire::Sse => {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(payload.as_bytes());
                out.extend_from_slice(b"\n\n");
            }
            Wire::Ndjson => {
                out.extend_from_slice(payload.as_bytes());
                out.push(b'\n');
            }
            Wire::Text => out.extend_from_slice(payload.as_bytes()),
        }
    }
    Bytes::from(out)
}

/// Runs a whole body through a reframer; returns the events written.
fn run(wire: Wire, input: &Bytes, chunk: usize, out: &mut BytesMut) -> u64 {
    let mut r = Reframer::new(wire, 1 << 20);
    let mut events = 0;
    for start in (0..input.len()).step_by(chunk) {
        // A slice of the body, as the upstream client hands out its reads:
        // no copy and no allocation.
        r.feed(input.slice(start..(start + chunk).min(input.len())));
        while let Ok(Some(_)) = r.next_event(out) {
            events += 1;
        }
        // What hyper does once the frame is written.
        out.clear();
    }
    r.feed_eof();
    while let Ok(Some(_)) = r.next_event(out) {
        events += 1;
    }
    out.clear();
    events
}

/// For text, one event is one read, so reads are cut at the event size.
fn chunk_for(wire: Wire, size: usize) -> usize {
    if wire == Wire::Text {
        size
    } else {
        READ
    }
}

fn cases() -> Vec<(&'static str, Wire, usize, usize)> {
    vec![
        ("sse", Wire::Sse, 64, 100_000),
        ("ndjson", Wire::Ndjson, 64, 100_000),
        ("text", Wire::Text, 64, 100_000),
        ("sse", Wire::Sse, 64 * 1024, 200),
        ("ndjson", Wire::Ndjson, 64 * 1024, 200),
        ("text", Wire::Text, 64 * 1024, 200),
    ]
}

fn report_allocations() {
    println!("heap allocations per event in steady state (decode + encode):");
    for (name, wire, size, n) in cases() {
        let input = body(wire, size, n);
        let mut out = BytesMut::with_capacity(256 * 1024);
        // Warm up so buffers reach their steady-state capacity.
        run(wire, &input, chunk_for(wire, size), &mut out);
        let before = ALLOCS.load(Ordering::Relaxed);
        let events = run(wire, &input, chunk_for(wire, size), &mut out);
        let allocs = ALLOCS.load(Ordering::Relaxed) - before;
        println!(
            "  {name:>6} {size:>6} B events: {:.3} allocations/event ({allocs} for {events} events)",
            allocs as f64 / events as f64
        );
    }
}

fn bench(c: &mut Criterion) {
    for (name, wire, size, n) in cases() {
        let input = body(wire, size, n);
        let mut group = c.benchmark_group(format!("reframe/{size}B"));
        group.throughput(Throughput::Elements(n as u64));
        group.sample_size(20);
        let mut out = BytesMut::with_capacity(256 * 1024);
        group.bench_with_input(BenchmarkId::new("events", name), &input, |b, input| {
            b.iter(|| run(wire, input, chunk_for(wire, size), &mut out))
        });
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_with_input(BenchmarkId::new("bytes", name), &input, |b, input| {
            b.iter(|| run(wire, input, chunk_for(wire, size), &mut out))
        });
        group.finish();
    }
}

criterion_group!(benches, bench);

fn main() {
    report_allocations();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
