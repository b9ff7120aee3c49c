//! The `flaghost` binary: parse the command line, start telemetry, build the
//! service, serve until SIGTERM or ctrl-c.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use flaghost::config::{Cli, Command, LogFormat};
use flaghost::{server, telemetry};
use tracing::{error, info};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            telemetry::init(args.log_format);
            let result = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                // NB: plugin calls run on these threads; a guest's recursion
                // stops at the wasm stack limit (512 KiB) well inside this,
                // so it traps instead of overflowing the native stack.
                .thread_stack_size(4 << 20)
                .build()
                .context("cannot start the async runtime")
                .and_then(|rt| rt.block_on(serve(args)));
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
            telemetry::init(LogFormat::Text);
            ExitCode::from(flaghost::local::run(&args))
        }
        Command::Validate(args) => {
            telemetry::init(LogFormat::Text);
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

async fn serve(args: flaghost::config::ServeArgs) -> anyhow::Result<()> {
    let config = args.validate()?;
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
