//! The `flaghost` binary: parse the command line, start telemetry, build the
//! service, serve until SIGTERM or ctrl-c.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use flaghost::config::{Cli, Command, LogFormat};
use flaghost::{server, telemetry};
use tracing::{error, info};

// NB: jemalloc, chosen side by side with glibc's and mimalloc
// (`cargo bench --bench load`, LOAD_VARIANTS; README, Performance): bulk
// answers cost 20-27% less CPU than with glibc's and resident memory stayed
// level (mimalloc's grew by 60%). `--no-default-features` builds on glibc's.
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings (`_RJEM_MALLOC_CONF` in the environment overrides
/// them). NB: one arena, not jemalloc's 4 per core: each arena kept the
/// pages a bulk load had freed, and 1,000 flags + 4 plugins stayed at
/// 33-34 MiB after one; with one, 29.4-29.7 MiB at the same CPU (bulk 50,
/// 900, 1,000 within noise; freeing pages at once instead cost bulk 900 half
/// again). The threads' caches keep the one arena's lock off the hot path.
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[allow(non_upper_case_globals)]
// SAFETY: jemalloc reads this one C string at start-up; nothing else
// defines the symbol (tikv-jemalloc-sys leaves it to the binary).
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static malloc_conf: &[u8; 10] = b"narenas:1\0";

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let log_format = args.log_format;
            // NB: validated before logging starts: where traces go is part
            // of the configuration.
            let config = match args.validate() {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("flaghost: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let telemetry = match telemetry::init(log_format, config.traces.as_ref()) {
                Ok(telemetry) => telemetry,
                Err(e) => {
                    eprintln!("flaghost: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            let result = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                // NB: plugin calls run on these threads; a guest's recursion
                // stops at the wasm stack limit (512 KiB) well inside this,
                // so it traps instead of overflowing the native stack.
                .thread_stack_size(4 << 20)
                .build()
                .context("cannot start the async runtime")
                .and_then(|rt| rt.block_on(serve(config)));
            // NB: after the runtime: the last spans are sent on the way out.
            drop(telemetry);
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CompileWorker(args) => flaghost::plugins::compiler::worker(&args),
        Command::Eval(args) => {
            let _telemetry = telemetry::init(LogFormat::Text, None);
            ExitCode::from(flaghost::local::run(&args))
        }
        Command::Validate(args) => {
            let _telemetry = telemetry::init(LogFormat::Text, None);
            match server::validate(&args.source) {
                Ok(found) => {
                    for p in found
                        .problems
                        .iter()
                        .chain(&found.parse_errors)
                        .chain(&found.lints)
                    {
                        eprintln!("{p}");
                    }
                    let (summary, ok) = found.summary(args.allow_parse_errors, args.allow_warnings);
                    eprintln!("flaghost validate: {summary}");
                    if ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("flaghost validate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(config: flaghost::config::ServeConfig) -> anyhow::Result<()> {
    let service = server::build(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    info!(address = %listener.local_addr()?, "listening");
    server::serve(listener, service, shutdown_signal()).await?;
    info!("stopped");
    Ok(())
}

/// Completes on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("ctrl-c: finishing in-flight requests"),
        () = term => info!("SIGTERM: finishing in-flight requests"),
    }
}
