//! `wbctl` — manage writeboost devices: log-structured write-back SSD caches exported as
//! `/dev/ublkbN`.
//!
//! `create` and `recover` run the device's daemon (detached, or in the foreground for systemd);
//! `status`, `list`, `set`, `drain` and `delete` talk to running daemons over their control
//! sockets; `check` inspects a cache device offline and writes nothing.
//!
//! Errors name the device or argument and the reason; `anyhow` is used only here, at the edge.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, IsTerminal, Read, Seek, Write as _};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytesize::ByteSize;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use comfy_table::{CellAlignment, Table};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use wb_target::control::{self, DeviceStatus, Progress, Reply, Request, RunDir};
use wb_target::daemon::config::DeviceConfig;
use wb_target::daemon::{self, CreateRequest, DaemonSpec, Start};
use wb_target::device::{Device, FileDevice};
use wb_target::log::legs::CacheLegs;
use wb_tools::health::{self, percent, Health};
use wb_tools::journal;
use wb_tools::metrics::Scrape;
use wb_tools::ssd_health::{self, LegHealth};
use wb_tools::status_view::{self, human_duration};
use writeback::Policy;

/// Set in the environment of a detached daemon: after it reports its device on stdout, it
/// points stdout at /dev/null (its parent stops reading).
const DETACHED_ENV: &str = "WRITEBOOST_DETACHED";

