//! The `ssegate` binary: `check` on the fixtures, start-up failures (exit 2,
//! one error line, no panic), `demo`, and SIGTERM.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use http::StatusCode;
use support::{body_text, client, line_matching, listening_addr, parse_sse, End, Reply, Upstream};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_ssegate");

/// Each invalid fixture and what `check` must say about it: file, line,
/// key and reason, as `{file}:{line}: `{key}`: {reason}`.
const INVALID: &[(&str, &str)] = &[
    ("unknown_key.toml", "invalid/unknown_key.toml:6: `limits.max_bodyy`: unknown field `max_bodyy`"),
    ("unknown_section.toml", "invalid/unknown_section.toml:1: `routes_extra`: unknown field `routes_extra`"),
    ("bad_duration.toml", "invalid/bad_duration.toml:3: `limits.header_timeout`: `10 parsecs` is not a duration"),
    ("huge_duration.toml", "invalid/huge_duration.toml:3: `limits.send_timeout`: `20years` is longer than 10 years"),
    ("bad_size.toml", "invalid/bad_size.toml:6: `handoff.replay_bytes`: `lots` is not a size"),
    ("wrong_type.toml", "invalid/wrong_type.toml:2: `limits.max_streams`: invalid type: string \"many\""),
    ("bad_listen.toml", "invalid/bad_listen.toml:2: `server.listen`: `localhost` is not an address"),
    ("bad_format.toml", "invalid/bad_format.toml:4: `routes[0].format`: unknown variant `xml`"),
    ("prefix_without_slash.toml", "invalid/prefix_without_slash.toml:6: `routes[1].prefix`: must start with `/`"),
    ("duplicate_prefix.toml", "invalid/duplicate_prefix.toml:6: `routes[1].prefix`: `/v1` is used by an earlier route"),
    ("ftp_upstream.toml", "invalid/ftp_upstream.toml:3: `routes[0].upstream`: must start with http:// or https://"),
    ("no_routes.toml", "invalid/no_routes.toml: `routes`: at least one [[routes]] entry is needed"),
    (
        "missing_env.toml",
        "invalid/missing_env.toml:5: `routes[0].headers.authorization`: environment variable SSEGATE_FIXTURE_SURELY_UNSET is not set",
    ),
    ("syntax_error.toml", "invalid/syntax_error.toml:1: `(syntax)`: unclosed table"),
    ("cert_missing.toml", "invalid/cert_missing.toml:2: `server.tls.cert`: invalid/no-such-cert.pem: cannot read"),
    ("cert_not_pem.toml", "invalid/cert_not_pem.toml:2: `server.tls.cert`: invalid/not-a-cert.txt: holds no PEM certificate"),
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn toml_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    names
}

/// Runs the binary to completion in `dir`, failing after 20 s.
async fn run_in(dir: &Path, args: &[&str]) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("SSEGATE_FIXTURE_KEY", "sk-fixture")
        .env("SSEGATE_FIXTURE_SECRET", "0123456789abcdef0123456789abcdef")
        .env_remove("SSEGATE_FIXTURE_SURELY_UNSET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(20), child).await.expect("ssegate did not exit").unwrap()
}

/// Checks the shape every start-up failure has: exit 2, exactly one
/// `error:` line on stderr, which contains `expected`, and no panic.
fn assert_fails_with(out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "expected exit 2; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "it panicked:\n{stderr}");
    assert!(!stderr.contains("backtrace"), "a backtrace:\n{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line:\n{stderr}");
    assert!(errors[0].contains(expected), "the error line lacks {expected:?}:\n{stderr}");
}

/// An address that was free a moment ago (for keys that cannot be port 0).
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Writes a config file into a new temporary directory.
fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn config_text(listen: &str, admin: &str, upstream: &str) -> String {
    format!(
        "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\ndrain_timeout = \"300ms\"\n\n\
         [[routes]]\nprefix = \"/v1\"\nupstream = \"{upstream}\"\n"
    )
}

