//! The `ssegate` binary: parse flags, load the config, build the server, run.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing_subscriber::EnvFilter;

// jemalloc, as pingora deployments commonly do: glibc malloc's free lists were a
// seventh of the profile under ordinary requests. Measured against glibc and mimalloc
// in BENCHMARKS.md ("Ordinary requests"): as fast as mimalloc, with less memory held
// per open stream.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// An edge gateway that makes Server-Sent Events work behind real infrastructure.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Path of the TOML configuration file.
    #[arg(
        short = 'c',
        long = "conf",
        value_name = "FILE",
        default_value = "conf/ssegate.toml"
    )]
    conf: PathBuf,

    /// Check the configuration and exit: 0 when valid, 1 with every error otherwise.
    #[arg(short = 't', long = "test")]
    test: bool,

    /// Take the listening sockets over from a running ssegate (graceful upgrade; the
    /// old process must then be sent SIGQUIT).
    #[arg(short = 'u', long = "upgrade")]
    upgrade: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match ssegate::config::Config::load(&cli.conf) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("ssegate: configuration has {} error(s):", errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            return ExitCode::from(1);
        }
    };
    if cli.test {
        println!("ssegate: configuration {} is valid", cli.conf.display());
        return ExitCode::SUCCESS;
    }
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.server.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // `init` also routes pingora's `log` records into tracing.
    // Colours only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let init = if config.server.log_json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    if let Err(e) = init {
        eprintln!("ssegate: cannot set up logging: {e}");
    }
    let pid_file = config.server.pid_file.clone();
    let config = Arc::new(config);
    let config_for_log = config.clone();
    let server = match ssegate::server::build(config, cli.upgrade) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ssegate: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(p) = &pid_file {
        if let Err(e) = ssegate::write_pid_file(p) {
            eprintln!("ssegate: cannot write the PID file {}: {e}", p.display());
            return ExitCode::from(1);
        }
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "ssegate starting");
    ssegate::server::log_served(&config_for_log);
    server.run_forever()
}
