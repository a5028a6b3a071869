//! Soak: many concurrent handoff streams with random disconnects and
//! resumes against a fake upstream, for a fixed time; prints streams
//! completed, events lost and duplicated (both must be 0) and the proxy's
//! RSS at the start and the end.
//!
//! Run: `cargo bench --bench soak -- [MINUTES] [STREAMS]` (default 10, 500).
//! It builds nothing itself: run `cargo build --release` first; it starts
//! `target/release/ssegate` with a config in a temp dir.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ssegate::body::{ChannelBody, ResponseBody};

const EVENTS: u64 = 100;
const INTERVAL: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Tally {
    completed: AtomicU64,
    events: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    resumes: AtomicU64,
    failed: AtomicU64,
}

async fn upstream(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let svc = service_fn(|req: Request<Incoming>| async move {
                let _ = req.into_body().collect().await;
                let (tx, body) = ChannelBody::new(8);
                tokio::spawn(async move {
                    for seq in 0..EVENTS {
                        tokio::time::sleep(INTERVAL).await;
                        if tx.send(Bytes::from(format!("data: {seq}\n\n"))).await.is_err() {
                            return;
                        }
                    }
                });
                let mut resp: Response<ResponseBody> = Response::new(body.boxed_unsync());
                resp.headers_mut().insert("content-type", "text/event-stream".parse().expect("static"));
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// One stream: POST, then GET, cut at a random event and resumed with
/// Last-Event-ID until the `end` event.
async fn one_stream(client: &reqwest::Client, proxy: SocketAddr, seed: u64, tally: &Tally) -> Result<(), String> {
    let post =
        client.post(format!("http://{proxy}/handoff/v1/chat")).body("{}").send().await.map_err(|e| e.to_string())?;
    let text = post.text().await.map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let url = format!("http://{proxy}{}", v["stream_url"].as_str().ok_or("no stream_url")?);
    let mut seen = vec![0u32; EVENTS as usize];
    let mut last_id: u64 = 0;
    let mut rng = seed;
    loop {
        let mut req = client.get(&url);
        if last_id > 0 {
            req = req.header("last-event-id", last_id.to_string());
            tally.resumes.fetch_add(1, Ordering::Relaxed);
        }
        let mut resp = req.send().await.map_err(|e| e.to_string())?;
        if resp.status() == 204 {
            break;
        }
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let cut_after = if (rng >> 33) % 3 == 0 { Some(1 + (rng >> 40) % EVENTS) } else { None };
        let mut buf = String::new();
        let mut got_this_time = 0u64;
        let mut ended = false;
        'read: while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                let mut id = None;
                let mut data = None;
                let mut name = None;
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = v.parse::<u64>().ok();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        name = Some(v.to_string());
                    }
                }
                let Some(id) = id else { continue };
                last_id = id;
                if name.as_deref() == Some("end") {
                    ended = true;
                    break 'read;
                }
                if name.is_some() {
                    return Err(format!("stream ended with {frame:?}"));
                }
                if let Some(seq) = data.and_then(|d| d.parse::<usize>().ok()) {
                    if seq < seen.len() {
                        seen[seq] += 1;
                    }
                    tally.events.fetch_add(1, Ordering::Relaxed);
                }
                got_this_time += 1;
                if cut_after.is_some_and(|c| got_this_time >= c) {
                    break 'read; // drop the connection mid-stream
                }
            }
        }
        if ended {
            break;
        }
    }
    let lost = seen.iter().filter(|n| **n == 0).count() as u64;
    let dup = seen.iter().map(|n| n.saturating_sub(1) as u64).sum::<u64>();
    tally.lost.fetch_add(lost, Ordering::Relaxed);
    tally.duplicated.fetch_add(dup, Ordering::Relaxed);
    tally.completed.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`:
    // the soak is not part of the suite.
    if !std::env::args().any(|a| a == "--bench") {
        println!("soak: run it with `cargo bench --bench soak -- [MINUTES] [STREAMS]`");
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let minutes: f64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(10.0);
    let streams: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(500);
    let bin = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/ssegate");
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
    let up_addr = up.local_addr().expect("addr");
    tokio::spawn(upstream(up));
    let free = || std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port");
    let (proxy, admin) = (free(), free());
    let dir = std::env::temp_dir().join(format!("ssegate-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("soak.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{proxy}\"\nadmin_listen = \"{admin}\"\n[handoff]\nresume_grace = \"10s\"\n\
             [limits]\nmax_streams = 20000\n[[routes]]\nprefix = \"/v1\"\nupstream = \"http://{up_addr}\"\n"
        ),
    )
    .expect("write config");
    let mut child = tokio::process::Command::new(bin)
        .args(["--config", config.to_str().expect("utf-8 path")])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin} (run cargo build --release first): {e}"));
    let pid = child.id().expect("pid");
    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(streams).build().expect("client");
    for _ in 0..100 {
        if client.get(format!("http://{admin}/readyz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let started = Instant::now();
    let mut rss_start = None;
    let mut workers = Vec::new();
    for w in 0..streams {
        let (client, tally) = (client.clone(), tally.clone());
        workers.push(tokio::spawn(async move {
            let mut seed = w as u64 * 7919 + 1;
            while Instant::now() < deadline {
                seed = seed.wrapping_add(104729);
                if let Err(e) = one_stream(&client, proxy, seed, &tally).await {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("stream failed: {e}");
                }
            }
        }));
    }
    // RSS "at start" after a warm-up (10% of the run, at most a minute), once
    // the streams kept for resume_grace have reached their steady number.
    tokio::time::sleep(Duration::from_secs_f64((minutes * 6.0).min(60.0))).await;
    rss_start.get_or_insert(rss_kib(pid));
    for w in workers {
        let _ = w.await;
    }
    let rss_end = rss_kib(pid);
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    let rss_start = rss_start.unwrap_or(0);
    let t = &tally;
    println!("soak: {minutes} min, {streams} concurrent handoff streams, {EVENTS} events each every {INTERVAL:?}, ~1 in 3 cut and resumed");
    println!(
        "date: {}",
        std::process::Command::new("date")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    );
    println!("elapsed:           {:.0} s", started.elapsed().as_secs_f64());
    println!("streams completed: {}", t.completed.load(Ordering::Relaxed));
    println!("streams failed:    {}", t.failed.load(Ordering::Relaxed));
    println!("events received:   {}", t.events.load(Ordering::Relaxed));
    println!("resumes:           {}", t.resumes.load(Ordering::Relaxed));
    println!("events lost:       {}", t.lost.load(Ordering::Relaxed));
    println!("events duplicated: {}", t.duplicated.load(Ordering::Relaxed));
    println!("proxy RSS start:   {rss_start} KiB");
    println!("proxy RSS end:     {rss_end} KiB ({:+.1}%)", (rss_end as f64 / rss_start.max(1) as f64 - 1.0) * 100.0);
}