#[tokio::test]
async fn check_accepts_every_valid_fixture() {
    let dir = fixtures();
    let files = toml_files(&dir.join("valid"));
    assert!(files.len() >= 2, "{files:?}");
    for file in files {
        let path = format!("valid/{file}");
        let out = run_in(&dir, &["check", "--config", &path]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{path}:\n{stderr}");
        assert!(!stderr.contains("error"), "{path}:\n{stderr}");
    }
}

#[tokio::test]
async fn check_rejects_every_invalid_fixture_naming_key_and_line() {
    let dir = fixtures();
    let files = toml_files(&dir.join("invalid"));
    for file in &files {
        assert!(INVALID.iter().any(|(f, _)| f == file), "{file} has no expected message in INVALID");
    }
    let mut failures = Vec::new();
    for (file, expected) in INVALID {
        let path = format!("invalid/{file}");
        let out = run_in(&dir, &["check", "--config", &path]).await;
        if let Err(e) = std::panic::catch_unwind(|| assert_fails_with(&out, expected)) {
            failures.push(format!("{file}: {}", e.downcast_ref::<String>().cloned().unwrap_or_default()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn running_with_an_invalid_config_exits_2() {
    let dir = fixtures();
    for (file, expected) in INVALID {
        let path = format!("invalid/{file}");
        let out = run_in(&dir, &["--config", &path]).await;
        assert_fails_with(&out, expected);
    }
    let out = run_in(&dir, &["--config", "no-such-config.toml"]).await;
    assert_fails_with(&out, "no-such-config.toml");
    let out = run_in(&dir, &["check", "--config", "no-such-config.toml"]).await;
    assert_fails_with(&out, "no-such-config.toml");
}

#[tokio::test]
async fn a_port_in_use_exits_2_naming_the_key_and_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();

    let (dir, path) = write_config(&config_text(&addr.to_string(), &free_addr().to_string(), "http://127.0.0.1:9"));
    let out = run_in(dir.path(), &["--config", path.to_str().unwrap()]).await;
    assert_fails_with(&out, &format!("server.listen: cannot listen on {addr}"));

    // `--listen` overriding a free `server.listen` with the taken address.
    let (dir, path) =
        write_config(&config_text(&free_addr().to_string(), &free_addr().to_string(), "http://127.0.0.1:9"));
    let out = run_in(dir.path(), &["--config", path.to_str().unwrap(), "--listen", &addr.to_string()]).await;
    assert_fails_with(&out, &format!("server.listen: cannot listen on {addr}"));

    // The admin listener's address taken.
    let (dir, path) = write_config(&config_text("127.0.0.1:0", &addr.to_string(), "http://127.0.0.1:9"));
    let out = run_in(dir.path(), &["--config", path.to_str().unwrap()]).await;
    assert_fails_with(&out, &format!("server.admin_listen: cannot listen on {addr}"));
    drop(taken);
}

/// A config whose `server.tls` points at `cert.pem` and `key.pem` in a
/// new temporary directory (not written yet).
fn tls_config() -> (tempfile::TempDir, PathBuf) {
    write_config(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"{}\"\n\
         tls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n\n\
         [[routes]]\nprefix = \"/v1\"\nupstream = \"http://127.0.0.1:9\"\n",
        free_addr()
    ))
}

#[tokio::test]
async fn an_unreadable_certificate_exits_2_naming_the_key() {
    let (dir, path) = tls_config();
    let out = run_in(dir.path(), &["--config", path.to_str().unwrap()]).await;
    assert_fails_with(&out, "`server.tls.cert`");
    assert_fails_with(&out, "cert.pem");

    // The certificate is there, the key is not.
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), pair.cert.pem()).unwrap();
    let out = run_in(dir.path(), &["--config", path.to_str().unwrap()]).await;
    assert_fails_with(&out, "`server.tls.key`");
    assert_fails_with(&out, "key.pem");

    // A key that is not the certificate's.
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(dir.path().join("key.pem"), other.serialize_pem()).unwrap();
    let out = run_in(dir.path(), &["--config", path.to_str().unwrap()]).await;
    assert_fails_with(&out, "`server.tls.key`");

    // And with its own key it starts: `check` says ok.
    std::fs::write(dir.path().join("key.pem"), pair.signing_key.serialize_pem()).unwrap();
    let out = run_in(dir.path(), &["check", "--config", path.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A certificate file that holds a PEM block which is not a certificate,
/// next to a good key: the error must blame the certificate.
#[tokio::test]
async fn a_corrupt_certificate_is_named_as_the_problem() {
    let (dir, path) = tls_config();
    std::fs::write(dir.path().join("key.pem"), rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    std::fs::write(dir.path().join("cert.pem"), "-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n")
        .unwrap();
    let out = run_in(dir.path(), &["--config", path.to_str().unwrap()]).await;
    assert_fails_with(&out, "`server.tls.cert`");
}

fn sigterm(child: &Child) {
    let pid = child.id().expect("already exited").to_string();
    let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
}

async fn exit_code(child: &mut Child) -> Option<i32> {
    tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("did not exit").unwrap().code()
}

#[tokio::test]
async fn sigterm_drains_and_exits_0() {
    let mut upstream =
        Upstream::start(|_| Reply::chunks("text/event-stream", &[b"data: first\n\n"]).ending(End::Hang)).await;
    let text = config_text("127.0.0.1:0", &free_addr().to_string(), &format!("http://{}", upstream.addr));
    let (dir, path) = write_config(&text);
    let mut child = Command::new(BIN)
        .args(["--config", path.to_str().unwrap(), "--log-format", "json"])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let line = line_matching(&mut stderr, &mut seen, |l| l.contains("ssegate listening")).await;
    let addr = listening_addr(&line);
    assert_ne!(addr.port(), 0, "the log line should name the bound port: {line}");

    // A stream is open when the signal comes.
    let mut resp =
        client().get(format!("http://{addr}/v1/chat")).header("accept", "text/event-stream").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let first = tokio::time::timeout(Duration::from_secs(10), resp.chunk()).await.unwrap().unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data: first"));
    sigterm(&child);

    let events = parse_sse(&format!("{}{}", String::from_utf8_lossy(&first), body_text(resp).await));
    let last = events.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("error"), "{events:?}");
    assert!(last.data.contains("\"shutdown\""), "{events:?}");
    support::wait_for(&mut upstream.cancelled, 1).await;

    assert_eq!(exit_code(&mut child).await, Some(0));
    while let Ok(Some(line)) = stderr.next_line().await {
        seen.push(line);
    }
    let all = seen.join("\n");
    assert!(!all.contains("panicked"), "{all}");
    assert!(!all.contains("\"level\":\"ERROR\""), "{all}");
}

#[tokio::test]
async fn demo_prints_a_curl_line_that_streams() {
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let line = line_matching(&mut stdout, &mut seen, |l| l.contains("curl -N")).await;
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_string();
    let addr: SocketAddr = url["http://".len()..].split('/').next().unwrap().parse().unwrap();
    assert_ne!(addr.port(), 0, "the printed curl line cannot be run: {line}");

    // What the curl line does, done by a client.
    let body = r#"{"model":"demo","stream":true,"messages":[{"role":"user","content":"hello"}]}"#;
    let mut resp = client().post(&url).header("content-type", "application/json").body(body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while parse_sse(&text).len() < 3 {
            let chunk = resp.chunk().await.unwrap().expect("the demo stream ended early");
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    })
    .await
    .expect("the demo streamed fewer than 3 events");
    assert!(parse_sse(&text)[0].data.contains("chat.completion.chunk"), "{text}");
    drop(resp);

    sigterm(&child);
    assert_eq!(exit_code(&mut child).await, Some(0));
}

/// jemalloc, the binary's allocator, takes the options `src/main.rs` gives
/// it: the `malloc_conf` symbol has the name the linked jemalloc reads
/// (vendored or Debian's), and the idle-memory and set-up figures in the
/// README depend on those options.
#[tokio::test]
async fn the_allocator_takes_the_binary_s_options() {
    let out = Command::new(BIN)
        .arg("--version")
        .env("MALLOC_CONF", "confirm_conf:true")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out).await.expect("ssegate did not exit").unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "global variable malloc_conf): \"slab_sizes:4097-16384:8,background_thread:true,max_background_threads:1,dirty_decay_ms:300000\""
        ),
        "jemalloc did not read the binary's malloc_conf:\n{stderr}"
    );
    for option in
        ["slab_sizes:4097-16384:8", "background_thread:true", "max_background_threads:1", "dirty_decay_ms:300000"]
    {
        assert!(stderr.contains(&format!("Set conf value: {option}")), "{option}: {stderr}");
    }
}

/// Starts the binary on `path` with its open-files limits set to `soft` and
/// (when given) `hard` before it runs, logging JSON at info to a pipe.
fn spawn_with_open_files(path: &Path, soft: libc::rlim_t, hard: Option<libc::rlim_t>) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args(["--config", path.to_str().unwrap(), "--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: between fork and exec the closure only calls getrlimit and
    // setrlimit, which are async-signal-safe, on a local struct.
    unsafe {
        cmd.pre_exec(move || {
            let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim.rlim_cur = soft;
            if let Some(hard) = hard {
                lim.rlim_max = hard;
            }
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// A line of `/proc/<pid>/<file>` that starts with `key`, as numbers.
fn proc_numbers(pid: u32, file: &str, key: &str) -> Vec<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    let line = text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key} in {file}:\n{text}"));
    line[key.len()..].split_whitespace().filter_map(|w| w.parse().ok()).collect()
}

/// Started from a shell whose soft limit is 256 open files, ssegate raises
/// it to the hard limit: 300 streams (600 descriptors in the proxy) all
/// get their first event. Its descriptor table is sized for
/// `max_connections` from the start.
#[tokio::test]
async fn a_low_soft_open_files_limit_does_not_cap_the_streams() {
    const STREAMS: usize = 300;
    // This process holds both ends too: the clients and the fake upstream.
    let own = ssegate::open_files::prepare(STREAMS).unwrap();
    assert!(own.limit >= own.needed, "the test needs {} open files; the hard limit is {}", own.needed, own.limit);
    let upstream =
        Upstream::start(|_| Reply::chunks("text/event-stream", &[b"data: first\n\n"]).ending(End::Hang)).await;
    let text = config_text("127.0.0.1:0", &free_addr().to_string(), &format!("http://{}", upstream.addr));
    let (_dir, path) = write_config(&text);
    let mut child = spawn_with_open_files(&path, 256, None);
    let pid = child.id().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let addr = listening_addr(&line_matching(&mut stderr, &mut seen, |l| l.contains("ssegate listening")).await);
    // A line per stream follows: read on, or the pipe fills and the proxy
    // waits on its log.
    let logs = tokio::spawn(async move {
        let mut rest = String::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });

    let c = client();
    let opens = (0..STREAMS).map(|_| {
        let c = c.clone();
        async move {
            let mut resp =
                c.get(format!("http://{addr}/v1/chat")).header("accept", "text/event-stream").send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let first = resp.chunk().await.unwrap().expect("the stream ended before its first event");
            assert!(String::from_utf8_lossy(&first).contains("data: first"), "{first:?}");
            resp
        }
    });
    let open = tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(opens))
        .await
        .expect("not every stream got its first event within 30 s");
    assert_eq!(open.len(), STREAMS);

    let limits = proc_numbers(pid, "limits", "Max open files");
    assert_eq!(limits[0], limits[1], "the soft limit was not raised to the hard one: {limits:?}");
    // Two descriptors per connection for the default 10,000, or the limit.
    let fd_size = proc_numbers(pid, "status", "FDSize:")[0];
    // jemalloc's background thread, one (`malloc_conf` in src/main.rs).
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap().trim().to_string())
        .collect();
    assert_eq!(threads.iter().filter(|t| *t == "jemalloc_bg_thd").count(), 1, "{threads:?}");
    let needed = ssegate::open_files::needed(10_000);
    assert!(fd_size >= limits[0].min(needed), "descriptor table of {fd_size} for a limit of {}", limits[0]);
    drop(open);
    sigterm(&child);
    assert_eq!(exit_code(&mut child).await, Some(0));
    let rest = logs.await.unwrap();
    assert!(!rest.contains("panicked"), "{rest}");
}

/// A hard limit below what `limits.max_connections` needs is named in a
/// warning at start, with what it means; the proxy still serves.
#[tokio::test]
async fn an_open_files_limit_below_max_connections_is_warned_about() {
    let upstream = Upstream::start(|_| Reply::full(200, "text/plain", "ok")).await;
    let text = config_text("127.0.0.1:0", &free_addr().to_string(), &format!("http://{}", upstream.addr));
    let (_dir, path) = write_config(&text);
    let mut child = spawn_with_open_files(&path, 512, Some(512));
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let warning = line_matching(&mut stderr, &mut seen, |l| l.contains("below the")).await;
    assert!(warning.contains("\"level\":\"WARN\""), "{warning}");
    assert!(
        warning.contains("the open-files limit is 512, below the 20064 that limits.max_connections = 10000 needs")
            && warning.contains("past about 224 streams"),
        "{warning}"
    );
    let addr = listening_addr(&line_matching(&mut stderr, &mut seen, |l| l.contains("ssegate listening")).await);
    let resp = client().get(format!("http://{addr}/v1/x")).send().await.unwrap();
    assert_eq!(body_text(resp).await, "ok");
    sigterm(&child);
    assert_eq!(exit_code(&mut child).await, Some(0));
}