#[derive(Parser, Debug)]
#[command(
    name = "wbctl",
    version,
    about = "Manage writeboost devices: log-structured write-back SSD caches as /dev/ublkbN"
)]
struct Cli {
    /// Folder of the devices' state files, control sockets and RAM buffer files
    /// [default: $WRITEBOOST_RUN_DIR, else /run/writeboost].
    #[arg(long, global = true, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a device: format new caches, or re-attach a cache already formatted for this
    /// backing device. Prints the /dev/ublkbN it made.
    Create(Box<CreateArgs>),
    /// Show devices: a table for people, JSON (--json) for scripts. With -x, one verdict line
    /// per device and the Nagios exit status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN. With
    /// --watch N, a line per device every N seconds (like `zpool iostat N`).
    Status {
        /// One device (default: all).
        name: Option<String>,
        /// One document, whether one device or all: {"output_version": 1, "devices": [...]}.
        #[arg(long)]
        json: bool,
        /// Health check: exit 0 healthy, 1 warning (a failed leg, dirty above the pressure
        /// point, writers stalled in the last minute, backing errors, a leg's SSD worn past 80 %,
        /// its spare below threshold or a SMART critical warning), 2 critical (cache lost,
        /// no usable leg, daemon down), 3 unknown (status unreadable).
        #[arg(short = 'x', long = "check", conflicts_with = "watch")]
        check: bool,
        /// Print a line per device every INTERVAL (seconds, or e.g. 500ms, 2s, 1m) until
        /// interrupted: mode, dirty %, writeback lag, write and writeback MiB/s, read hits,
        /// ms writers waited for cache space in the last minute.
        #[arg(long, value_name = "INTERVAL", value_parser = status_view::parse_interval,
              conflicts_with = "json")]
        watch: Option<Duration>,
        /// With --watch: stop after this many rounds.
        #[arg(long, value_name = "K", requires = "watch")]
        count: Option<u64>,
    },
    /// The devices' figures in the Prometheus text format (for node_exporter's textfile
    /// collector: see /lib/systemd/system/writeboost-metrics.timer). A device whose daemon does
    /// not answer shows as writeboost_daemon_up 0. Counters go on across a stop and start of
    /// the daemon (a hand-over) and restart from 0 after a crash.
    Metrics {
        /// One device (default: all).
        name: Option<String>,
        /// Write to FILE atomically (FILE.tmp, then renamed over FILE) instead of stdout.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// List devices and whether their daemons run.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop a device: seal and flush its log, remove /dev/ublkbN. The cache keeps its data;
    /// `create` with the same devices re-attaches it.
    Delete {
        name: String,
        /// Write everything back first, so the backing device alone holds all the data.
        #[arg(long)]
        drain: bool,
        /// Delete even if the device is mounted or claimed; for a device whose daemon died,
        /// remove the kernel device without recovering it.
        #[arg(long)]
        force: bool,
    },
    /// Write everything back now (progress bar); returns when the cache is clean.
    Drain { name: String },
    /// Change writeback knobs at run time: KNOB=VALUE ... (all or none).
    Set {
        name: String,
        #[arg(required = true, value_name = "KNOB=VALUE")]
        knobs: Vec<String>,
        /// Change the running device only; do not write the knobs into its configuration file
        /// (by default they are, so that a restart keeps them).
        #[arg(long)]
        runtime_only: bool,
    },
    /// Replace a cache leg online (a failed SSD, or one to retire): the cache is written back
    /// and runs in passthrough meanwhile, then the new device becomes the leg.
    Replace {
        name: String,
        /// The leg to replace (as given at create).
        #[arg(long, value_name = "DEV")]
        old: PathBuf,
        /// The new cache device (at least as large as the old leg).
        #[arg(long, value_name = "DEV")]
        new: PathBuf,
    },
    /// Bring back a device whose daemon was killed: adopt its RAM buffer, re-attach to the
    /// same /dev/ublkbN (ublk user recovery); I/O in flight is re-issued.
    Recover {
        name: String,
        /// Stay in the foreground (for systemd).
        #[arg(long)]
        foreground: bool,
    },
    /// Inspect cache devices offline: superblock, checkpoint, live log, dirty blocks. Opens
    /// them read-only; starts nothing, writes nothing.
    Check {
        #[arg(long = "cache", required = true, value_name = "DEV")]
        caches: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// `wbctl generate-docs --out DIR`: the man pages (DIR/man) and bash/zsh/fish completions
/// (DIR/completions) made from `Cli`, for the Debian package. Added to the parser in `main`
/// only, not to `Cli`: clap_complete completes hidden subcommands too, and the pages and
/// completions generated from `Cli::command()` must offer only what users type.
fn docs_subcommand() -> clap::Command {
    clap::Command::new("generate-docs").hide(true).arg(
        clap::Arg::new("out")
            .long("out")
            .value_name("DIR")
            .required(true)
            .value_parser(clap::value_parser!(PathBuf)),
    )
}

#[derive(Args, Debug, Clone)]
struct CreateArgs {
    /// Device name (letters, digits, '_', '.', '-').
    name: String,
    /// The slow device to cache (e.g. a zvol).
    #[arg(long, value_name = "DEV")]
    backing: Option<PathBuf>,
    /// A cache device (SSD); give two for a mirror.
    #[arg(long = "cache", value_name = "DEV")]
    caches: Vec<PathBuf>,
    /// Accept a single cache device (no mirror: losing it loses what is not written back).
    #[arg(long)]
    single_leg: bool,
    /// Format over a cache that holds data, belongs to another backing device, or is damaged.
    #[arg(long)]
    force: bool,
    /// Stay in the foreground (for systemd); otherwise the daemon detaches.
    #[arg(long)]
    foreground: bool,
    /// Per-device TOML configuration (see /etc/writeboost/example.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// ublk queues (default: one per CPU).
    #[arg(long)]
    queues: Option<u16>,
    /// Requests in flight per queue.
    #[arg(long)]
    depth: Option<u16>,
    /// Logical block size of a new cache, 512 or 4096 (default: the backing device's).
    #[arg(long)]
    logical_block_size: Option<u32>,
    /// ublk device id to ask for (default: the kernel's choice).
    #[arg(long)]
    dev_id: Option<i32>,
    /// Program run on every mode change and leg event, with the facts in WRITEBOOST_*
    /// environment variables (README "Operating it").
    #[arg(long, value_name = "PROGRAM")]
    event_hook: Option<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// Writeback knobs (CONTRACT §4); `wbctl set` changes them at run time.
#[derive(Args, Debug, Clone, Default)]
struct PolicyArgs {
    /// Start background writeback when more than this is dirty (0.1 or 10%).
    #[arg(long)]
    low_watermark: Option<String>,
    /// linear | exponential | step.
    #[arg(long)]
    pressure_curve: Option<String>,
    /// Fullness where the pressure curve starts.
    #[arg(long)]
    pressure_start: Option<String>,
    /// Fullness where writeback runs at full speed.
    #[arg(long)]
    pressure_full: Option<String>,
    /// Write back anything dirty for longer than this.
    #[arg(long)]
    age_threshold_secs: Option<String>,
    /// Cap on writeback bandwidth, MiB/s (0: unlimited).
    #[arg(long)]
    max_bandwidth_mib: Option<String>,
    /// Full speed while users leave the backing device alone (on/off).
    #[arg(long)]
    idle_aware: Option<String>,
    /// How long without user I/O counts as idle.
    #[arg(long)]
    idle_after_ms: Option<String>,
    /// Speed of background writeback when no pressure applies (fraction of full).
    #[arg(long)]
    background_rate: Option<String>,
    /// Any knob as KNOB=VALUE (repeatable).
    #[arg(long = "set", value_name = "KNOB=VALUE")]
    set: Vec<String>,
}

impl PolicyArgs {
    fn pairs(&self) -> Result<Vec<(String, String)>> {
        let mut pairs = Vec::new();
        let named = [
            ("low_watermark", &self.low_watermark),
            ("pressure_curve", &self.pressure_curve),
            ("pressure_start", &self.pressure_start),
            ("pressure_full", &self.pressure_full),
            ("age_threshold_secs", &self.age_threshold_secs),
            ("max_bandwidth_mib", &self.max_bandwidth_mib),
            ("idle_aware", &self.idle_aware),
            ("idle_after_ms", &self.idle_after_ms),
            ("background_rate", &self.background_rate),
        ];
        for (k, v) in named {
            if let Some(v) = v {
                pairs.push((k.to_string(), v.clone()));
            }
        }
        for s in &self.set {
            pairs.push(parse_knob(s)?);
        }
        Ok(pairs)
    }
}

fn parse_knob(s: &str) -> Result<(String, String)> {
    let (k, v) = s.split_once('=').ok_or_else(|| {
        anyhow!(
            "'{s}': expected KNOB=VALUE (knobs: {})",
            writeback::KNOBS.join(", ")
        )
    })?;
    Ok((k.trim().to_string(), v.trim().to_string()))
}

fn main() {
    let matches = Cli::command().subcommand(docs_subcommand()).get_matches();
    if let Some(("generate-docs", m)) = matches.subcommand() {
        let out = m.get_one::<PathBuf>("out").expect("--out is required");
        if let Err(e) = generate_docs(out) {
            eprintln!("wbctl: error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let daemon_like = matches!(cli.command, Cmd::Create(_) | Cmd::Recover { .. });
    let mut logger = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(if daemon_like { "info" } else { "warn" }),
    );
    if journal::stderr_is_journal() {
        logger.format(journal::write_line);
    }
    logger.init();
    let run_dir = cli
        .run_dir
        .clone()
        .map_or_else(RunDir::from_env, RunDir::new);
    // Nothing in a run folder others can write is believed (state files name the devices that
    // `delete --force` removes and `recover` writes to).
    let trusted = match cli.command {
        Cmd::Check { .. } => Ok(()),
        _ => run_dir.check_if_present().map_err(anyhow::Error::from),
    };
    let result = trusted.and_then(|()| match cli.command {
        Cmd::Create(args) => create(&run_dir, *args),
        Cmd::Status {
            name,
            json,
            check: true,
            ..
        } => std::process::exit(status_check(&run_dir, name.as_deref(), json)),
        Cmd::Status {
            name,
            watch: Some(interval),
            count,
            ..
        } => status_watch(&run_dir, name.as_deref(), interval, count),
        Cmd::Status { name, json, .. } => status(&run_dir, name.as_deref(), json),
        Cmd::Metrics { name, output } => metrics(&run_dir, name.as_deref(), output.as_deref()),
        Cmd::List { json } => list(&run_dir, json),
        Cmd::Delete { name, drain, force } => delete(&run_dir, &name, drain, force),
        Cmd::Drain { name } => drain(&run_dir, &name),
        Cmd::Set {
            name,
            knobs,
            runtime_only,
        } => set(&run_dir, &name, &knobs, runtime_only),
        Cmd::Replace { name, old, new } => replace(&run_dir, &name, old, new),
        Cmd::Recover { name, foreground } => recover(&run_dir, &name, foreground),
        Cmd::Check { caches, json } => check(&caches, json),
    });
    if let Err(e) = result {
        eprintln!("wbctl: error: {e:#}");
        std::process::exit(1);
    }
}

fn generate_docs(out: &Path) -> Result<()> {
    let written = wb_tools::docs::generate(Cli::command(), out)
        .with_context(|| format!("writing man pages and completions under {}", out.display()))?;
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

// ------------------------------------------------------------------------------------ create

fn create(run_dir: &RunDir, args: CreateArgs) -> Result<()> {
    let config = match &args.config {
        Some(path) => DeviceConfig::load(path).map_err(|e| anyhow!(e))?,
        None => DeviceConfig::default(),
    };
    let backing = args
        .backing
        .clone()
        .or(config.backing.clone())
        .ok_or_else(|| {
            anyhow!("--backing: no backing device given (flag or `backing` in --config)")
        })?;
    let caches = if args.caches.is_empty() {
        config.caches.clone()
    } else {
        args.caches.clone()
    };
    let mut knobs = config.knobs();
    knobs.extend(args.policy.pairs()?);
    let policy = daemon::apply_knobs(&Policy::default(), &knobs).map_err(|e| {
        anyhow!(
            "{e}{}",
            args.config
                .as_ref()
                .map_or_else(String::new, |p| format!(" (flags and {})", p.display()))
        )
    })?;
    let request = CreateRequest {
        name: args.name.clone(),
        backing,
        caches,
        single_leg: args.single_leg || config.single_leg,
        force: args.force,
        logical_block_size: args.logical_block_size.or(config.logical_block_size),
        policy,
        queues: args
            .queues
            .or(config.queues)
            .unwrap_or_else(wb_target::ublk::default_queue_count),
        depth: args
            .depth
            .or(config.depth)
            .unwrap_or(wb_target::ublk::DEFAULT_QUEUE_DEPTH),
        dev_id: args.dev_id.or(config.dev_id).unwrap_or(-1),
        run_dir: run_dir.clone(),
        event_hook: args.event_hook.clone().or(config.event_hook.clone()),
        config: args.config.clone(),
    };
    let (spec, start) = daemon::check_create(&request)?;
    if let Start::Recover { dev_id, .. } = start {
        match run_dir.load_state(&spec.name) {
            Ok(state) if state.handed_over => log::info!(
                "{}: its daemon stopped and left /dev/ublkb{dev_id} to the kernel; taking it over",
                spec.name
            ),
            _ => log::warn!(
                "{}: its daemon died and left /dev/ublkb{dev_id}; recovering it",
                spec.name
            ),
        }
    }
    if args.foreground {
        run_foreground(spec, start)
    } else {
        spawn_detached(run_dir, &args.name)
    }
}

fn run_foreground(spec: DaemonSpec, start: Start) -> Result<()> {
    let detached = std::env::var_os(DETACHED_ENV).is_some();
    daemon::run(spec, start, move |device: &str| {
        println!("{device}");
        let _ = std::io::stdout().flush();
        if detached {
            redirect_stdout_to_null();
        }
    })?;
    Ok(())
}

/// After the parent read the device line it stops reading; later prints must not fail.
fn redirect_stdout_to_null() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto fd 1 replaces stdout atomically; both fds are valid and owned.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

/// Re-runs this very command with `--foreground` as a detached daemon (own session, stdin
/// closed, log in the run folder) and waits until it reports its device or fails.
fn spawn_detached(run_dir: &RunDir, name: &str) -> Result<()> {
    run_dir.prepare()?;
    let log_path = run_dir.log(name);
    let mut log = run_dir
        .open_log(name)
        .context("cannot open the daemon log")?;
    let log_start = log.seek(std::io::SeekFrom::End(0)).unwrap_or(0);
    let exe = std::env::current_exe().context("cannot find the wbctl executable")?;
    let mut command = Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .arg("--foreground")
        .env(DETACHED_ENV, "1")
        .env(control::RUN_DIR_ENV, &run_dir.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.try_clone()?);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn().context("cannot start the daemon")?;
    let stdout = child.stdout.take().expect("piped");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let device = line.trim();
    if device.starts_with("/dev/") {
        println!("{device}");
        return Ok(());
    }
    let status = child.wait()?;
    let mut text = String::new();
    if let Ok(mut f) = control::open_private(&log_path, control::Access::Read, false) {
        let _ = f.seek(std::io::SeekFrom::Start(log_start));
        let _ = f.read_to_string(&mut text);
    }
    let _ = writeln!(log, "(daemon exited: {status})");
    let reason = text
        .lines()
        .rev()
        .find(|l| l.contains("error"))
        .unwrap_or("no message")
        .trim()
        .trim_start_matches("wbctl: error: ")
        .to_string();
    bail!(
        "{name}: the daemon failed to start ({status}): {reason} (log: {})",
        log_path.display()
    )
}

fn recover(run_dir: &RunDir, name: &str, foreground: bool) -> Result<()> {
    let (spec, start) = daemon::check_recover(name, run_dir)?;
    if foreground {
        run_foreground(spec, start)
    } else {
        spawn_detached(run_dir, name)
    }
}

// ------------------------------------------------------------------------------ talking to daemons

/// The socket of a running daemon, or an error saying why there is none.
/// The devices of the run folder; only root may list them.
fn device_names(run_dir: &RunDir) -> Result<Vec<String>> {
    run_dir.names().map_err(|e| {
        let shown = run_dir.path.display();
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => anyhow!(
                "{shown}: permission denied: run as root (only root may see or control \
                 writeboost devices)"
            ),
            _ => anyhow!("{shown}: cannot list the devices: {e}"),
        }
    })
}

fn daemon_socket(run_dir: &RunDir, name: &str) -> Result<PathBuf> {
    control::validate_name(name).map_err(|e| anyhow!(e))?;
    let socket = run_dir.socket(name);
    match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(_) => return Ok(socket),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "{name}: {}: permission denied (only root may control writeboost devices)",
            socket.display()
        ),
        Err(_) => {}
    }
    match run_dir.load_state(name) {
        Ok(state) if state.handed_over => bail!(
            "{name}: stopped with {} in use; the kernel holds its I/O until the next start \
             (`systemctl start writeboost@{name}` or `wbctl recover {name}`)",
            state.device
        ),
        Ok(state) => bail!(
            "{name}: its daemon (pid {}) is not running; {} waits for it: `wbctl recover {name}`",
            state.pid,
            state.device
        ),
        Err(_) => bail!("{name}: no such device (`wbctl list` shows the devices)"),
    }
}

fn call(socket: &Path, request: &Request, on_progress: impl FnMut(&Progress)) -> Result<Reply> {
    let timeout = match request {
        Request::Status | Request::Set { .. } => Some(control::REPLY_TIMEOUT),
        // A drain reports progress; a delete waits for the device to stop and the log to flush.
        Request::Drain | Request::Delete { .. } | Request::Replace { .. } => None,
    };
    control::call(socket, request, timeout, on_progress)
        .with_context(|| format!("{}: talking to the daemon", socket.display()))
}

fn fetch_status(run_dir: &RunDir, name: &str) -> Result<DeviceStatus> {
    let socket = daemon_socket(run_dir, name)?;
    match call(&socket, &Request::Status, |_| {})? {
        Reply::Status { status } => Ok(*status),
        Reply::Error { error } => bail!("{error}"),
        other => bail!("{name}: unexpected reply {other:?}"),
    }
}

/// `status [NAME]`: the table, or one JSON document of the same shape for one device or all
/// (a device whose daemon does not answer is `{"name", "mode": "down", "error"}` in it when all
/// are shown; asked for by name, it is an error, as in the table).
fn status(run_dir: &RunDir, name: Option<&str>, json: bool) -> Result<()> {
    if let Some(name) = name {
        let s = fetch_status(run_dir, name)?;
        let ssds = leg_ssds(&s);
        if json {
            let document = status_view::json_document(vec![status_view::device_json(&s, &ssds)?]);
            println!("{}", serde_json::to_string_pretty(&document)?);
        } else {
            print!("{}", human_status(&s, &ssds));
        }
        return Ok(());
    }
    let mut all = Vec::new();
    let mut text = String::new();
    for name in device_names(run_dir)? {
        match fetch_status(run_dir, &name) {
            Ok(s) => {
                let ssds = leg_ssds(&s);
                text.push_str(&human_status(&s, &ssds));
                all.push(status_view::device_json(&s, &ssds)?);
            }
            Err(e) => {
                text.push_str(&format!("{name}: DOWN: {e:#}\n"));
                all.push(
                    serde_json::json!({ "name": name, "mode": "down", "error": format!("{e:#}") }),
                );
            }
        }
    }
    if json {
        let document = status_view::json_document(all);
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else if all.is_empty() {
        println!("no writeboost devices");
    } else {
        print!("{text}");
    }
    Ok(())
}

/// The SSD health of a device's legs, read here (NVMe ioctl, smartctl), never by the daemon.
fn leg_ssds(s: &DeviceStatus) -> LegHealth {
    ssd_health::read_all(s.legs.iter().map(|l| l.path.as_str()))
}

/// `status -x`: a verdict line per device (JSON objects with --json); returns the exit status,
/// the worst verdict.
fn status_check(run_dir: &RunDir, name: Option<&str>, json: bool) -> i32 {
    let names = match name {
        Some(n) => Ok(vec![n.to_string()]),
        None => device_names(run_dir),
    };
    let verdicts: Vec<(String, Health, String)> = match names {
        Ok(names) => names
            .into_iter()
            .map(|n| {
                let (h, why) = device_health(run_dir, &n);
                (n, h, why)
            })
            .collect(),
        Err(e) => vec![("writeboost".into(), Health::Unknown, format!("{e:#}"))],
    };
    let worst = verdicts
        .iter()
        .fold(Health::Ok, |worst, (_, h, _)| worst.worst(*h));
    if json {
        let all: Vec<_> = verdicts
            .iter()
            .map(|(n, h, why)| {
                serde_json::json!({ "name": n, "health": h.label(), "code": h.exit_code(), "reason": why })
            })
            .collect();
        let mut document = status_view::json_document(all);
        document["health"] = worst.label().into();
        document["code"] = worst.exit_code().into();
        println!("{document}");
    } else if verdicts.is_empty() {
        println!("writeboost: OK - no devices");
    }
    for (n, h, why) in verdicts.iter().filter(|_| !json) {
        println!("{n}: {} - {why}", h.label());
    }
    worst.exit_code()
}

/// `status --watch`: a header, then a line per device every `interval` (`count` rounds, or
/// until interrupted). The devices are listed again each round, so one created or deleted
/// meanwhile appears or goes.
fn status_watch(
    run_dir: &RunDir,
    name: Option<&str>,
    interval: Duration,
    count: Option<u64>,
) -> Result<()> {
    println!("{}", status_view::watch_header());
    let mut next = Instant::now();
    for round in 0.. {
        if count.is_some_and(|k| round >= k) {
            break;
        }
        if round > 0 {
            next += interval;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        let names = match name {
            Some(n) => vec![n.to_string()],
            None => device_names(run_dir)?,
        };
        for n in names {
            match fetch_status(run_dir, &n) {
                Ok(s) => println!("{}", status_view::watch_line(&s)),
                Err(e) => println!("{}", status_view::watch_line_down(&n, &format!("{e:#}"))),
            }
        }
    }
    Ok(())
}

/// `metrics [NAME]`: the exposition of one device or all, on stdout or into a file that a
/// reader never sees half-written. A device that has a state file but no answering daemon is
/// `writeboost_daemon_up 0`; a name with neither is an error, as in `status`.
fn metrics(run_dir: &RunDir, name: Option<&str>, output: Option<&Path>) -> Result<()> {
    let names = match name {
        Some(n) => vec![n.to_string()],
        None => device_names(run_dir)?,
    };
    let mut scrapes = Vec::new();
    let mut ssds = LegHealth::new();
    for n in names {
        match fetch_status(run_dir, &n) {
            Ok(s) => {
                ssds.extend(leg_ssds(&s));
                scrapes.push(Scrape::Up(Box::new(s)))
            }
            // Listed from its state file, or one named that has a state file: down.
            Err(_) if name.is_none() || has_state_file(run_dir, &n) => {
                scrapes.push(Scrape::Down(n))
            }
            Err(e) => return Err(e),
        }
    }
    let text = wb_tools::metrics::exposition_with_health(&scrapes, &ssds);
    match output {
        None => print!("{text}"),
        Some(file) => wb_tools::metrics::write_atomically(file, text.as_bytes())
            .with_context(|| format!("{}: writing the metrics", file.display()))?,
    }
    Ok(())
}

fn has_state_file(run_dir: &RunDir, name: &str) -> bool {
    control::validate_name(name).is_ok() && run_dir.state(name).exists()
}

/// The verdict on one device: from its status, or from why the status could not be read.
fn device_health(run_dir: &RunDir, name: &str) -> (Health, String) {
    match fetch_status(run_dir, name) {
        Ok(s) => health::of_status_and_ssds(&s, &leg_ssds(&s)),
        Err(e) => {
            let down = run_dir
                .load_state(name)
                .is_ok_and(|state| !daemon::daemon_running(&state, run_dir));
            health::of_error(down, &format!("{e:#}"))
        }
    }
}

fn human_status(s: &DeviceStatus, ssds: &LegHealth) -> String {
    let mut out = String::new();
    status_headline(&mut out, s);
    status_devices(&mut out, s, ssds);
    status_traffic(&mut out, s);
    status_setup(&mut out, s);
    out
}

/// The device, its mode, and what went wrong: a failure, a lost cache.
fn status_headline(w: &mut String, s: &DeviceStatus) {
    let _ = writeln!(
        w,
        "{}: {} (pid {}), mode {}",
        s.name, s.device, s.pid, s.mode
    );
    if let Some(f) = &s.failure {
        let _ = writeln!(w, "  FAILURE    {f}");
    }
    if let Some(lost) = &s.cache_lost {
        let took = lost.lost_dirty_bytes.map_or(String::new(), |b| {
            format!(" ({} of acknowledged writes)", bytes(b))
        });
        let _ = writeln!(
            w,
            "  CACHE LOST every leg failed: log segments {}..={}{took} are gone and will never be \
             replayed;\n             the backing device holds the state through segment {} (an \
             earlier FLUSH's). Attach new legs: `wbctl replace`",
            lost.lost_from_id, lost.lost_through_id, lost.backing_holds_id
        );
    } else if let Some(id) = s.cache_lost_at {
        let _ = writeln!(
            w,
            "  CACHE LOST every leg failed; the backing device holds the state through segment {id}"
        );
    }
}

/// The backing device, the cache legs (with their SSD health) and how full the cache is.
fn status_devices(w: &mut String, s: &DeviceStatus, ssds: &LegHealth) {
    let _ = writeln!(
        w,
        "  backing    {} ({}, logical block {})",
        s.backing,
        bytes(s.device_size_bytes),
        s.logical_block_size
    );
    for (i, l) in s.legs.iter().enumerate() {
        let _ = writeln!(
            w,
            "  leg {i}      {} {} (errors: {} read, {} write; {} repaired)",
            l.path, l.health, l.read_errors, l.write_errors, l.repairs
        );
        if let Some(h) = ssds.get(&l.path) {
            let _ = writeln!(w, "             ssd {}", h.summary());
        }
    }
    let _ = writeln!(
        w,
        "  cache      {} used of {} ({:.1} %; log {}), {} dirty ({:.1} %), writeback lag {}",
        bytes(s.used_bytes),
        bytes(s.capacity_bytes),
        percent(s.used_bytes, s.capacity_bytes),
        bytes(s.log_bytes),
        bytes(s.dirty_bytes),
        s.dirty_percent,
        human_duration(s.oldest_dirty_age_secs)
    );
}

/// The log's progress and the I/O through the device: reads, writes, writeback, stalls.
fn status_traffic(w: &mut String, s: &DeviceStatus) {
    let _ = writeln!(
        w,
        "  segments   current {}, last flushed {}, last written back {} (epoch {})",
        s.segments.current_id,
        s.segments.last_flushed_id,
        s.segments.last_written_back_id,
        s.epoch_id
    );
    let _ = writeln!(
        w,
        "  reads      {} requests; blocks: {} hits, {} misses ({:.1} % hits)",
        s.reads.requests,
        s.reads.hits,
        s.reads.misses,
        percent(s.reads.hits, s.reads.hits + s.reads.misses)
    );
    let _ = writeln!(
        w,
        "  writes     {} requests, {}, {} flushes; now {}/s",
        s.writes,
        bytes(s.write_bytes),
        s.flushes,
        bytes(s.write_bytes_per_sec)
    );
    let _ = writeln!(
        w,
        "  writeback  {} in {} I/Os, {} backing errors; now {}/s",
        bytes(s.written_back_bytes),
        s.backing_write_ios,
        s.backing_errors,
        bytes(s.written_back_bytes_per_sec)
    );
    if s.passthrough_writes > 0 {
        let _ = writeln!(
            w,
            "  passthru   {} writes straight to the backing device",
            s.passthrough_writes
        );
    }
    let _ = writeln!(
        w,
        "  stalls     {} ms waiting for cache space ({} ms in the last minute)",
        s.stall_ms, s.stall_ms_last_minute
    );
}

/// The writeback knobs and the ublk setup.
fn status_setup(w: &mut String, s: &DeviceStatus) {
    let knobs: Vec<String> = s
        .policy
        .iter()
        .map(|(k, v)| match v.as_str() {
            Some(text) => format!("{k}={text}"),
            None => format!("{k}={v}"),
        })
        .collect();
    let _ = writeln!(w, "  policy     {}", knobs.join(" "));
    let _ = writeln!(
        w,
        "  ublk       {} queues × depth {}, up {}, metadata {}",
        s.queues,
        s.depth,
        human_duration(s.uptime_secs),
        bytes(s.metadata_bytes)
    );
}

/// `512 B`, `1.5 GiB`: powers of 1024, one decimal.
fn bytes(n: u64) -> String {
    ByteSize(n).display().iec().to_string()
}

#[derive(Serialize)]
struct ListEntry {
    name: String,
    device: String,
    pid: u32,
    running: bool,
    backing: PathBuf,
    caches: Vec<PathBuf>,
}

fn list(run_dir: &RunDir, json: bool) -> Result<()> {
    let mut entries = Vec::new();
    for name in device_names(run_dir)? {
        let state = match run_dir.load_state(&name) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("wbctl: warning: {e}");
                continue;
            }
        };
        entries.push(ListEntry {
            running: daemon::daemon_running(&state, run_dir),
            name,
            device: state.device,
            pid: state.pid,
            backing: state.backing,
            caches: state.caches,
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    if entries.is_empty() {
        println!("no writeboost devices");
        return Ok(());
    }
    println!("{}", list_table(&entries));
    Ok(())
}

/// `list`'s table: a column per field, as wide as its widest cell, two spaces apart.
fn list_table(entries: &[ListEntry]) -> String {
    let mut table = Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_header(["NAME", "DEVICE", "PID", "DAEMON", "BACKING", "CACHE"]);
    for e in entries {
        let caches: Vec<String> = e.caches.iter().map(|c| c.display().to_string()).collect();
        table.add_row([
            e.name.clone(),
            e.device.clone(),
            e.pid.to_string(),
            if e.running { "running" } else { "DEAD" }.to_string(),
            e.backing.display().to_string(),
            caches.join(","),
        ]);
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    if let Some(pid) = table.column_mut(2) {
        pid.set_cell_alignment(CellAlignment::Right);
    }
    // The padding of the last column would leave trailing blanks.
    table.trim_fmt()
}

fn set(run_dir: &RunDir, name: &str, knobs: &[String], runtime_only: bool) -> Result<()> {
    let pairs: Vec<(String, String)> =
        knobs.iter().map(|k| parse_knob(k)).collect::<Result<_>>()?;
    // Catch typos before talking to the daemon (it checks again against its own knobs).
    if let Err(e) = daemon::apply_knobs(&Policy::default(), &pairs) {
        if !e.0.contains("must be below") {
            bail!("{name}: {e}; nothing changed");
        }
    }
    let socket = daemon_socket(run_dir, name)?;
    match call(
        &socket,
        &Request::Set {
            knobs: pairs.clone(),
        },
        |_| {},
    )? {
        Reply::Done { message } => {
            println!("{message}");
            if !runtime_only {
                save_knobs(run_dir, name, &pairs)?;
            }
            Ok(())
        }
        Reply::Error { error } => bail!("{error}"),
        other => bail!("{name}: unexpected reply {other:?}"),
    }
}

/// Writes knobs just applied into the device's configuration file (the one it was created
/// from), keeping the file's comments and layout; replaced atomically (temporary + rename).
fn save_knobs(run_dir: &RunDir, name: &str, pairs: &[(String, String)]) -> Result<()> {
    let Some(path) = run_dir.load_state(name).ok().and_then(|s| s.config) else {
        println!("{name}: not saved: the device was not created from a configuration file");
        return Ok(());
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: set, but not saved", path.display()))?;
    let edited = daemon::config::with_knobs(&text, pairs)
        .map_err(|e| anyhow!("{}: set, but not saved: {e}", path.display()))?;
    let tmp = path.with_extension("toml.tmp");
    let mode = std::fs::metadata(&path)?.permissions();
    std::fs::write(&tmp, edited)
        .and_then(|()| std::fs::set_permissions(&tmp, mode))
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("{}: set, but not saved", path.display()))?;
    println!("{name}: saved in {}", path.display());
    Ok(())
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:40}] {pos}/{len} segments written back, {msg} dirty, {elapsed} (eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

fn update_bar(bar: &ProgressBar, p: &Progress) {
    bar.set_length(p.segments_done + p.segments_left);
    bar.set_position(p.segments_done);
    bar.set_message(bytes(p.dirty_bytes));
}

fn drain(run_dir: &RunDir, name: &str) -> Result<()> {
    let socket = daemon_socket(run_dir, name)?;
    let bar = progress_bar();
    bar.set_prefix(name.to_string());
    let reply = call(&socket, &Request::Drain, |p| update_bar(&bar, p))?;
    bar.finish_and_clear();
    match reply {
        Reply::Done { message } => {
            println!("{message}");
            Ok(())
        }
        Reply::Error { error } => bail!("{error}"),
        other => bail!("{name}: unexpected reply {other:?}"),
    }
}

fn delete(run_dir: &RunDir, name: &str, drain: bool, force: bool) -> Result<()> {
    control::validate_name(name).map_err(|e| anyhow!(e))?;
    let socket = run_dir.socket(name);
    if !control::daemon_answers(&socket) {
        let state = match run_dir.load_state(name) {
            Ok(state) => state,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("{name}: no such device (`wbctl list` shows the devices)")
            }
            Err(e) => bail!("{name}: {e}"),
        };
        if daemon::daemon_running(&state, run_dir) {
            bail!(
                "{name}: its daemon (pid {}) runs but does not answer on {}; try again",
                state.pid,
                socket.display()
            );
        }
        if !force {
            bail!(
                "{name}: its daemon (pid {}) is not running; run `wbctl recover {name}` first \
                 (then delete), or pass --force to remove {} without recovering it",
                state.pid,
                state.device
            );
        }
        if drain {
            bail!("{name}: cannot drain without a running daemon; `wbctl recover {name}` first");
        }
        let removed = match wb_target::ublk::delete_device(state.dev_id) {
            Ok(s) => format!("removed {} (it was {s})", state.device),
            Err(e) => format!("{}: {e}", state.device),
        };
        let _ = std::fs::remove_file(run_dir.state(name));
        let _ = std::fs::remove_file(&socket);
        let buffer = run_dir.buffer(name);
        let kept = if buffer.exists() {
            format!(
                "; acknowledged writes not yet on the cache stay in {}: `wbctl create {name}` \
                 with the same devices adopts them",
                buffer.display()
            )
        } else {
            String::new()
        };
        println!("{name}: {removed}{kept}");
        return Ok(());
    }
    let bar = progress_bar();
    bar.set_prefix(name.to_string());
    let reply = call(&socket, &Request::Delete { drain, force }, |p| {
        update_bar(&bar, p)
    })?;
    bar.finish_and_clear();
    match reply {
        Reply::Done { message } => {
            println!("{message}");
            Ok(())
        }
        Reply::Error { error } => bail!("{error}"),
        other => bail!("{name}: unexpected reply {other:?}"),
    }
}

fn replace(run_dir: &RunDir, name: &str, old: PathBuf, new: PathBuf) -> Result<()> {
    let socket = daemon_socket(run_dir, name)?;
    eprintln!(
        "{name}: writing the cache back before the new leg is attached (passthrough meanwhile)..."
    );
    match call(&socket, &Request::Replace { old, new }, |_| {})? {
        Reply::Done { message } => {
            println!("{message}");
            Ok(())
        }
        Reply::Error { error } => bail!("{error}"),
        other => bail!("{name}: unexpected reply {other:?}"),
    }
}

// ------------------------------------------------------------------------------------- check

#[derive(Serialize)]
struct LegCheck {
    path: String,
    size_bytes: u64,
    leg_index: Option<u32>,
    superblock: String,
}

#[derive(Serialize)]
struct CheckReport {
    legs: Vec<LegCheck>,
    uuid: String,
    format_version: u32,
    created: String,
    created_unix_secs: u64,
    leg_count: u32,
    backing_size_bytes: u64,
    backing_fingerprint: String,
    logical_block_size: u32,
    segment_count: u64,
    capacity_bytes: u64,
    checkpoint: Option<CheckpointReport>,
    /// First and last id of the live log (segments not yet written back), if any.
    live_first_id: u64,
    live_last_id: u64,
    live_segments: u64,
    dirty_blocks: u64,
    dirty_bytes: u64,
    clean: bool,
    replay_stop_reason: String,
    segments_data_verified: u64,
    /// Where the log goes on after its head: ring slot and block of the slot.
    next_slot: u64,
    next_block: u32,
    bytes_read: u64,
    /// Why the checkpoint cannot be trusted (a start refuses such a cache).
    checkpoint_error: Option<String>,
    faults: FaultReport,
}

/// The fault record: the newest of the legs' checkpoints and the host's fault file.
#[derive(Serialize)]
struct FaultReport {
    sequence: u64,
    /// Legs out of use until replaced.
    failed_legs: Vec<u32>,
    /// Every leg was lost: the log is never replayed.
    cache_lost: Option<LostReport>,
    /// The host's copy, if there is one.
    fault_file: Option<String>,
    /// Where the newest record was read: "legs", "fault file" or "none".
    source: &'static str,
}

#[derive(Serialize)]
struct LostReport {
    backing_holds_id: u64,
    lost_from_id: u64,
    lost_through_id: u64,
}

/// The newest fault record of the cache set: its legs' checkpoint and the host's file.
fn fault_report(report: &wb_target::ScanReport, uuid: &[u8; 16]) -> Result<FaultReport> {
    let file = wb_target::engine::faults::FaultFile::new(
        &wb_target::engine::faults::fault_dir_from_env(),
        uuid,
    );
    let on_legs = report.checkpoint.map(|c| c.faults).unwrap_or_default();
    let in_file = file.load()?;
    let newest = wb_target::engine::faults::newest(on_legs, in_file);
    let source = match (newest.sequence, in_file) {
        (0, _) => "none",
        (_, Some(f)) if f.sequence == newest.sequence && on_legs.sequence < f.sequence => {
            "fault file"
        }
        _ => "legs",
    };
    Ok(FaultReport {
        sequence: newest.sequence,
        failed_legs: (0..2).filter(|&i| newest.leg_failed(i as usize)).collect(),
        cache_lost: newest.cache_lost.map(|l| LostReport {
            backing_holds_id: l.backing_holds_id,
            lost_from_id: l.backing_holds_id + 1,
            lost_through_id: l.log_through_id,
        }),
        fault_file: in_file.map(|_| file.path().display().to_string()),
        source,
    })
}

fn print_faults(f: &FaultReport) {
    if f.sequence == 0 {
        println!("  faults    none recorded");
        return;
    }
    let file = f
        .fault_file
        .as_deref()
        .map_or(String::new(), |p| format!(", host copy {p}"));
    println!(
        "  faults    record {} (newest on the {}{file})",
        f.sequence, f.source
    );
    if !f.failed_legs.is_empty() {
        println!(
            "  FAILED    leg(s) {:?}: out of use until replaced (`wbctl replace`)",
            f.failed_legs
        );
    }
    if let Some(l) = &f.cache_lost {
        println!(
            "  LOST      every leg failed: segments {}..={} are gone and never replayed; the \
             backing device holds the state through segment {}",
            l.lost_from_id, l.lost_through_id, l.backing_holds_id
        );
    }
}

#[derive(Serialize)]
struct CheckpointReport {
    sequence: u64,
    last_written_back_id: u64,
    last_written_back_epoch: u64,
}

fn check(caches: &[PathBuf], json: bool) -> Result<()> {
    if caches.len() > 2 {
        bail!(
            "--cache: {} given; a cache set has one or two legs",
            caches.len()
        );
    }
    let (devices, legs) = open_legs_read_only(caches)?;
    let superblocks = wb_target::read_superblocks(&devices)?;
    let sb = superblocks[0].clone();
    if sb.leg_count as usize != devices.len() && !json {
        eprintln!(
            "wbctl: note: the cache set has {} legs; {} given",
            sb.leg_count,
            devices.len()
        );
    }
    let report = wb_target::scan(&CacheLegs::new(devices.clone()), &sb);
    let faults = fault_report(&report, &sb.uuid)?;
    let r = check_report(&sb, &report, faults, legs);
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    print_check(&r);
    if std::io::stdout().is_terminal() {
        let _ = std::io::stdout().flush();
    }
    Ok(())
}

/// The cache devices, opened, and what `check` reports of each.
type OpenedLegs = (Vec<Arc<dyn Device>>, Vec<LegCheck>);

/// Opens each cache device read-only and reads its own superblock, in the order given: the
/// first that is missing or is not a writeboost cache is named in the error.
fn open_legs_read_only(caches: &[PathBuf]) -> Result<OpenedLegs> {
    let mut devices: Vec<Arc<dyn Device>> = Vec::new();
    let mut legs = Vec::new();
    for path in caches {
        let device = FileDevice::open_read_only(path).map_err(|e| {
            anyhow!(
                "{}: {}",
                path.display(),
                match e.kind() {
                    std::io::ErrorKind::NotFound => "no such device or file".to_string(),
                    _ => e.to_string(),
                }
            )
        })?;
        let device: Arc<dyn Device> = Arc::new(device);
        let sb = wb_target::read_superblocks(std::slice::from_ref(&device))
            .map_err(|e| anyhow!("{e}: not a writeboost cache, or its superblock is damaged"))?;
        legs.push(LegCheck {
            path: path.display().to_string(),
            size_bytes: device.size_bytes(),
            leg_index: Some(sb[0].leg_index),
            superblock: "ok".into(),
        });
        devices.push(device);
    }
    Ok((devices, legs))
}

/// What `check` reports: the superblock's fields, then what the scan found.
fn check_report(
    sb: &logfmt::Superblock,
    report: &wb_target::ScanReport,
    faults: FaultReport,
    legs: Vec<LegCheck>,
) -> CheckReport {
    let block = logfmt::BLOCK_SIZE_BYTES as u64;
    CheckReport {
        uuid: wb_target::hex(&sb.uuid),
        format_version: logfmt::FORMAT_VERSION,
        created: daemon::format_unix_time(sb.created_unix_secs),
        created_unix_secs: sb.created_unix_secs,
        leg_count: sb.leg_count,
        backing_size_bytes: sb.backing_size_bytes,
        backing_fingerprint: wb_target::hex(&sb.backing_fingerprint),
        logical_block_size: sb.logical_block_size,
        segment_count: sb.segment_count,
        capacity_bytes: sb.segment_count * logfmt::DATA_BLOCKS_PER_SEGMENT as u64 * block,
        checkpoint: report.checkpoint.map(|c| CheckpointReport {
            sequence: c.sequence,
            last_written_back_id: c.last_written_back_id,
            last_written_back_epoch: c.last_written_back_epoch,
        }),
        live_first_id: report.written_back_id() + 1,
        live_last_id: report.head_id(),
        live_segments: report.headers.len() as u64,
        dirty_blocks: report.dirty_data_blocks(),
        dirty_bytes: report.dirty_data_blocks() * block,
        clean: !report.is_dirty(),
        replay_stop_reason: report.stop_reason.clone(),
        segments_data_verified: report.data_verified,
        next_slot: report.next_position.slot,
        next_block: report.next_position.block,
        bytes_read: report.bytes_read,
        checkpoint_error: report.checkpoint_error.clone(),
        faults,
        legs,
    }
}

/// `check` for people: the cache set, its faults, its log.
fn print_check(r: &CheckReport) {
    print_cache_set(r);
    print_faults(&r.faults);
    print_live_log(r);
}

/// The cache set: its legs, backing device, geometry and checkpoint.
fn print_cache_set(r: &CheckReport) {
    println!(
        "cache set {} (format v{}), created {}, {} leg(s)",
        r.uuid, r.format_version, r.created, r.leg_count
    );
    for l in &r.legs {
        println!(
            "  leg {}     {} ({}), superblock {}",
            l.leg_index.map_or("?".into(), |i| i.to_string()),
            l.path,
            bytes(l.size_bytes),
            l.superblock
        );
    }
    println!(
        "  backing   {} bytes, identity fingerprint {}",
        r.backing_size_bytes, r.backing_fingerprint
    );
    println!(
        "  geometry  {} segments of 512 KiB ({} of data), logical block size {}",
        r.segment_count,
        bytes(r.capacity_bytes),
        r.logical_block_size
    );
    match &r.checkpoint {
        Some(c) => println!(
            "  checkpoint sequence {}: written back through segment {} (epoch {})",
            c.sequence, c.last_written_back_id, c.last_written_back_epoch
        ),
        None => println!(
            "  checkpoint UNUSABLE: {} (a start refuses this cache)",
            r.checkpoint_error.as_deref().unwrap_or("none valid")
        ),
    }
}

/// The live log, how much the scan read, and the state: what a start would find.
fn print_live_log(r: &CheckReport) {
    if r.live_segments == 0 {
        println!("  live log  empty");
    } else {
        println!(
            "  live log  segments {}..={} ({} segments), {} dirty blocks ({})",
            r.live_first_id,
            r.live_last_id,
            r.live_segments,
            r.dirty_blocks,
            bytes(r.dirty_bytes)
        );
    }
    println!("  replay    stops: {}", r.replay_stop_reason);
    println!(
        "  next      segment goes to slot {} block {}",
        r.next_slot, r.next_block
    );
    let leg_size: u64 = r.legs.iter().map(|l| l.size_bytes).sum::<u64>().max(1);
    println!(
        "  read      {} bytes ({:.3} % of the cache), data of {} segment(s) verified",
        r.bytes_read,
        100.0 * r.bytes_read as f64 / leg_size as f64,
        r.segments_data_verified
    );
    println!("  state     {}", check_state(r));
}

/// The cache's state in a line: lost, clean (nothing to write back) or dirty.
fn check_state(r: &CheckReport) -> String {
    if let Some(l) = &r.faults.cache_lost {
        format!(
            "LOST: the backing device holds the state through segment {}; a start comes up \
             in passthrough",
            l.backing_holds_id
        )
    } else if r.clean {
        "clean: the backing device holds everything".to_string()
    } else {
        format!(
            "DIRTY: {} to write back; attach it to its backing device (`wbctl create`) \
             and drain it",
            bytes(r.dirty_bytes)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_shapes_parse() {
        Cli::command_for_tests().debug_assert();
        let cli = Cli::try_parse_from([
            "wbctl",
            "create",
            "d0",
            "--backing",
            "/dev/b",
            "--cache",
            "/dev/c0",
            "--cache",
            "/dev/c1",
            "--low-watermark",
            "20%",
            "--set",
            "idle_aware=off",
        ])
        .unwrap();
        let Cmd::Create(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.caches.len(), 2);
        assert_eq!(
            args.policy.pairs().unwrap(),
            vec![
                ("low_watermark".to_string(), "20%".to_string()),
                ("idle_aware".to_string(), "off".to_string())
            ]
        );
        assert!(Cli::try_parse_from(["wbctl", "set", "d0"]).is_err());
        assert!(Cli::try_parse_from(["wbctl", "check"]).is_err());
        Cli::try_parse_from(["wbctl", "delete", "d0", "--drain"]).unwrap();
        Cli::try_parse_from(["wbctl", "status", "--json"]).unwrap();
        let cli = Cli::try_parse_from(["wbctl", "status", "--watch", "2s", "--count", "3"]);
        let Cmd::Status { watch, count, .. } = cli.unwrap().command else {
            panic!()
        };
        assert_eq!((watch, count), (Some(Duration::from_secs(2)), Some(3)));
        for bad in [
            vec!["wbctl", "status", "--count", "3"],
            vec!["wbctl", "status", "--watch", "0"],
            vec!["wbctl", "status", "--watch", "1", "-x"],
            vec!["wbctl", "status", "--watch", "1", "--json"],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../systemd/example.toml");
        let c: DeviceConfig = toml::from_str(text).unwrap();
        assert!(c.backing.is_some());
        assert_eq!(c.caches.len(), 2);
        assert_eq!(c.dev_id, Some(0));
        daemon::apply_knobs(&Policy::default(), &c.knobs()).unwrap();
    }

    /// The metrics unit's command line is one this wbctl takes, writing to the folder Debian's
    /// node_exporter reads.
    #[test]
    fn metrics_unit_runs_a_valid_command() {
        let unit = include_str!("../../systemd/writeboost-metrics.service");
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart=/usr/sbin/wbctl "))
            .expect("an ExecStart running /usr/sbin/wbctl");
        let cli = Cli::try_parse_from(std::iter::once("wbctl").chain(exec.split_whitespace()));
        let Cmd::Metrics { name, output } = cli.unwrap().command else {
            panic!("{exec}: not `wbctl metrics`")
        };
        assert_eq!(name, None, "every device");
        assert_eq!(
            output,
            Some(PathBuf::from(
                "/var/lib/prometheus/node-exporter/writeboost.prom"
            ))
        );
    }

    #[test]
    fn the_list_table_lines_up() {
        let entry = |name: &str, device: &str, pid, running, caches: &[&str]| ListEntry {
            name: name.into(),
            device: device.into(),
            pid,
            running,
            backing: "/dev/sda".into(),
            caches: caches.iter().map(PathBuf::from).collect(),
        };
        let text = list_table(&[
            entry(
                "d0",
                "/dev/ublkb0",
                1234,
                true,
                &["/dev/nvme0n1", "/dev/nvme1n1"],
            ),
            entry("tank_volume_1", "/dev/ublkb12", 7, false, &["/dev/x"]),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        let words = |line: &str| line.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(words(lines[0]), "NAME DEVICE PID DAEMON BACKING CACHE");
        assert_eq!(
            words(lines[1]),
            "d0 /dev/ublkb0 1234 running /dev/sda /dev/nvme0n1,/dev/nvme1n1"
        );
        assert_eq!(
            words(lines[2]),
            "tank_volume_1 /dev/ublkb12 7 DEAD /dev/sda /dev/x"
        );
        assert_eq!(lines.len(), 3, "{text}");
        let at = |line: &str, word: &str| line.find(word).unwrap();
        for (title, value) in [
            ("DEVICE", "/dev/ublkb12"),
            ("DAEMON", "DEAD"),
            ("CACHE", "/dev/x"),
        ] {
            assert_eq!(at(lines[0], title), at(lines[2], value), "{title}:\n{text}");
        }
        // The PID column is right-aligned: numbers end where its title ends.
        assert_eq!(
            at(lines[0], "PID") + 3,
            at(lines[1], "1234") + 4,
            "\n{text}"
        );
        assert_eq!(at(lines[0], "PID") + 3, at(lines[2], " 7 ") + 2, "\n{text}");
        assert!(
            text.lines().all(|l| l == l.trim_end()),
            "trailing blanks:\n{text}"
        );
    }

    impl Cli {
        fn command_for_tests() -> clap::Command {
            <Cli as clap::CommandFactory>::command()
        }
    }
}
