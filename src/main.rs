//! The `ssegate` command: parses arguments, starts tracing, loads the
//! config and calls the library. Exit code 2 for anything that stops it
//! from starting.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use ssegate::config::{Config, RouteConfig};
use ssegate::{demo, Listeners};

/// jemalloc: an idle stream's buffers are 8 KiB allocations of which the
/// first few hundred bytes are written; jemalloc keeps them in page-aligned
/// slabs with no inline headers, so the untouched pages cost no memory
/// (11.3 against 14.4 KiB of RSS per idle stream with glibc's malloc).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`MALLOC_CONF` in the
/// environment still overrides them): slabs of 8 pages for the 4–16 KiB size
/// classes, instead of one or two. A connection's 8 KiB buffers then mostly
/// come from a slab already mapped, where each used to take and return a
/// page run: 72.8 k → 67.7 k instructions to set up a stream (callgrind), the
/// same RSS per idle stream.
///
/// And one background thread of jemalloc's own that returns freed memory
/// to the system (`background_thread`). Without it, the workers did that
/// themselves, in the allocations of whichever requests came while the
/// memory of many closed streams decayed: after 9,000 idle streams closed,
/// the next scenario's streams waited 5 to 10 ms for their first event in 3
/// of 5 runs (none of 5 with it; `benches/load/run.sh`, see docs/benchmarks-log.md).
///
/// Freed memory goes back over about five minutes (`dirty_decay_ms`), not
/// jemalloc's ten seconds: the next burst of streams reuses it instead of
/// faulting fresh pages in, which cost 3.3 µs each here: a burst of 2,000
/// new streams 30 s after the last faults a fifth to two fifths as many pages
/// and takes 1 to 11% less CPU (`benches/load/refault.sh`, see docs/benchmarks-log.md). After a burst the RSS falls over those minutes instead of
/// seconds; `MALLOC_CONF=dirty_decay_ms:10000` in the environment gives
/// jemalloc's default back.
///
/// jemalloc is built unprefixed (Cargo.toml), so the symbol is plain
/// `malloc_conf`, the name Debian's libjemalloc reads too (`tests/cli.rs`
/// checks that it is read).
#[export_name = "malloc_conf"]
static MALLOC_CONF: MallocConf = MallocConf(
    c"slab_sizes:4097-16384:8,background_thread:true,max_background_threads:1,dirty_decay_ms:300000".as_ptr(),
);

/// A C string pointer, as jemalloc reads `malloc_conf`.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: it points to a string literal, which nothing writes.
unsafe impl Sync for MallocConf {}

#[derive(Parser)]
#[command(name = "ssegate", version, about = "Clean Server-Sent Events in front of LLM inference servers")]
struct Cli {
    /// Config file.
    #[arg(long, global = true, default_value = "config.toml")]
    config: PathBuf,
    /// Overrides `server.listen`.
    #[arg(long, global = true)]
    listen: Option<std::net::SocketAddr>,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validates a config and exits 0, or prints what is wrong and exits 2.
    Check,
    /// Runs the proxy with a built-in fake model upstream.
    Demo,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        Some(Command::Demo) => serve(demo_config(cli.listen), None),
        None => match Config::load(&cli.config) {
            Ok(mut config) => {
                if let Some(listen) = cli.listen {
                    config.server.listen = listen;
                }
                serve(config, Some((cli.config.clone(), cli.listen)))
            }
            Err(e) => fail(&e.to_string()),
        },
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            for warning in config.warnings() {
                eprintln!("warning: {warning}");
            }
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

fn demo_config(listen: Option<std::net::SocketAddr>) -> Config {
    let mut config = Config { demo: true, ..Config::default() };
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    config.routes.push(RouteConfig {
        prefix: "/v1".into(),
        // Replaced by the fake model's address once it is bound.
        upstream: String::new(),
        format: Default::default(),
        strip_prefix: false,
        headers: Default::default(),
    });
    config
}

/// Runs the proxy; `reload_from` is the config file SIGHUP re-reads (and
/// the `--listen` override), or None for the demo.
fn serve(mut config: Config, reload_from: Option<(PathBuf, Option<std::net::SocketAddr>)>) -> ExitCode {
    let with_demo = reload_from.is_none();
    // Before the runtime's threads start (only jemalloc's background thread
    // runs yet): see `open_files::prepare`.
    #[cfg(unix)]
    match ssegate::open_files::prepare(config.limits.max_connections) {
        Ok(files) => {
            if let Some(from) = files.raised_from {
                tracing::debug!(from, to = files.limit, "raised the open-files limit");
            }
            if let Some(warning) = files.warning() {
                tracing::warn!("{warning}");
            }
        }
        Err(e) => tracing::warn!(error = %e, "the open-files limit could not be read"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(async move {
        if with_demo {
            let (listener, addr) = match demo::bind().await {
                Ok(ok) => ok,
                Err(e) => return fail(&format!("demo: cannot bind the fake model: {e}")),
            };
            config.routes[0].upstream = format!("http://{addr}");
            demo::spawn(listener, demo::Pace::default());
        }
        if with_demo && std::net::TcpListener::bind(config.server.admin_listen).is_err() {
            // The demo must start on a machine where 9901 is taken.
            config.server.admin_listen.set_port(0);
        }
        let listeners = match Listeners::bind(&config).await {
            Ok(l) => l,
            Err(e) => return fail(&e.to_string()),
        };
        if with_demo {
            let local = |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let url = format!("http://{}", local(&listeners.public));
            println!("ssegate demo is running on {url} (admin: http://{})", local(&listeners.admin));
            println!("stream an answer through the proxy:");
            println!(
                "  curl -N {url}/v1/chat/completions -H 'content-type: application/json' \
                 -d '{{\"model\":\"demo\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"hello\"}}]}}'"
            );
        }
        let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
        if let Some((path, listen)) = reload_from {
            tokio::spawn(reload_on_sighup(path, listen, reload_tx));
        }
        match ssegate::run_with_reload(config, listeners, shutdown_signal(), reloads).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e.to_string()),
        }
    })
}

/// Re-reads the config file on each SIGHUP; a config that fails `check`
/// is refused with one error line and the old one stays in force.
async fn reload_on_sighup(
    path: PathBuf,
    listen: Option<std::net::SocketAddr>,
    reloads: tokio::sync::mpsc::Sender<Config>,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
        while hup.recv().await.is_some() {
            match Config::load(&path) {
                Ok(mut config) => {
                    if let Some(listen) = listen {
                        config.server.listen = listen;
                    }
                    if reloads.send(config).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::error!("reload refused, the old config stays in force: {e}"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, listen, reloads);
    }
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when it is first polled, so a signal that comes right after
/// the "listening" line is not lost to the default action.
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (term, interrupt) {
            (Ok(mut term), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Completes on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
